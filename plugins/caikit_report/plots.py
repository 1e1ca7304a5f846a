"""The report's plots, drawn with matplotlib's Agg backend into PNG bytes.

Every plot is :data:`WIDTH` x :data:`HEIGHT` pixels (a fixed figure size and dpi,
no tight bounding box), so the page can state each image's size and a browser
test can check it. matplotlib is imported here only, and only when a report is
drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from caikit_core.errors import CaikitError
from caikit_core.evaluation import Estimate

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "HEIGHT",
    "WIDTH",
    "Plot",
    "bar_chart",
    "history_grid",
    "label_histogram",
    "order_scatter",
    "series_plot",
    "win_rate_heatmap",
]

DPI = 100
WIDTH = 720
HEIGHT = 405


@attrs.frozen
class Plot:
    """One drawn plot: a file-safe ``name``, a title and its PNG."""

    name: str
    title: str
    png: bytes
    width: int = WIDTH
    height: int = HEIGHT


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise CaikitError(
            "caikit report needs matplotlib, which is not installed "
            "(pip install 'caikit[report]' or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _draw(name: str, title: str, draw: Callable[[Figure], None]) -> Plot:
    plt = _pyplot()
    fig = plt.figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    try:
        draw(fig)
        fig.suptitle(title, fontsize=11)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return Plot(name, title, buffer.getvalue())


def label_histogram(p_a: Sequence[float]) -> Plot:
    """The P(A) soft labels in 20 bins over [0, 1]."""

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.hist(list(p_a), bins=20, range=(0.0, 1.0), color="#4472c4", edgecolor="white")
        ax.axvline(0.5, color="#888888", linestyle="--", linewidth=1)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("P(A) (soft label)")
        ax.set_ylabel("labels")

    return _draw("labels-p_a", f"Label distribution: P(A) of {len(p_a)} labels", draw)


def order_scatter(orders: Sequence[tuple[float, float]]) -> Plot:
    """P(A) with A shown first against P(A) with A shown second (one point per label):
    on the diagonal the labeller ignores the order; off it, position bias."""

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        xs = [a for a, _ in orders]
        ys = [b for _, b in orders]
        ax.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1)
        ax.scatter(xs, ys, s=14, color="#c0504d", alpha=0.7)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("P(A), A shown first (order AB)")
        ax.set_ylabel("P(A), A shown second (order BA)")

    return _draw("labels-orders", "Label calibration across orders (debias)", draw)


def _x(rows: Sequence[Mapping[str, float]]) -> list[float]:
    if rows and all("step" in r for r in rows):
        return [float(r["step"]) for r in rows]
    return [float(i) for i in range(len(rows))]


def history_grid(
    name: str, title: str, rows: Sequence[Mapping[str, float]], panels: Sequence[tuple[str, str]]
) -> Plot:
    """One small line plot per ``(label, key)`` in ``panels`` against the step."""
    _pyplot()
    from matplotlib.ticker import MaxNLocator

    columns = 2 if len(panels) > 1 else 1
    lines = math.ceil(len(panels) / columns)
    xs = _x(rows)

    def draw(fig: Figure) -> None:
        for i, (label, key) in enumerate(panels):
            ax = fig.add_subplot(lines, columns, i + 1)
            points = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
            ax.set_title(f"{label} ({key})", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if i >= len(panels) - columns:
                ax.set_xlabel("step", fontsize=8)
        fig.subplots_adjust(hspace=0.7, wspace=0.3, top=0.85, bottom=0.12)

    return _draw(name, title, draw)


def _band(ax: Axes, xs: list[float], rows: Sequence[Mapping[str, Any]]) -> None:
    lows = [r["low"] for r in rows if isinstance(r.get("low"), (int, float))]
    highs = [r["high"] for r in rows if isinstance(r.get("high"), (int, float))]
    if len(lows) == len(highs) == len(rows):
        ax.fill_between(xs, lows, highs, alpha=0.25, label="interval")


def series_plot(name: str, title: str, rows: Sequence[Mapping[str, Any]]) -> Plot:
    """A series (rows with ``x`` and ``value``, and ``low``/``high`` when known) as a
    line with its interval band."""

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        raw = [r.get("x", i) for i, r in enumerate(rows)]
        numeric = all(isinstance(v, (int, float)) for v in raw)
        xs = [float(v) if numeric else float(i) for i, v in enumerate(raw)]
        _band(ax, xs, rows)
        ax.plot(xs, [float(r["value"]) for r in rows], marker="o", markersize=3, label="value")
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in raw], rotation=30, fontsize=8)
        ax.set_xlabel("x")
        ax.legend(fontsize=8)

    return _draw(name, title, draw)


def bar_chart(
    name: str, title: str, bars: Mapping[str, Estimate], *, groups: Sequence[str] = ()
) -> Plot:
    """One bar per estimate with its interval as an error bar; with ``groups`` the bars
    are ``"<group>/<category>"`` names and each category gets its own colour."""

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        if groups:
            categories = sorted({k.split("/", 1)[1] for k in bars})
            width = 0.8 / max(1, len(categories))
            for j, category in enumerate(categories):
                xs, values, errs = [], [], []
                for i, group in enumerate(groups):
                    est = bars.get(f"{group}/{category}")
                    if est is None:
                        continue
                    xs.append(i + (j - (len(categories) - 1) / 2) * width)
                    values.append(est.value)
                    errs.append((est.value - est.low, est.high - est.value))
                ax.bar(
                    xs,
                    values,
                    width=width,
                    yerr=[[e[0] for e in errs], [e[1] for e in errs]],
                    capsize=3,
                    label=category,
                )
            ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
            ax.legend(fontsize=8)
        else:
            names = list(bars)
            values = [bars[k].value for k in names]
            low = [bars[k].value - bars[k].low for k in names]
            high = [bars[k].high - bars[k].value for k in names]
            ax.bar(range(len(names)), values, yerr=[low, high], capsize=3, color="#4472c4")
            ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
            fig.subplots_adjust(bottom=0.3)

    return _draw(name, title, draw)


def win_rate_heatmap(
    name: str, title: str, models: Sequence[str], matrix: Sequence[Sequence[float | None]]
) -> Plot:
    """``matrix[i][j]``: how often ``models[i]`` beat ``models[j]`` (``None``: unknown)."""

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        values = [[math.nan if v is None else v for v in row] for row in matrix]
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdBu")
        fig.colorbar(image, ax=ax, label="win rate (row beats column)")
        ax.set_xticks(range(len(models)), list(models), rotation=25, fontsize=8)
        ax.set_yticks(range(len(models)), list(models), fontsize=8)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)

    return _draw(name, title, draw)
