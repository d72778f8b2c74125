"""Load a page in the system's headless Chromium (through Playwright) and report what a reader sees.

Playwright cannot download its own browser here; it drives the Debian ``chromium`` package that
``make test`` installs (``make system-packages``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    """The Chromium executable; an AssertionError (a failing test, not a skip) when missing."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "no headless Chromium on this machine: `apt-get install chromium` (make system-packages)"
    )


@dataclass
class PageView:
    """What a page showed: console errors, images that did not decode, its text and widths."""

    errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    n_images: int = 0
    text: str = ""
    scroll_width: int = 0
    viewport_width: int = 0


def view(page_path: Path, *, width: int, screenshot: Path | None = None) -> PageView:
    """Open ``page_path`` at ``width`` px, wait for every image, and look at it."""
    from playwright.sync_api import sync_playwright

    seen = PageView(viewport_width=width)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on(
                "console",
                lambda m: seen.errors.append(m.text) if m.type in ("error", "assert") else None,
            )
            page.on("pageerror", lambda e: seen.errors.append(str(e)))
            page.on("requestfailed", lambda r: seen.errors.append(f"failed request {r.url}"))
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            # lazy images load when scrolled to: scroll through, then wait for every one
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_function(
                "Array.from(document.images).every(i => i.complete)", timeout=60_000
            )
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.naturalWidth])")
            seen.n_images = len(images)
            seen.broken_images = [alt for alt, w in images if not w]
            seen.text = page.inner_text("body")
            seen.scroll_width = page.evaluate("document.documentElement.scrollWidth")
            if screenshot is not None:
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen
