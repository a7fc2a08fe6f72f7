"""Screenshot a report page in the headless Chromium of scripts/setup_browser.sh (the README's image).

    .venv/bin/python scripts/screenshot.py runs/ptq/report.html docs/report.png --height 1250
    .venv/bin/python scripts/screenshot.py runs/ptq/report.html docs/generations.png --section Generations

The page is opened offline at 1200 px wide; the image is ``--height`` pixels from the top, or
from the heading of ``--section`` (the rest of the page from there, up to ``--height``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = Path(__file__).resolve().parents[1] / ".cache" / "chromium" / "headless-shell"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("png")
    parser.add_argument("--height", type=int, default=1250)
    parser.add_argument("--section", help="start at the first <h2> whose text starts with this")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        print(f"no headless Chromium at {CHROMIUM}: run bash scripts/setup_browser.sh", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_context(offline=True, viewport={"width": 1200, "height": 800}).new_page()
            page.goto(Path(args.page).resolve().as_uri(), wait_until="load")
            top = 0.0
            if args.section:
                heading = page.locator("h2", has_text=args.section).first
                top = page.evaluate("e => e.getBoundingClientRect().top + window.scrollY - 10", heading.element_handle())
            full = page.evaluate("document.documentElement.scrollHeight")
            clip = {"x": 0, "y": top, "width": 1200, "height": min(args.height, full - top)}
            page.screenshot(path=args.png, full_page=True, clip=clip)
        finally:
            browser.close()
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
