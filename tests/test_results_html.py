"""The HTML export rendered by headless Chromium: tables, CSS and plots show, sorting works.

Skipped where Chromium is not installed (Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from test_results_fakes import write_fake
from totobench.results.export import collect_results, to_html

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
              pytest.mark.timeout(180)]


def _chromium(args: list[str], profile) -> subprocess.CompletedProcess:
    # no network, no first-run work: the page must render from the file alone
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture
def page(tmp_path):
    root = tmp_path / "results"
    write_fake(root, model="toto-tiny", values=[0.45, 0.50, 0.55, 0.60, 0.55, 0.50, 0.45, 0.40])
    write_fake(root, model="toto-base", num_layers=12,
               values=[0.30, 0.35, 0.40, 0.45, 0.50, 0.70, 0.65, 0.60, 0.55, 0.50, 0.45, 0.40])
    write_fake(root, model="random-init:toto-tiny", values=[0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.09, 0.08])
    write_fake(root, model="toto-tiny", task="k400", values=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    path = tmp_path / "leaderboard.html"
    path.write_text(to_html(collect_results(root)), encoding="utf-8")
    return path


def _pixels_near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(pixels - np.array(rgb)).sum(axis=1) <= tol).sum())


def test_headless_chromium_renders_tables_and_plot(page, tmp_path):
    shot = tmp_path / "shot.png"
    _chromium(["--window-size=1280,1400", f"--screenshot={shot}", page.as_uri()], tmp_path / "profile")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1400)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    non_white = (pixels.sum(axis=1) < 3 * 245).mean()
    assert 0.05 < non_white < 0.6, non_white                       # a page, not blank nor a black box
    assert _pixels_near(pixels, (0xDB, 0xE6, 0xF7)) > 5000         # table headers: the CSS applied
    assert _pixels_near(pixels, (0xE3, 0xF6, 0xE3)) > 2000         # green best-layer rows
    for curve in ((0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28), (0x2C, 0xA0, 0x2C)):  # the plot's three curves
        assert _pixels_near(pixels, curve, tol=30) > 150, curve


def test_clicking_a_header_sorts_the_leaderboard(page, tmp_path):
    # click "imagenet (top1)" twice, then "k400 (top1)" once; record the model order each time
    probe = """<script>
      var th = document.querySelectorAll("#leaderboard th"), seen = [];
      function order() { return Array.from(document.querySelectorAll("#leaderboard tbody tr"))
                          .map(function (tr) { return tr.cells[0].textContent; }).join(","); }
      th[2].click(); seen.push(order()); th[2].click(); seen.push(order()); th[3].click(); seen.push(order());
      document.body.setAttribute("data-sorted", seen.join("|"));
    </script></body>"""
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", probe), encoding="utf-8")
    dom = _chromium(["--dump-dom", probed.as_uri()], tmp_path / "profile").stdout
    sorted_attr = re.search(r'data-sorted="([^"]*)"', dom).group(1)
    assert sorted_attr.split("|") == [
        "random-init:toto-tiny,toto-tiny,toto-base",   # imagenet ascending: 0.10, 0.60, 0.70
        "toto-base,toto-tiny,random-init:toto-tiny",   # imagenet descending
        "toto-tiny,toto-base,random-init:toto-tiny",   # k400 ascending: 0.80, then the empty cells last
    ]
