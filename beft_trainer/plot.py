"""A one-figure picture of a selection report: which type won, by how much, and where.

Three panels: the scores of every candidate type (each score divided by its largest value, so
the three are comparable), the deciding score per layer, and the Fisher mass per layer on a log
scale (where inert types show as curves orders of magnitude below the others). The selected
type is highlighted, inert types are hatched and labelled.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import TYPE_CHECKING

from .errors import ReportError
from .report import SelectionReport, read_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)
#: The scores drawn side by side for every type (``random`` joins them when it decided).
PLOTTED_SCORES = ("projection", "magnitude", "movement", "fisher", "attribution")

_SCORE_COLORS = {
    "projection": "#1f77b4",
    "magnitude": "#ff7f0e",
    "movement": "#d62728",
    "fisher": "#2ca02c",
    "attribution": "#9467bd",
    "random": "#7f7f7f",
}
_TYPE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_SELECTED_COLOR = "#fff3b0"
#: Above this many candidates the figure changes layout, drops the raw values on the bars and draws
#: per-layer curves only for the selected, inert and best-scoring types.
CROWDED = 7


def report_figure(report: SelectionReport) -> Figure:
    """The report's figure (a ``matplotlib.figure.Figure``: no pyplot state, no backend switched)."""
    from matplotlib.figure import Figure  # imported here: training without a plot never loads matplotlib

    plotted = [s for s in PLOTTED_SCORES if all(s in report.scores[t] for t in report.candidates)]
    scores = plotted + (["random"] if report.score == "random" else [])
    types = list(report.candidates)
    if len(types) <= CROWDED:
        fig = Figure(figsize=(15, 4.6))
        ax_types, ax_layers, ax_fisher = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1, 1]})
    else:  # many candidates (the vector family): the type panel gets a row of its own
        fig = Figure(figsize=(max(15.0, 0.8 * len(types)), 9.5))
        grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
        ax_types = fig.add_subplot(grid[0, :])
        ax_layers, ax_fisher = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    _draw_type_scores(ax_types, report, types, scores)
    _draw_per_layer(ax_layers, report, types, report.score, log=False)
    _draw_per_layer(ax_fisher, report, types, "fisher", log=True)
    fig.suptitle(_title(report), fontsize=12, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_report(report: SelectionReport | str | os.PathLike, png_path: str | os.PathLike) -> str:
    """Draw ``report`` (a ``SelectionReport``, a ``beft_selection.json`` or the folder holding one) to ``png_path``.

    Returns the path written. Missing folders on the way to ``png_path`` are created; a path without
    the ``.png`` extension, a folder, or a path through a file raises ``ReportError`` before anything
    is drawn (``check_png_path``).
    """
    if not isinstance(report, SelectionReport):
        report = read_report(report)
    png_path = check_png_path(png_path)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    report_figure(report).savefig(png_path, dpi=110)
    return png_path


def check_png_path(png_path: str | os.PathLike) -> str:
    """``png_path`` as a string, or ``ReportError`` if a PNG cannot be written exactly there."""
    png_path = os.fspath(png_path)
    if os.path.isdir(png_path):
        raise ReportError(f"Cannot write the plot to {png_path}: it is a folder; give the path of a .png file.")
    # matplotlib picks the format from the extension: another one fails deep inside savefig, and
    # none at all silently writes PATH.png, not the PATH asked for.
    if os.path.splitext(png_path)[1].lower() != ".png":
        raise ReportError(f"Cannot write the plot to {png_path}: the plot is a PNG, give a path ending in .png.")
    existing = os.path.dirname(os.path.abspath(png_path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ReportError(f"Cannot write the plot to {png_path}: {existing} is a file, not a folder.")
    return png_path


def plot_in_background(report: SelectionReport, png_path: str | os.PathLike) -> threading.Thread:
    """Draw ``report`` to ``png_path`` in a thread and return it (join it before relying on the file).

    The selection callback draws its plot this way: importing matplotlib and drawing took ~1 s inside
    the switch step (on an H100, 0.9 s against a 59 ms step at OPT-1.3B), time the training steps
    after the switch need not wait for. A failure is logged, never raised: a plot must never cost the run.
    """
    thread = threading.Thread(target=_plot_quietly, args=(report, png_path), name="beft-selection-plot")
    thread.start()
    return thread


def _plot_quietly(report: SelectionReport, png_path: str | os.PathLike) -> None:
    try:
        plot_report(report, png_path)
    except Exception as error:  # noqa: BLE001 - any failure of matplotlib or the file system
        logger.warning("Could not plot the selection report: %s", error)


def _title(report: SelectionReport) -> str:
    chosen = "+".join(report.selected) or "nothing"
    title = f"BEFT selected {chosen} by {report.score} at step {report.step} ({report.model_type})"
    params = report.trainable_parameters
    if params.get("after"):
        title += f" · trainable {params.get('before', 0):,} → {params['after']:,}"
    return title


def _normalized(values: list[float]) -> list[float]:
    # Divide by the largest magnitude so every score peaks at 1 and their shapes compare.
    top = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return [v / top if top > 0 and math.isfinite(v) else 0.0 for v in values]


def _draw_type_scores(ax, report: SelectionReport, types: list[str], scores: list[str]) -> None:
    from matplotlib.patches import Patch

    width = 0.8 / len(scores)
    for i, score in enumerate(scores):
        raw = [float(report.scores[t][score]) for t in types]
        heights = _normalized(raw)
        xs = [x + (i - (len(scores) - 1) / 2) * width for x in range(len(types))]
        bars = ax.bar(
            xs,
            heights,
            width,
            color=_SCORE_COLORS[score],
            edgecolor="black" if score == report.score else "none",
            linewidth=1.2,
        )
        for bar, bias_type, value in zip(bars, types, raw, strict=True):
            if bias_type in report.inert:
                bar.set_hatch("//")
                bar.set_alpha(0.55)
            if len(types) > CROWDED:
                continue
            ax.annotate(
                f"{value:.2g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90,
                xytext=(0, 2),
                textcoords="offset points",
            )
    for x, bias_type in enumerate(types):
        if bias_type in report.selected:
            ax.axvspan(x - 0.45, x + 0.45, color=_SELECTED_COLOR, zorder=0)
    ax.set_xticks(range(len(types)))
    crowded = len(types) > CROWDED
    ax.set_xticklabels([_type_label(report, t, one_line=crowded) for t in types], rotation=35 if crowded else 0,
                       ha="right" if crowded else "center", fontsize=8 if crowded else None)  # fmt: skip
    for label, bias_type in zip(ax.get_xticklabels(), types, strict=True):
        if bias_type in report.selected:
            label.set_fontweight("bold")
        elif bias_type in report.inert:
            label.set_color("#b22222")
    ax.set_ylim(0, 1.5)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("score / largest score of its kind")
    ax.set_title("Scores per type" + ("" if crowded else " (raw values on the bars)"), fontsize=10)
    # Proxy handles: a bar's own style may be an inert type's hatching.
    handles = [
        Patch(
            facecolor=_SCORE_COLORS[s],
            edgecolor="black" if s == report.score else "none",
            label=s + (" (decides)" if s == report.score else ""),
        )
        for s in scores
    ]
    handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//", label="inert type"))
    ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=len(handles), columnspacing=0.8, handlelength=1.2)


def _type_label(report: SelectionReport, bias_type: str, one_line: bool = False) -> str:
    size = report.scores[bias_type].get("parameters")
    separator = " · " if one_line else "\n"
    label = bias_type + (f"{separator}{size:,}" if size else "")
    if bias_type in report.selected:
        return f"{label}{separator}SELECTED"
    if bias_type in report.inert:
        return f"{label}{separator}inert"
    return label


def _curves_to_draw(report: SelectionReport, types: list[str]) -> list[str]:
    """Every type, or when crowded the selected, the inert and the best by the deciding score."""
    if len(types) <= CROWDED:
        return types
    ranked = sorted(types, key=lambda t: -float(report.scores[t][report.score]))
    keep = set(report.selected) | set(report.inert) | set(ranked[:CROWDED])
    return [t for t in types if t in keep]


def _draw_per_layer(ax, report: SelectionReport, types: list[str], score: str, log: bool) -> None:
    drawn = _curves_to_draw(report, types)
    for i, bias_type in enumerate(types):
        if bias_type not in drawn:
            continue
        per_layer = report.scores[bias_type].get("per_layer", {}).get(score, {})
        if not per_layer:
            continue
        layers = sorted(per_layer, key=int)
        values = [float(per_layer[layer]) for layer in layers]
        if log:
            # Zero Fisher mass cannot go on a log axis; the floor keeps the curve visible.
            values = [max(v, 1e-30) for v in values]
        selected = bias_type in report.selected
        inert = bias_type in report.inert
        ax.plot(
            [int(layer) for layer in layers],
            values,
            marker="o",
            markersize=6 if selected else 4,
            linewidth=3 if selected else 1.4,
            linestyle="--" if inert else "-",
            color=_TYPE_COLORS[i % len(_TYPE_COLORS)],
            label=bias_type + (" (selected)" if selected else " (inert)" if inert else ""),
        )
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(score + (" (log)" if log else ""))
    what = "deciding score" if score == report.score else "gradient signal"
    hidden = len(types) - len(drawn)
    ax.set_title(f"{score} per layer ({what})" + (f"; {hidden} lower types not drawn" if hidden else ""), fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if hidden else 8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
