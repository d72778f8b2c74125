"""Screenshot the top of an HTML page (a fedbridge report) in headless Chromium, for the README.

    .venv/bin/python docs/screenshot.py runs/demo/report/report.html docs/report.png

Uses Playwright with the system's Chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=1300, help="Height of the top kept (px).")
    args = parser.parse_args()
    browser_path = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if browser_path is None:
        raise SystemExit("error: no Chromium found; apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.page.resolve().as_uri(), wait_until="load")
        page.screenshot(
            path=str(args.out), clip={"x": 0, "y": 0, "width": args.width, "height": args.height}
        )
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
