"""End to end in a real browser: the first open of an empty store (the committed study),
a run launched from the form and followed to its results, its masks, the Overview at
1400 px, the frontier downloaded as PNG; and the first request to every page URL of a
fresh server. No request may leave the machine.

``DPSTUDY_SCREENSHOTS=1`` also launches a non-private and an Automatic Clipping run and
writes ``docs/overview.png``, ``docs/study.png``, ``docs/launch.png``, ``docs/masks.png``
and ``docs/frontier.png``.
"""

import contextlib
import io
import os
import struct
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from _browser import (CHROMIUM, NAV, SCREENSHOTS, chromium_page, screenshot, sidebar_nav,
                      streamlit_server, wait_idle)
from dpstudy.store import RunStore

# skipped only where no browser was asked for: an explicit $CHROMIUM (`make test` passes
# one) that does not exist fails instead
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists() and "CHROMIUM" not in os.environ,
                                 reason=f"{CHROMIUM} missing (make browser)")]
TINY_FORM = {"epochs": 1, "batch_size": 2, "height": 32, "width": 32, "base_width": 8,
             "depth": 2, "limit": 4}
#: (method as the form names it, σ)
LAUNCHES = [("DP-SGD", 1.0)] + ([("non-private", None), ("Automatic Clipping", 2.0)]
                                if SCREENSHOTS else [])
#: URL path -> the page's title (h1)
TITLES = {"": "Overview: your runs", "study": "Study results",
          "launch": "Launch and follow runs", "masks": "Masks",
          "frontier": "Privacy–utility frontier", "curves": "Training curves"}


def expected_nav(current: str) -> list[tuple[str, str, bool]]:
    return [(label, path, path == current) for label, path in NAV.items()]


def choose(page, key: str, option: str, exact: bool = True, attempts: int = 3) -> None:
    """Pick ``option`` in a selectbox. A scroll still going on when the list opens closes
    it again: then the list is opened again (a wait on the option, not a fixed pause)."""
    opener = page.locator(f".st-key-{key} button[aria-label='Open']")
    item = page.get_by_role("option", name=option, exact=exact)
    opener.scroll_into_view_if_needed()
    for attempt in range(attempts):
        opener.click()
        try:
            item.wait_for(timeout=5_000)
            item.click(timeout=5_000)
            break
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise
    wait_idle(page)


def type_number(page, key: str, value) -> None:
    field = page.locator(f".st-key-{key} input")
    field.fill(str(value))
    field.press("Tab")  # commit: the page reruns with the new value
    wait_idle(page)


def wait_completed(root: Path, count: int, timeout: float = 300) -> list[str]:
    store, deadline = RunStore(root), time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in store.run_ids() if store.is_completed(r)]
        if len(done) == count:
            return done
        time.sleep(1)
    raise AssertionError(f"runs in {root}: {store.list_runs().to_dict('records')}")


#: How far the Overview's run table would scroll sideways (0: every column fits).
OVERFLOW_JS = """() => {
    const table = document.querySelector("[data-testid='stDataFrame']");
    let most = 0;
    for (const e of table.querySelectorAll('*')) {
        const overflow = getComputedStyle(e).overflowX;
        if (overflow === 'auto' || overflow === 'scroll')
            most = Math.max(most, e.scrollWidth - e.clientWidth);
    }
    return most;
}"""


def horizontal_overflow(page) -> int:
    """How far the Overview's run table would scroll sideways (0: every column fits)."""
    return page.evaluate(OVERFLOW_JS)


def test_first_open_shows_the_committed_study(tmp_path):
    outside = []
    with streamlit_server(tmp_path / "runs", tmp_path / "streamlit.log") as url, \
            chromium_page(outside, width=1400, height=900) as page:
        page.goto(url)
        page.get_by_text("What the study found (committed reference results)").wait_for(
            timeout=60_000)
        page.locator("[data-testid='stImage'] img").first.wait_for(timeout=30_000)
        assert page.get_by_text("dpstudy train --model unet --method non_dp").count() >= 1
        page.goto(f"{url}/study")
        page.get_by_text("Committed reference results").first.wait_for(timeout=60_000)
        page.locator("[data-testid='stImage'] img").nth(1).wait_for(timeout=30_000)
        # the page streams its reports in: wait for the command rather than count at once
        page.get_by_text("dpstudy sweep --profile matched").first.wait_for(timeout=30_000)
        assert page.get_by_text("dpstudy sweep --profile matched").count() >= 1
        screenshot(page, "study")
    assert outside == [], f"the app requested outside resources: {outside}"


def test_launch_watch_masks_overview_and_frontier_download(tmp_path):
    root, outside = tmp_path / "runs", []
    with streamlit_server(root, tmp_path / "streamlit.log") as url, \
            chromium_page(outside, width=1400, height=900) as page:
        page.goto(f"{url}/launch")
        page.get_by_text("Nothing launched from the app yet").wait_for(timeout=60_000)
        assert sidebar_nav(page) == expected_nav("launch")
        assert page.get_by_text("1 run: about").count() == 1  # estimated before it starts
        for key, value in TINY_FORM.items():
            type_number(page, key, value)
        for method, sigma in LAUNCHES:
            choose(page, "method", method)
            if sigma is not None:
                type_number(page, "noise_multiplier", sigma)
            page.locator(".st-key-start button").click()
            page.get_by_text("Started: Run ").wait_for(timeout=30_000)
        run_ids = wait_completed(root, len(LAUNCHES))
        assert any(r.startswith("unet-dp_sgd-sigma1-") for r in run_ids)
        page.get_by_text("· completed").first.wait_for(timeout=30_000)  # self-refresh
        screenshot(page, "launch")

        page.get_by_role("link", name="Masks of this run").first.click()
        page.locator("[data-testid='stImage'] img").nth(4).wait_for(timeout=30_000)
        assert page.get_by_text("ground truth", exact=True).count() == 1
        if SCREENSHOTS:  # a DP run against the non-private one, on the same B-scan
            choose(page, "run_a", "dp_sgd", exact=False)
            choose(page, "run_b", "non-private", exact=False)
            page.locator("[data-testid='stImage'] img").nth(6).wait_for(timeout=30_000)
            page.locator(".st-key-only_errors").scroll_into_view_if_needed()
            screenshot(page, "masks")

        page.goto(url)
        page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=30_000)
        wait_idle(page)
        # the grid sizes its columns after it is drawn: wait for that (not a fixed pause),
        # then the assertion reports how far it overflows if it never fits
        with contextlib.suppress(PlaywrightTimeout):
            page.wait_for_function(f"() => ({OVERFLOW_JS})() === 0", timeout=10_000)
        assert horizontal_overflow(page) == 0  # status, epochs, duration in view at 1400 px
        screenshot(page, "overview")

        page.goto(f"{url}/frontier")
        button = page.locator(".st-key-frontier-png button")
        button.wait_for(timeout=30_000)
        page.locator("[data-testid='stVegaLiteChart']").first.wait_for()
        with page.expect_download() as download:
            button.click()
        png = Path(download.value.path()).read_bytes()
        assert download.value.suggested_filename == "frontier.png"
        screenshot(page, "frontier")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    from PIL import Image
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel: a truncated file fails here
    assert image.size == (width, height) and width > 300 and height > 200
    assert outside == [], f"the app requested outside resources: {outside}"


def test_first_request_to_every_page_url_of_a_fresh_server(tmp_path):
    """What breaks navigation beside a ``pages/`` folder: a fresh server whose first
    request is a page URL. Each URL gets its own server and must show its own page with
    the full navigation; an unknown URL shows the Overview."""
    outside = []
    with chromium_page(outside) as page:
        for path, title in [*TITLES.items(), ("Launch", None)]:
            with streamlit_server(tmp_path / "runs", tmp_path / f"streamlit-{path}.log") as url:
                page.goto(f"{url}/{path}")
                heading = page.locator("h1").first
                heading.wait_for(timeout=60_000)
                assert heading.inner_text() == (title or TITLES[""]), path
                assert sidebar_nav(page) == expected_nav(path if title else ""), path
    assert outside == [], f"the app requested outside resources: {outside}"
