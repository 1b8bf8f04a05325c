"""The README's first screen: rendered with the docs' Markdown toolchain, seen in headless Chromium.

    python benchmarks/readme_first_screen.py [--out docs/readme-first-screen.png] [--width 1280 --height 800]

Renders README.md with python-markdown and the extensions of mkdocs.yml (GitHub-like styles),
screenshots it with `chromium --headless --screenshot` at the given window size, and measures by
bounding boxes (selenium, the same page) where the quick start's commands and the first picture
sit. Prints them as JSON; exits 1 when the quick start's last command or the picture's top is
below the first screen, or the picture did not load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Close to GitHub's README styles: what a newcomer sees first.
STYLE = """
body { font-family: -apple-system, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; font-size: 16px;
       line-height: 1.5; color: #1f2328; max-width: 980px; margin: 0 auto; padding: 32px 45px; box-sizing: border-box; }
h1, h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; margin: 24px 0 16px; line-height: 1.25; }
h1 { font-size: 2em; margin-top: 0; } h2 { font-size: 1.5em; }
p, ul, table, pre { margin: 0 0 16px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 85%;
       background: #eff1f3; padding: .2em .4em; border-radius: 6px; }
pre { background: #f6f8fa; padding: 16px; border-radius: 6px; overflow: auto; line-height: 1.45; }
pre code { background: none; padding: 0; font-size: 85%; }
table { border-collapse: collapse; } th, td { border: 1px solid #d1d9e0; padding: 6px 13px; }
img { max-width: 100%; }
.headerlink { display: none; }  /* GitHub shows its anchors only on hover */
"""
# Where the quick start's commands and the first picture are, in CSS pixels of the page.
BOXES_SCRIPT = """
var box = function (el) {
  var r = el.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; };
var pres = Array.from(document.querySelectorAll('pre'));
var quick = pres.filter(function (p) {
  return p.textContent.indexOf('mlflow run') >= 0 && p.textContent.indexOf('pytest') >= 0; })[0];
var img = document.querySelector('img');
return {viewport: [window.innerWidth, window.innerHeight],
        quick_start: quick ? box(quick) : null,
        picture: img ? Object.assign(box(img), {src: img.getAttribute('src'),
                                                loaded: img.complete && img.naturalWidth > 0}) : null};
"""


def markdown_config() -> tuple[list, dict]:
    """The Markdown extensions and their settings, as mkdocs.yml lists them."""
    import yaml

    extensions, configs = [], {}
    for entry in yaml.safe_load((REPO / "mkdocs.yml").read_text())["markdown_extensions"]:
        name, settings = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        extensions.append(name)
        if settings:
            configs[name] = settings
    return extensions, configs


def render_readme(folder: Path) -> Path:
    """README.md as an HTML page in `folder`, its images resolved against the checkout."""
    import markdown

    extensions, configs = markdown_config()
    body = markdown.markdown((REPO / "README.md").read_text(), extensions=extensions, extension_configs=configs)
    page = folder / "README.html"
    page.write_text(f'<!doctype html><html><head><meta charset="utf-8"><base href="{REPO.as_uri()}/">'
                    f"<style>{STYLE}</style></head><body>{body}</body></html>")
    return page


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    """What the brief's command line gives: `chromium --headless --screenshot --window-size=W,H`."""
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", f"--window-size={width},{height}", "--proxy-server=127.0.0.1:9",
                    page.as_uri()], check=True, capture_output=True, timeout=120)


def measure(page: Path, width: int, height: int) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                     "--proxy-server=127.0.0.1:9"):  # nothing may be fetched
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        # exactly width x height CSS pixels of page, whatever the window's own frame takes
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.get(page.as_uri())
        driver.execute_async_script("var done = arguments[0]; var img = document.querySelector('img');"
                                    "if (!img || img.complete) done(); else { img.onload = done; img.onerror = done; }")
        return driver.execute_script(BOXES_SCRIPT)
    finally:
        driver.quit()


def problems(boxes: dict, height: int) -> list[str]:
    found = []
    if boxes["quick_start"] is None:
        found.append("no code block with the quick start (mlflow run ... and pytest)")
    elif boxes["quick_start"]["bottom"] > height:
        found.append(f"the quick start ends at {boxes['quick_start']['bottom']:.0f} px, "
                     f"below the first screen ({height} px)")
    if boxes["picture"] is None:
        found.append("no picture")
    else:
        if not boxes["picture"]["loaded"]:
            found.append(f"the picture {boxes['picture']['src']} did not load")
        if boxes["picture"]["top"] >= height:
            found.append(f"the picture starts at {boxes['picture']['top']:.0f} px, "
                         f"below the first screen ({height} px)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "readme-first-screen.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        page = render_readme(Path(folder))
        screenshot(page, args.out.resolve(), args.width, args.height)
        boxes = measure(page, args.width, args.height)
    found = problems(boxes, args.height)
    print(json.dumps({"screenshot": str(args.out), **boxes, "problems": found}))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
