"""The report in a real headless Chromium (no network): every plot decodes, has its
stated natural size, is laid out on the page, and is not blank, both as the browser
decoded it (canvas pixels) and as it painted it (a screenshot of the page).

A copy of the page gets a probe script appended that writes what the browser sees
into the DOM, read back with ``--dump-dom``; the page itself has no script. Without
Chromium the test skips, except under CI (``CI=true``), where it fails: ``.ci/run``
installs Chromium first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from caikit_report.plots import HEIGHT, WIDTH
from caikit_report.plugin import build_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
WINDOW_WIDTH = 1280

PROBE = """
<pre id="probe-result"></pre>
<script>
// synchronous in the load handler: --dump-dom reads the DOM once loading is done
window.addEventListener("load", () => {
  const out = [];
  for (const img of document.querySelectorAll("img")) {
    const decoded = img.complete && img.naturalWidth > 0;
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0, sum = 0, sq = 0, ink = 0;
    for (let i = 0; i < px.length; i += 4) {
      const y = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
      n += 1; sum += y; sq += y * y; if (y < 200) ink += 1;
    }
    const mean = sum / Math.max(1, n);
    const rect = img.getBoundingClientRect();
    const style = getComputedStyle(img);
    out.push({
      plot: img.dataset.plot, complete: img.complete, decoded: decoded,
      naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
      left: rect.left + window.scrollX + img.clientLeft,
      top: rect.top + window.scrollY + img.clientTop,
      width: img.clientWidth, height: img.clientHeight,
      display: style.display, visibility: style.visibility, opacity: style.opacity,
      variance: sq / Math.max(1, n) - mean * mean, ink: ink / Math.max(1, n),
    });
  }
  const resources = performance.getEntriesByType("resource").map((e) => e.name);
  document.getElementById("probe-result").textContent = JSON.stringify({
    images: out, resources: resources, height: document.documentElement.scrollHeight,
  });
});
</script>
"""


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail("Chromium is not installed, and CI=true: .ci/run should have installed it")
    pytest.skip("Chromium is not installed (apt-get install chromium); under CI=true this fails")


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network, whatever a page asks
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _probe(browser: str, page: Path, tmp: Path) -> dict[str, Any]:
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    done = _chromium(
        browser, tmp / "profile", f"--window-size={WINDOW_WIDTH},900", "--dump-dom", probe.as_uri()
    )
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', done.stdout, re.S)
    assert found and found[1], f"no probe result; chromium said: {done.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(found[1].replace("&amp;", "&"))
    return result


def test_every_plot_is_decoded_sized_and_not_blank_in_chromium(
    report_run: Path, with_report_plugin: None, tmp_path: Path
) -> None:
    browser = _browser()
    page = build_report(report_run, evals=[report_run.parent / "hhh-result"])
    expected = sorted(p.stem for p in page.parent.glob("*.png"))
    assert len(expected) == 6

    seen = _probe(browser, page, tmp_path)
    images = {i["plot"]: i for i in seen["images"]}
    assert sorted(images) == expected
    assert seen["resources"] == []  # nothing fetched: every image is inline
    for name, img in images.items():
        assert img["complete"] and img["decoded"], name
        assert (img["naturalWidth"], img["naturalHeight"]) == (WIDTH, HEIGHT), name
        assert (img["width"], img["height"]) == (WIDTH, HEIGHT), (
            name
        )  # laid out at full size (inside its border)
        assert img["display"] != "none" and img["visibility"] == "visible", name
        assert img["opacity"] == "1", name
        assert img["left"] >= 0 and img["left"] + img["width"] <= WINDOW_WIDTH, name
        # a plot has axes, text and data: well spread luminance, a few % dark pixels
        assert img["variance"] > 200.0, (name, img["variance"])
        assert 0.01 < img["ink"] < 0.6, (name, img["ink"])

    # what the browser painted: the page at its full height, each plot's box non-blank
    height = min(int(seen["height"]) + 10, 16000)
    shot = tmp_path / "page.png"
    done = _chromium(
        browser,
        tmp_path / "profile",
        f"--window-size={WINDOW_WIDTH},{height}",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert shot.is_file(), done.stderr[-2000:]
    import numpy as np
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3] * 255.0
    assert pixels.shape[:2] == (height, WINDOW_WIDTH)
    luminance = pixels @ np.array([0.299, 0.587, 0.114])
    assert luminance.var() > 100.0
    for name, img in images.items():
        top, left = round(img["top"]), round(img["left"])
        box = luminance[top : top + HEIGHT, left : left + WIDTH]
        assert box.shape == (HEIGHT, WIDTH), name
        assert box.var() > 200.0, (name, float(box.var()))
        assert 0.01 < float((box < 200).mean()) < 0.6, name


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_without_chromium_it_skips_except_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "failed" else pytest.skip.Exception
    with pytest.raises(expected, match="Chromium is not installed"):
        _browser()
