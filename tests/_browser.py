"""Drive the real app in Debian's Chromium: start the server, open pages, take screenshots.

Never a Playwright-downloaded browser: Debian's, at ``$CHROMIUM`` (the Makefile passes
its ``CHROMIUM``; default ``/usr/bin/chromium``, installed by ``make browser``).
``DPSTUDY_SCREENSHOTS=1`` makes :func:`screenshot` write ``docs/<name>.png``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.environ.get("DPSTUDY_SCREENSHOTS") == "1"
MAX_SCREENSHOT_BYTES = 300_000
#: The sidebar navigation (``dpstudy.ui.PAGES``), in order: label -> URL path.
NAV = {"Overview": "", "Study results": "study", "Launch": "launch", "Masks": "masks",
       "Frontier": "frontier", "Landscape": "landscape", "Curves": "curves"}


#: What ``streamlit run`` logs once it listens: its URL, with the port the OS gave it
#: (up to the end of the line, so that a line still being written is not read short).
_LISTENING = re.compile(rb"URL: (http://127\.0\.0\.1:[1-9][0-9]*)\r?\n")


def _listening_url(proc: subprocess.Popen, log_path: Path, deadline: float) -> str | None:
    """The URL the server logged once it listens, or None if it exited or the time ran out."""
    while proc.poll() is None and time.monotonic() < deadline:
        found = _LISTENING.search(log_path.read_bytes())
        if found:
            return found.group(1).decode()
        time.sleep(0.1)
    return None


def _healthy(proc: subprocess.Popen, url: str, deadline: float) -> bool:
    """Wait until ``/_stcore/health`` answers (True) or the server exits (False)."""
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    return proc.poll() is None
        except OSError:
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def streamlit_server(runs_dir: Path, log_path: Path, timeout: float = 60):
    """``streamlit run`` on a loopback port with the store at ``runs_dir``; yields the
    base URL once ``/_stcore/health`` answers, and stops the server by its pid.

    The port is reserved without a race: streamlit binds port 0, the OS picks a free
    port and the server holds it from that moment; the port is read from the URL the
    server logs. (Choosing a free port here, closing it and passing its number on would
    leave a moment in which another process can take it.)"""
    env = {**os.environ, "DPSTUDY_RUNS": str(runs_dir), "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "streamlit_app.py"),
             "--server.port", "0", "--server.address", "127.0.0.1",
             "--server.headless", "true"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        url = _listening_url(proc, log_path, deadline)
        if url is None or not _healthy(proc, url, deadline):
            raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()}")
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def chromium_page(outside_requests: list[str], width: int = 1280, height: int = 860):
    """A page in headless Chromium; every request not to the loopback server is
    recorded in ``outside_requests`` and aborted."""
    from playwright.sync_api import sync_playwright

    def guard(route):
        if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:",
                                         "blob:")):
            route.continue_()
        else:
            outside_requests.append(route.request.url)
            route.abort()

    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(f"CHROMIUM={CHROMIUM} does not exist (make browser installs it)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height},
                                    accept_downloads=True)
            page.route("**/*", guard)
            yield page
        finally:
            browser.close()


def wait_idle(page, timeout_ms: float = 30_000) -> None:
    """Wait until the script run has finished (Streamlit's status widget disappears)."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
        timeout=timeout_ms)


def sidebar_nav(page) -> list[tuple[str, str, bool]]:
    """``(label, URL path, is the current page)`` of each sidebar navigation link."""
    links = page.locator("[data-testid='stSidebarNav'] a")
    links.first.wait_for()
    return [(link.inner_text().strip(), urllib.parse.urlsplit(link.get_attribute("href"))
             .path.strip("/"), link.get_attribute("aria-current") == "page")
            for link in links.all()]


def screenshot(page, name: str) -> Path | None:
    """``docs/<name>.png`` of the viewport, palette-reduced if needed to stay small."""
    if not SCREENSHOTS:
        return None
    from PIL import Image
    wait_idle(page)
    page.wait_for_load_state("networkidle")  # images and charts drawn
    png = page.screenshot()
    if len(png) > MAX_SCREENSHOT_BYTES:
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128).save(
            buf, format="PNG", optimize=True)
        png = buf.getvalue()
    assert len(png) <= MAX_SCREENSHOT_BYTES, f"{name}.png is {len(png)} bytes"
    path = REPO / "docs" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(png)
    return path
