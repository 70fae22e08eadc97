"""Headless Chromium for the page tests: Debian's ``chromium`` driven by Playwright for Python, launched
with the system browser's ``executable_path`` (Playwright's own browser download is not needed).

Where the browser or Playwright is missing the tests skip with one line saying how to get it, except
when ``MOEKIT_BROWSER_TESTS=require`` (set by ``.ci/run``): then they fail, so CI never passes by skipping.
Screenshots go to ``$MOEKIT_ARTIFACTS`` (default ``test-artifacts/browser`` in the repository).
"""

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

HINT = ("the page tests need headless Chromium: `sudo apt-get install -y chromium` (Debian/Ubuntu), or set "
        "MOEKIT_CHROMIUM to a Chromium/Chrome binary; Playwright comes with `make test`")
ARTIFACTS = Path(os.environ.get("MOEKIT_ARTIFACTS") or Path(__file__).parents[1] / "test-artifacts" / "browser")


def required() -> bool:
    return os.environ.get("MOEKIT_BROWSER_TESTS") == "require"


def chromium_path() -> str | None:
    for name in (os.environ.get("MOEKIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome-stable",
                 "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def missing(why: str):
    if required():
        pytest.fail(f"{why}; MOEKIT_BROWSER_TESTS=require: {HINT}", pytrace=False)
    pytest.skip(f"{why}: {HINT}")


def launch():
    """(playwright, browser), or a skip/fail naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed")
    path = chromium_path()
    if path is None:
        missing("no Chromium on PATH")
    pw = sync_playwright().start()
    try:  # --no-sandbox: CI runs as root; /dev/shm is small in containers
        browser = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
    except Exception:
        pw.stop()
        raise
    return pw, browser


class Watched:
    """A page with its network and console recorded: every request's URL, and the console's errors
    (a Content-Security-Policy violation or an uncaught exception shows there)."""

    def __init__(self, browser, origin: str, name: str):
        self.origin, self.name = origin, name
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def off_origin(self) -> list[str]:
        """Requests that left the server's origin (inline data: and blob: URLs fetch nothing)."""
        base = urlsplit(self.origin)
        return [u for u in self.requests if urlsplit(u).scheme not in ("data", "blob")
                and (urlsplit(u).scheme, urlsplit(u).netloc) != (base.scheme, base.netloc)]

    def shot(self, suffix: str = "") -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}{suffix}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()
