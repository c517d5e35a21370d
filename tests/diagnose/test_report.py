"""`keel report`: one static HTML page; seeds of one config grouped into a mean ± std band; a real browser loads it.

The browser test runs headless Chromium (Debian package `chromium`; .ci/run installs it when missing): the page
opened with `?selftest` checks that every image loaded (naturalWidth > 0) and that no script failed, and writes the
result into the DOM; Chromium's console log must hold no message; a screenshot is saved under the test's tmp dir
and copied to tests/artifacts/report.png (git-ignored).
"""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from keel.cli.main import main
from keel.config import load_config
from keel.diagnose.findings import Diagnosis, Finding
from keel.diagnose.report import build_report, group_key
from keel.train import train

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tiny_config import TINY

    root = tmp_path_factory.mktemp("runs")
    common = [*TINY, "max_steps=30", "eval_interval=10", "checkpoint_interval=30", "sample.tokens=0"]
    paths = []
    for name, extra in (("seed1", ["seed=1", "diagnostics.update_ratio_every=2"]), ("seed2", ["seed=2"]),
                        ("lr1e-2", ["optimizer.lr=1e-2"])):
        train(load_config(None, [*common, *extra, f"out_dir={root / name}"]), quiet=True)
        paths.append(root / name)
    diagnosis = Diagnosis("config", "tiny.yaml", timings={"LR sweep": 3.0})
    diagnosis.add(Finding("lr_sweep", "info", "lr* = 3e-3", {"lr_star": 3e-3, "steps_per_run": 40}, "none"))
    diagnosis.data = {
        "sweep": {"steps": 40, "lr_star": 3e-3, "lr_low": 2e-3, "lr_high": 5e-3,
                  "points": [{"lr": 1e-1, "val_loss": float("nan"), "status": "infeasible"},
                             {"lr": 1e-2, "val_loss": 2.9, "status": "stable"},
                             {"lr": 1e-3, "val_loss": 3.1, "status": "stable"}]},
        "range": {"lrs": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], "losses": [5.5, 5.4, 4.0, 3.0, 9.0],
                  "smoothed": [5.5, 5.45, 4.8, 3.9, 6.0], "steepest_lr": 1e-3, "min_lr": 1e-2, "blow_up_lr": 1e-1},
        "instability": {"lr": 6e-3, "steps": [1, 2, 3], "val_losses": [5.0, 4.5, 4.2]},
        "warmup": [{"base_lr": 0.5, "tried": [{"warmup": 10, "status": "stable", "curve_steps": [0, 1, 2],
                                               "curve_losses": [5.5, 5.0, 4.0]}]}]}
    (root / "diag").mkdir()
    diagnosis.write(root / "diag")
    paths.append(root / "diag")
    return paths


def test_report_groups_seeds_and_embeds_everything(runs, tmp_path):
    text = build_report(runs)
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 10
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    groups = re.findall(r"<tr><td>(seed1|seed2|lr1e-2)</td><td>([^<]*)</td>", text)
    assert len(groups) == 3 and groups[0][1] == groups[1][1] != groups[2][1]  # the two seeds form one group
    assert text.count("<section class=\"run\">") == 3
    assert "update-to-weight ratios" in text and "gradient norm against step and its histogram" in text
    assert "LR sweep: validation loss against LR" in text and "warmup search curves" in text
    assert "evidence" in text and "steps_per_run=40" in text
    assert "src=\"http" not in text and "<link" not in text  # nothing to fetch: one static page


def test_group_key_ignores_seed_and_out_dir():
    a = {"seed": 1, "out_dir": "a", "optimizer": {"lr": 1e-3}}
    b = {"seed": 2, "out_dir": "b", "optimizer": {"lr": 1e-3}}
    c = {"seed": 1, "out_dir": "c", "optimizer": {"lr": 1e-2}}
    assert group_key(a, "a") == group_key(b, "b") != group_key(c, "c")


def test_cli_and_bad_input(runs, tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _run_chromium(*args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (apt-get install chromium; "
                                                 ".ci/run installs it)")
def test_report_in_a_real_browser(runs, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--out", str(page)]) == 0
    n_images = page.read_text().count("<img ")
    result = _run_chromium("--virtual-time-budget=10000", "--dump-dom", f"{page.as_uri()}?selftest")
    marker = re.search(r"selftest: (ok|FAIL)[^<]*", result.stdout)
    assert marker is not None, result.stderr[-2000:]
    assert marker.group(0) == f"selftest: ok images={n_images} broken=0 errors=0"
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "report.png"
    _run_chromium("--hide-scrollbars", "--window-size=1400,3000", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    # the check itself: a page with a broken image fails it
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src="data:image/png;base64,AAAA"',
                             page.read_text(), count=1))
    result = _run_chromium("--virtual-time-budget=10000", "--dump-dom", f"{broken.as_uri()}?selftest")
    assert "selftest: FAIL" in result.stdout and "broken=1" in result.stdout
