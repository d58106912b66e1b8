"""report.html in a real browser: headless Chromium opens it from disk (file://).

Checks that every image loaded (naturalWidth > 0) and that the page logs no console errors, then
saves a screenshot, report.png, next to the report. The report itself has no scripts; the checks
run in a copy of it (check.html) with a small script added at the top of <head>, which writes
its findings into the DOM for `--dump-dom` to print.

Skipped when Chromium is not installed (Debian's `chromium` package; CI installs it).
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from regimen.report import write_report


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium): skipping the browser check of report.html"
)

# Runs before the page's own content: collects script errors and resources that fail to load
# (capture phase: an <img> error event does not bubble), then, once everything has loaded,
# writes what it found into the DOM.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__errors.push(e.message || ("failed to load " + (t && (t.src || t.href))));
}, true);
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (i) {
    return {src: i.getAttribute("src"), width: i.naturalWidth, complete: i.complete};
  });
  var out = document.createElement("pre");
  out.id = "regimen-check";
  out.textContent = JSON.stringify({images: images, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def _fixtures() -> Any:
    """tests/test_report.py's fake run directories, loaded by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_report_fixtures", Path(__file__).with_name("test_report.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chromium_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests may run as root in a container
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def _console_lines(stderr: str) -> list[str]:
    # Chromium logs every console message as `...:CONSOLE:N] "text", source: ...`. The report has
    # no scripts, so any console line at all is a problem.
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def _check(tmp_path: Path, report: Path) -> dict[str, Any]:
    page = report.read_text()
    check = report.with_name("check.html")
    check.write_text(page.replace("<head>", "<head>\n" + CHECK_SCRIPT, 1))
    # The virtual time budget lets the page finish loading (and the load handler run) before
    # the DOM is dumped.
    done = _chromium_run(tmp_path, "--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="regimen-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the check script did not run; stderr:\n{done.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = _console_lines(done.stderr)
    return result


def test_report_in_chromium(tmp_path: Path) -> None:
    fixtures = _fixtures()
    runs = fixtures.three_runs(tmp_path)
    runs.append(fixtures.make_run(tmp_path / "d", {"optimizer.name": "sgd", "optimizer.lr": 0.1}, noise=True, random_batch=True))
    report = write_report(runs, tmp_path / "out")

    result = _check(tmp_path, report)
    expected = {img.name for img in report.parent.glob("*.png")}
    assert {i["src"] for i in result["images"]} == expected
    broken = [i["src"] for i in result["images"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert result["errors"] == []
    assert result["console"] == []

    # The screenshot is of the report itself, not of the copy with the check script.
    shot = report.with_name("report.png")
    done = _chromium_run(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    assert _console_lines(done.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1280, 2000)


def test_missing_image_is_caught(tmp_path: Path) -> None:
    """The check itself works: a page with a broken image fails it."""
    run = _fixtures().make_run(tmp_path / "solo")
    report = write_report([run], tmp_path / "out")
    report.write_text(report.read_text().replace('src="loss.png"', 'src="gone.png"'))
    result = _check(tmp_path, report)
    assert [i["src"] for i in result["images"] if i["width"] == 0] == ["gone.png"]
    assert any("gone.png" in error for error in result["errors"])
