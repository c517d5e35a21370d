"""``keel report``: one static HTML page of one or more runs, images embedded as base64 PNG (no server needed).

Sections: a table of the runs (grouped by config without seed and output directory), training loss and validation
curves side by side (a mean ± std band for a group of seeds), the LR, then per run its gradient norms (against
step and as a histogram), its update-to-weight ratios and the findings of ``keel diagnose`` with their evidence.
A ``keel diagnose --config`` output directory shows its findings and its procedures: the LR sweep (Playbook
Figure 7a), the range test, the instability probe and the warmup search.

Opened as ``report.html?selftest``, the page checks itself: every image loaded (``naturalWidth > 0``) and no
script error, and writes the result into ``<pre id="selftest">`` (what the browser test reads).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from keel import rundir
from keel.diagnose import plots
from keel.diagnose.findings import DIAGNOSIS, Diagnosis, read_diagnosis
from keel.errors import KeelError

#: Config keys that do not make two runs different experiments.
IGNORED_KEYS = ("seed", "out_dir", "threads", "device", "deterministic", "progress_interval", "tensorboard", "diagnostics")


def _png_tag(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def group_key(raw: dict[str, Any] | None, fallback: str) -> str:
    """The config without the keys that do not change the experiment (seed, output directory, threads...)."""
    if raw is None:
        return f"(no config) {fallback}"
    kept = {k: v for k, v in raw.items() if k not in IGNORED_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def _differences(raws: list[dict[str, Any] | None]) -> list[str]:
    """For each config, the dotted keys (with values) in which it differs from the others: a short label."""
    flat = [_flatten(r) if r is not None else {} for r in raws]
    keys = sorted({k for f in flat for k in f if k.split(".")[0] not in IGNORED_KEYS})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    return [", ".join(f"{k}={f.get(k)}" for k in varying[:4]) for f in flat]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("optimizer", "schedule"):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, dict):
            out.update({f"{prefix}{key}.{k}": v for k, v in value.items()})
        else:
            out[f"{prefix}{key}"] = value
    return out


def _load(path: Path) -> dict[str, Any]:
    """A run (metrics) or a diagnose output (diagnosis.json without metrics)."""
    from keel.diagnose.readers import find_other_run
    from keel.diagnose.run import diagnose_run, load_run

    if (path / rundir.METRICS).is_file() or find_other_run(path) is not None:
        records, raw = load_run(path)
        diagnosis, _ = diagnose_run(path)
        window = max(1, len(records.losses) // 50)
        return {"kind": "run", "path": path, "name": path.name or str(path), "records": records, "raw": raw,
                "diagnosis": diagnosis,
                "train": (records.step_numbers, list(plots.smooth(records.losses, window))),
                "val": ([int(r["step"]) for r in records.evals], [float(r["val_loss"]) for r in records.evals]),
                "lr": (records.step_numbers, records.lrs)}
    if (path / DIAGNOSIS).is_file():
        return {"kind": "diagnosis", "path": path, "name": path.name or str(path),
                "diagnosis": read_diagnosis(path)}
    if not path.exists():
        raise KeelError(f"RUN_DIR '{path}' does not exist; allowed: keel run directories or keel diagnose outputs")
    raise KeelError(f"'{path}' has neither {rundir.METRICS} nor {DIAGNOSIS}; allowed: a keel run directory or a "
                    "keel diagnose --config output directory")


def build_report(paths: list[Path]) -> str:
    """The HTML text of the report on ``paths``."""
    if not paths:
        raise KeelError("keel report needs at least one RUN_DIR")
    items = [_load(Path(p)) for p in paths]
    runs = [item for item in items if item["kind"] == "run"]
    groups: dict[str, dict[str, Any]] = {}
    labels = _differences([r["raw"] for r in runs])
    for run, label in zip(runs, labels):
        key = group_key(run["raw"], str(run["path"]))
        group = groups.setdefault(key, {"runs": [], "label": label or run["name"]})
        group["runs"].append(run)
        run["group"] = group
    for index, group in enumerate(groups.values()):
        if len(group["runs"]) > 1 and not group["label"]:
            group["label"] = f"group {index + 1}"
        group["label"] = group["label"] or group["runs"][0]["name"]
    body = [f"<h1>keel report</h1><p>{len(runs)} run(s) in {len(groups)} config group(s)"
            + (f", {len(items) - len(runs)} diagnose output(s)" if len(items) > len(runs) else "") + ".</p>"]
    if runs:
        body.append(_summary_table(runs))
        group_list = list(groups.values())
        body.append('<h2>Curves</h2><div class="row">')
        body.append(_figure(plots.curves_figure(group_list, "train", "training loss (smoothed)", "loss"),
                            "training loss"))
        body.append(_figure(plots.curves_figure(group_list, "val", "validation loss", "val_loss"), "validation loss"))
        body.append(_figure(plots.curves_figure(group_list, "lr", "learning rate", "lr", log_y=True),
                            "learning rate"))
        body.append("</div>")
        body.append('<h2>Runs</h2><div class="row">')
        for run in runs:
            body.append(_run_section(run))
        body.append("</div>")
    for item in items:
        if item["kind"] == "diagnosis":
            body.append(_diagnosis_section(item))
    return _PAGE.replace("{{BODY}}", "\n".join(body))


def write_report(paths: list[Path], out: Path) -> Path:
    out = Path(out)
    if out.is_dir() or not out.name:
        raise KeelError(f"--out '{out}' is a directory; allowed: the path of the HTML file to write, e.g. "
                        f"{out / 'report.html'}")
    text = build_report(paths)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_text(out, text)
    return out


def _figure(png: bytes, alt: str) -> str:
    return f'<figure>{_png_tag(png, alt)}<figcaption>{html.escape(alt)}</figcaption></figure>'


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _summary_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        records = run["records"]
        val = [r["val_loss"] for r in records.evals]
        accuracy = [r["val_accuracy"] for r in records.evals if "val_accuracy" in r]
        seed = (run["raw"] or {}).get("seed", "—")
        findings = run["diagnosis"].findings
        flagged = sum(f.severity != "info" for f in findings)
        rows.append(f"<tr><td>{html.escape(run['name'])}</td><td>{html.escape(run['group']['label'])}</td>"
                    f"<td>{_number(seed)}</td><td>{records.step_numbers[-1] + 1}</td>"
                    f"<td>{_number(float(sum(records.losses[-20:]) / len(records.losses[-20:])))}</td>"
                    f"<td>{_number(float(val[-1])) if val else '—'}</td>"
                    f"<td>{_number(float(min(val))) if val else '—'}</td>"
                    f"<td>{_number(float(accuracy[-1])) if accuracy else '—'}</td><td>{flagged}</td></tr>")
    return ("<table><tr><th>run</th><th>config group</th><th>seed</th><th>steps</th><th>train loss (last 20)</th>"
            "<th>val_loss (last)</th><th>val_loss (best)</th><th>val_accuracy</th><th>warnings</th></tr>"
            + "".join(rows) + "</table>")


def _run_section(run: dict[str, Any]) -> str:
    records = run["records"]
    name = run["name"]
    parts = [f'<section class="run"><h3>{html.escape(name)}</h3><p class="path">{html.escape(str(run["path"]))}</p>']
    steps = [s for s, r in zip(records.step_numbers, records.steps) if "grad_norm" in r]
    clipped = [bool(r.get("clipped")) for r in records.steps if "grad_norm" in r]
    if records.norms:
        p90 = float(plots.np.nanpercentile(plots.np.asarray(records.norms, dtype=float), 90)) if any(
            math.isfinite(v) for v in records.norms) else math.nan
        from keel.diagnose.run import clip_threshold

        threshold = clip_threshold(run["raw"])
        parts.append(_figure(plots.grad_norm_figure(steps, records.norms, clipped, p90, threshold, name),
                             f"{name}: gradient norm against step and its histogram"))
    if records.ratios:
        parts.append(_figure(plots.update_ratio_figure(records.ratios, name), f"{name}: update-to-weight ratios"))
    else:
        parts.append("<p class=\"note\">No update-to-weight ratios logged (set diagnostics.update_ratio_every).</p>")
    parts.append(_findings_table(run["diagnosis"]))
    parts.append("</section>")
    return "".join(parts)


def _findings_table(diagnosis: Diagnosis) -> str:
    order = {"error": 0, "warning": 1, "info": 2}
    rows = []
    for finding in sorted(diagnosis.findings, key=lambda f: order[f.severity]):
        rows.append(f'<tr class="{finding.severity}"><td>{finding.severity}</td><td>{html.escape(finding.kind)}</td>'
                    f"<td>{html.escape(finding.message)}</td><td class=\"evidence\">"
                    f"{html.escape(finding.evidence_text())}</td><td>{html.escape(finding.recommendation)}</td></tr>")
    for skipped in diagnosis.skipped:
        rows.append(f'<tr class="skipped"><td>skipped</td><td>{html.escape(skipped.procedure)}</td>'
                    f"<td>{html.escape(skipped.reason)}</td><td class=\"evidence\">needs {html.escape(skipped.minimum)}"
                    "</td><td></td></tr>")
    return ("<h4>Findings</h4><table class=\"findings\"><tr><th>severity</th><th>kind</th><th>finding</th>"
            "<th>evidence</th><th>recommendation</th></tr>" + "".join(rows) + "</table>")


def _diagnosis_section(item: dict[str, Any]) -> str:
    diagnosis: Diagnosis = item["diagnosis"]
    data = diagnosis.data
    parts = [f'<section class="diagnosis"><h2>keel diagnose: {html.escape(diagnosis.target)}</h2>'
             f'<p class="path">{html.escape(str(item["path"]))}</p>']
    if diagnosis.timings:
        total = sum(diagnosis.timings.values())
        parts.append("<p>Time: " + ", ".join(f"{html.escape(k)} {v:.1f} s" for k, v in diagnosis.timings.items())
                     + f"; total {total:.1f} s.</p>")
    row = []
    if data.get("sweep", {}).get("points"):
        row.append(_figure(plots.sweep_figure(data["sweep"], _config_lr(data)), "LR sweep: validation loss against LR"))
    if data.get("range", {}).get("lrs"):
        row.append(_figure(plots.range_figure(data["range"]), "LR range test"))
    if row:
        parts.append('<div class="row">' + "".join(row) + "</div>")
    curves = []
    if data.get("instability", {}).get("steps"):
        inst = data["instability"]
        curves.append((f"2x lr* = {inst['lr']:.2e} (validation, every step)", inst["steps"], inst["val_losses"]))
    for jump in data.get("jumps", []):
        curves.append((f"{jump['factor']}x lr* = {jump['lr']:.2e} (training)", jump["curve_steps"],
                       jump["curve_losses"]))
    if data.get("config", {}).get("curve_steps"):
        curves.append(("your config (training)", data["config"]["curve_steps"], data["config"]["curve_losses"]))
    if curves:
        parts.append(_figure(plots.probe_curves_figure(curves, "instability probe"), "instability probe curves"))
    warm = [(f"warmup {t['warmup']} at LR {w['base_lr']:.2e}: {t['status']}", t["curve_steps"], t["curve_losses"])
            for w in data.get("warmup", []) for t in w["tried"] if t.get("curve_steps")]
    if warm:
        parts.append(_figure(plots.probe_curves_figure(warm, "warmup search"), "warmup search curves"))
    parts.append(_findings_table(diagnosis))
    parts.append("</section>")
    return "".join(parts)


def _config_lr(data: dict[str, Any]) -> float | None:
    """The peak LR your config reached in its config run."""
    lrs = [v for v in data.get("config", {}).get("curve_lrs", []) if isinstance(v, float) and math.isfinite(v)]
    return max(lrs) if lrs else None


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>keel report</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; } h3 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.error td:first-child { background: #f8d0d0; } tr.warning td:first-child { background: #fbe7c0; }
tr.info td:first-child { background: #dcefdc; } tr.skipped td:first-child { background: #e4e4e4; }
td.evidence { font-family: ui-monospace, monospace; font-size: 0.9em; max-width: 32em; word-break: break-word; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
section.run { border: 1px solid #ddd; padding: 0.6em; margin: 0.4em 0; max-width: 100%; }
figure { margin: 0.4em 0; } img { max-width: 100%; height: auto; }
figcaption, .path, .note { font-size: 0.8em; color: #666; }
#selftest { display: none; }
</style></head>
<body>
{{BODY}}
<pre id="selftest"></pre>
<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (event) { errors.push(String(event.message)); });
  function check() {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (img) { return !img.complete || img.naturalWidth === 0; });
    var out = document.getElementById("selftest");
    out.textContent = (broken.length === 0 && errors.length === 0 ? "selftest: ok" : "selftest: FAIL")
      + " images=" + images.length + " broken=" + broken.length + " errors=" + errors.length
      + (errors.length ? " " + errors.join(" | ") : "");
    out.style.display = "block";
  }
  if (window.location.search.indexOf("selftest") >= 0) {
    if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
  }
})();
</script>
</body></html>
"""
