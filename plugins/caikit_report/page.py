"""The report page: one self-contained HTML file (every plot inline as a base64 PNG,
no external URL) built from a :class:`~caikit_report.rundir.RunView`.

:func:`render` returns the page and the plots it embeds; :func:`write_report` writes
both, the page last and atomically, so a failed report leaves no page behind.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caikit_core.evaluation import Estimate, EvalResult
from caikit_report import plots
from caikit_report.plots import Plot
from caikit_report.rundir import EvalView, RunView

__all__ = [
    "PAGE_FILE",
    "PPO_PANELS",
    "evasiveness_bars",
    "render",
    "win_rates",
    "write_report",
]

PAGE_FILE = "index.html"

#: the PPO panels: a label and the history keys that may hold it, first found wins
PPO_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("objective/scores", "reward", "objective/rlhf_reward", "rewards/mean")),
    ("KL", ("objective/kl", "kl")),
    ("entropy", ("objective/entropy", "entropy")),
    ("response length", ("val/response_length", "response_length", "completions/mean_length")),
)

_CSS = """
body{font-family:sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}
th{background:#eee} code{font-size:90%}
.alarm{background:#fde2e1;border:2px solid #c00;padding:.5em 1em;margin:1em 0}
.note{color:#555;font-style:italic}
.wide{overflow-x:auto} .wide td{font-family:monospace;font-size:75%}
img{display:block;margin:.5em 0;border:1px solid #ddd}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "plot"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Free-form rows as an HTML table: the union of their keys, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_number(r.get(k, '')))}</td>" for k in keys) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plots: list[Plot] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{_e(text)}</p>')

    def plot(self, plot: Plot) -> None:
        names = {p.name for p in self.plots}
        name, n = plot.name, 2
        while name in names:
            name, n = f"{plot.name}-{n}", n + 1
        if name != plot.name:
            plot = Plot(name, plot.title, plot.png, plot.width, plot.height)
        self.plots.append(plot)
        data = base64.b64encode(plot.png).decode("ascii")
        self.parts.append(
            f'<img data-plot="{_e(name)}" alt="{_e(plot.title)}" width="{plot.width}" '
            f'height="{plot.height}" src="data:image/png;base64,{data}">'
        )


def _stage_table(view: RunView) -> str:
    rows = []
    for s in view.stages:
        m = s.manifest
        rows.append(
            {
                "stage": s.name,
                "kind": m.kind,
                "status": "complete" if m.complete else "incomplete",
                "rows": m.rows if m.kind != "fit" else "-",
                "seconds": round(m.timings.get("seconds", 0.0), 3),
                "fingerprint": m.fingerprint[:16],
            }
        )
    return _table(rows)


def _plugins_table(view: RunView) -> str:
    rows = []
    seen: set[tuple[str, str]] = set()
    for s in view.stages:
        for role, p in sorted(s.manifest.plugins.items()):
            key = (role, p.get("name", ""))
            if key in seen:
                continue
            seen.add(key)
            rows.append(
                {
                    "role": role,
                    "plugin": p.get("name", ""),
                    "distribution": p.get("distribution", ""),
                    "version": p.get("version", ""),
                }
            )
    return _table(rows)


def _provenance(page: _Page, view: RunView) -> None:
    info = view.info
    page.add("<h2>Run</h2>")
    facts = {
        "run directory": str(view.root),
        "caikit version": info.get("caikit_version", "?"),
        "run file": info.get("config_source", "?"),
        "seed": info.get("config", {}).get("seed", "?"),
        "updated": time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info.get("updated_at", 0.0)))
        ),
    }
    page.add(_table([{"": k, "value": v} for k, v in facts.items()]))
    page.add("<h3>Stages</h3>")
    page.add(_stage_table(view))
    page.add("<h3>Plugins and versions</h3>")
    page.add(_plugins_table(view))
    page.add('<h3>Fingerprints</h3><div class="wide">')
    rows = [
        {
            "stage": s.name,
            "fingerprint": s.manifest.fingerprint,
            "config": s.manifest.config_fingerprint,
            "input": s.manifest.input_fingerprint,
            "constitution": s.manifest.constitution_hash or "-",
        }
        for s in view.stages
    ]
    page.add(_table(rows) + "</div>")


def _labels(page: _Page, view: RunView) -> None:
    if view.labels is None:
        return
    stats = view.labels
    page.add("<h2>Preference labels</h2>")
    if not stats.p_a:
        page.note("The labels stage wrote no labels.")
        return
    prefer_a = sum(p > 0.5 for p in stats.p_a)
    ties = sum(p == 0.5 for p in stats.p_a)
    mean = sum(stats.p_a) / len(stats.p_a)
    page.add(
        _table(
            [
                {
                    "labels": len(stats.p_a),
                    "mean P(A)": round(mean, 4),
                    "prefer A": prefer_a,
                    "prefer B": len(stats.p_a) - prefer_a - ties,
                    "ties": ties,
                    "mean swap-consistency": (
                        round(sum(stats.swap_consistency) / len(stats.swap_consistency), 4)
                        if stats.swap_consistency
                        else "-"
                    ),
                }
            ]
        )
    )
    page.plot(plots.label_histogram(stats.p_a))
    if stats.orders:
        page.note(
            f"Calibration across orders: {len(stats.orders)} labels were asked in both orders "
            "(debias); each point is one label's P(A) with A shown first against with A "
            "shown second. On the diagonal the order does not matter; off it is position bias."
        )
        page.plot(plots.order_scatter(stats.orders))
    else:
        page.note(
            "No calibration plot: the labels carry one order only (no debias evidence), "
            "so only the P(A) distribution is plotted."
        )


def _numeric_keys(rows: Sequence[Mapping[str, float]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys and k not in ("step", "epoch"))
    return keys


def _fit_curves(page: _Page, view: RunView) -> None:
    pm = view.stage("preference_model")
    if pm is not None:
        page.add("<h2>Preference model training</h2>")
        m = pm.manifest
        if m.metrics:
            page.add(_table([{k: _number(v) for k, v in m.metrics.items()}]))
        keys = _numeric_keys(m.history)
        if m.history and keys:
            panels = [(k, k) for k in keys[:6]]
            page.plot(
                plots.history_grid(
                    "preference-model", "Preference model training curves", m.history, panels
                )
            )
        else:
            page.note("The preference model's plugin recorded no per-step history.")
    policy = view.stage("policy")
    if policy is not None:
        page.add("<h2>Policy optimisation (RL)</h2>")
        m = policy.manifest
        if m.metrics:
            page.add(_table([{k: _number(v) for k, v in m.metrics.items()}]))
        panels = []
        absent = []
        for label, candidates in PPO_PANELS:
            key = next((k for k in candidates if any(k in r for r in m.history)), None)
            if key is None:
                absent.append(label)
            else:
                panels.append((label, key))
        if panels:
            page.plot(plots.history_grid("policy", "Policy per step", m.history, panels))
        if not m.history:
            page.note("The policy optimiser recorded no per-step history.")
        elif absent:
            page.note("Not recorded by the optimiser: " + ", ".join(absent) + ".")


# --- evaluation ---------------------------------------------------------------------------


def _metrics_table(metrics: Mapping[str, Estimate]) -> str:
    rows = [
        {
            "metric": k,
            "value": e.value,
            "low": e.low,
            "high": e.high,
            "level": e.level,
            "n": e.n,
            "method": e.method,
        }
        for k, e in metrics.items()
    ]
    return _table(rows)


_MODEL_KEYS = ("model", "checkpoint", "name", "player", "policy", "a", "row")
_OPPONENT_KEYS = ("opponent", "against", "b", "column", "other")
_RATE_KEYS = ("win_rate", "p_win", "winrate", "rate", "wins", "value")
_RATING_KEYS = ("rating", "elo", "score")


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in row), None)


def win_rates(
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[tuple[str, list[str], list[list[float | None]]]]:
    """A compare result's win-rate matrices (one per judged axis): ``(table name,
    models, matrix)`` for each table of ``{model, opponent, win_rate}`` rows (several
    spellings) or square table of ``{model, <opponent>: rate, ...}`` rows; ``[]`` if
    none fits. ``matrix[i][j]``: how often ``models[i]`` beat ``models[j]``."""
    found = []
    for name, rows in tables.items():
        matrix = _win_matrix(rows)
        if matrix is not None:
            found.append((name, *matrix))
    return found


def _win_matrix(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[list[float | None]]] | None:
    if not rows:
        return None
    a, b = _first(rows[0], _MODEL_KEYS), _first(rows[0], _OPPONENT_KEYS)
    rate = _first(rows[0], _RATE_KEYS)
    if a and b and rate and all(a in r and b in r and rate in r for r in rows):
        models = sorted({str(r[a]) for r in rows} | {str(r[b]) for r in rows})
        matrix: list[list[float | None]] = [[None] * len(models) for _ in models]
        for r in rows:
            if isinstance(r[rate], (int, float)):
                matrix[models.index(str(r[a]))][models.index(str(r[b]))] = float(r[rate])
        return models, matrix
    if a is None:
        return None
    models = [str(r.get(a)) for r in rows]
    square = len(models) > 1 and len(models) == len(set(models))
    if not square or not all(m in r for r in rows for m in models if m != str(r.get(a))):
        return None
    matrix = [
        [float(r[m]) if isinstance(r.get(m), (int, float)) else None for m in models] for r in rows
    ]
    return (models, matrix) if any(v is not None for row in matrix for v in row) else None


def _rating_tables(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """The ``(table name, rating key)`` of each of a compare result's Elo/rating tables."""
    found = []
    for name, rows in tables.items():
        if rows and all(_first(r, _RATING_KEYS) and _first(r, _MODEL_KEYS) for r in rows):
            key = _first(rows[0], _RATING_KEYS)
            if key and all(isinstance(r.get(key), (int, float)) for r in rows):
                found.append((name, key))
    return found


_SPLITS = ("safe", "unsafe")


def evasiveness_bars(result: EvalResult) -> tuple[list[str], dict[str, Estimate]] | None:
    """Refusal rates per checkpoint on safe and unsafe prompts, as
    ``(checkpoints, {"<checkpoint>/<safe|unsafe>": Estimate})``; guessed from metric
    names holding ``refus`` and ``safe``/``unsafe`` (the rest of the name is the
    checkpoint), else from a table of ``{checkpoint, safe, unsafe}`` or
    ``{checkpoint, split, refusal_rate}`` rows; ``None`` if nothing fits."""
    bars: dict[str, Estimate] = {}
    groups: list[str] = []
    metrics = result.metrics
    if any(name.startswith("refusal/") for name in metrics):
        # the bundled instrument's own names: refusal/<checkpoint>/<split>; others
        # (classifier/refusal/..., human/refusal/...: the classifier check on XSTest's
        # human-labelled completions) are not checkpoints
        metrics = {k: v for k, v in metrics.items() if k.startswith("refusal/")}
    for name, est in metrics.items():
        parts = [p for p in re.split(r"[/.:]", name) if p]
        split = next((p for p in parts if p in _SPLITS), None)
        if split is None or not any("refus" in p for p in parts):
            continue
        rest = [p for p in parts if p != split and "refus" not in p]
        group = "/".join(rest).replace("/", "-") or "all"
        if group not in groups:
            groups.append(group)
        bars[f"{group}/{split}"] = est
    if bars:
        return groups, bars
    for rows in result.tables.values():
        if not rows:
            continue
        who = _first(rows[0], ("checkpoint", "model", "name", "policy"))
        if who is None:
            continue
        for r in rows:
            group = str(r.get(who))
            found = False
            for split in _SPLITS:
                value = r.get(split, r.get(f"{split}_refusal_rate"))
                if isinstance(value, (int, float)):
                    bars[f"{group}/{split}"] = Estimate.exact(float(value), int(r.get("n", 0)))
                    found = True
            kind = r.get("split", r.get("kind", r.get("set")))
            rate = _first(r, ("refusal_rate", "refusals", "rate", "value"))
            if kind in _SPLITS and rate is not None and isinstance(r[rate], (int, float)):
                low, high = r.get("low", r[rate]), r.get("high", r[rate])
                bars[f"{group}/{kind}"] = Estimate(
                    float(r[rate]), float(low), float(high), int(r.get("n", 0))
                )
                found = True
            if found and group not in groups:
                groups.append(group)
        if bars:
            return groups, bars
    return None


def _eval(page: _Page, ev: EvalView) -> None:
    r = ev.result
    slug = _slug(ev.name)
    page.add(f"<h3>{_e(ev.name)}: <code>{_e(r.instrument)}</code></h3>")
    page.add(f'<p class="note">from {_e(ev.folder)}; {len(r.rows)} rows</p>')
    for alarm in r.alarms:
        evidence = json.dumps(dict(alarm.evidence), sort_keys=True, default=str)
        page.add(
            f'<div class="alarm"><strong>ALARM {_e(alarm.name)}</strong>: {_e(alarm.message)}'
            f"<br><code>{_e(evidence)}</code></div>"
        )
    if r.metrics:
        page.add(_metrics_table(r.metrics))
    special = False
    if r.instrument == "compare":
        for table, key in _rating_tables(r.tables):
            ranked = sorted(r.tables[table], key=lambda x: -float(x[key]))
            page.add(f"<h4>Ratings ({_e(table)}), best first</h4>")
            page.add(_table(ranked))
        for table, models, matrix in win_rates(r.tables):
            title = f"Win rates ({table})"
            page.plot(plots.win_rate_heatmap(f"{slug}-{_slug(table)}", title, models, matrix))
            special = True
    if r.instrument == "evasiveness":
        found = evasiveness_bars(r)
        if found is not None:
            groups, bars = found
            page.plot(
                plots.bar_chart(
                    f"{slug}-refusals",
                    "Refusal rate on safe and unsafe prompts, per checkpoint",
                    bars,
                    groups=groups,
                )
            )
            special = True
    if r.metrics and not special:
        page.plot(plots.bar_chart(f"{slug}-metrics", f"{r.instrument}: metrics", r.metrics))
    for name, rows in r.tables.items():
        page.add(f"<h4>Table {_e(name)}</h4>")
        page.add(_table(rows) if rows else '<p class="note">(empty)</p>')
    for name, rows in r.series.items():
        if rows and all(isinstance(x.get("value"), (int, float)) for x in rows):
            page.plot(plots.series_plot(f"{slug}-{_slug(name)}", f"{r.instrument}: {name}", rows))
        else:
            page.add(f"<h4>Series {_e(name)}</h4>")
            page.add(_table(rows) if rows else '<p class="note">(empty)</p>')
    for note in r.notes:
        page.note(note)


def render(view: RunView) -> tuple[str, list[Plot]]:
    """The page's HTML and the plots it embeds."""
    page = _Page()
    alarms = [(ev, a) for ev in view.evals for a in ev.result.alarms]
    if alarms:
        page.add('<div class="alarm"><strong>Alarms</strong><ul>')
        for ev, a in alarms:
            page.add(f"<li>{_e(ev.name)} ({_e(ev.result.instrument)}): {_e(a.name)}: "
                     f"{_e(a.message)}</li>")  # fmt: skip
        page.add("</ul></div>")
    _provenance(page, view)
    _labels(page, view)
    _fit_curves(page, view)
    page.add("<h2>Evaluation</h2>")
    if view.evals:
        for ev in view.evals:
            _eval(page, ev)
    else:
        page.note("No evaluation results in this run (none under stages/eval, no --eval).")
    title = f"caikit report: {view.root.name}"
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>" + "\n".join(page.parts) + "</body></html>\n"
    )
    return doc, page.plots


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(view: RunView, out: Path) -> Path:
    """Write the page to ``out`` and each plot as ``<name>.png`` beside it; the page is
    rendered in full before any file is written, and written last."""
    doc, drawn = render(view)
    out.parent.mkdir(parents=True, exist_ok=True)
    for plot in drawn:
        _atomic_write(out.parent / f"{plot.name}.png", plot.png)
    _atomic_write(out, doc.encode("utf-8"))
    return out
