"""dpstudy's Streamlit app: ``streamlit run streamlit_app.py`` (or ``make app``).

The navigation is explicit: :data:`dpstudy.ui.PAGES`, Overview at ``/`` then Study
results, Launch, Masks, Frontier, Landscape and Curves, each with its own title and no icon
(Material icons would be fetched from outside; the app makes no network requests). The
page scripts live in ``app_pages/``, not ``pages/``: with a ``pages/`` folder Streamlit
serves a fresh server's first request to a page URL with folder-based navigation.
Every page reads the run store at ``$DPSTUDY_RUNS`` (default ``runs/``) through the
library; Launch starts trainings, sweeps, audits and evaluations as separate processes.
"""

import streamlit as st

from dpstudy.ui import PAGES

st.set_page_config(layout="wide")
st.navigation([st.Page(path, title=title, url_path=url or None, default=not url)
               for path, title, url in PAGES]).run()
