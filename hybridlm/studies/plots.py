"""Line plots for study summaries (matplotlib, no display needed): one panel per task or view."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from hybridlm.eval.report import save_figure


@dataclass
class Panel:
    title: str
    lines: dict[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x, y)
    xlabel: str = ""
    ylabel: str = ""
    xlog: bool = False
    ylog: bool = False
    ylim: tuple[float, float] | None = None
    hlines: dict[str, float] = field(default_factory=dict)  # label -> y (e.g. chance)
    vlines: dict[str, float] = field(default_factory=dict)  # label -> x (e.g. the training length)
    xticks: Sequence[float] | None = None
    xticklabels: Sequence[str] | None = None  # default: the tick values


def step_axis(ax) -> None:
    """Training steps on the x axis as 0, 10k, 20k …: five ticks at most (40,000-step runs overlapped theirs)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))


def plot_panels(panels: Sequence[Panel], path: str | Path, suptitle: str | None = None) -> Path | None:
    """Panels side by side, one legend per panel; None (with a note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot written: install matplotlib (pip install 'hybridlm[eval]')", file=sys.stderr)
        return None
    outside = [len(p.lines) + len(p.hlines) + len(p.vlines) > 4 for p in panels]  # legends beside their axes
    fig, axes = plt.subplots(1, len(panels), figsize=((4.6 + 3.4 * any(outside)) * len(panels), 3.8), squeeze=False)
    for ax, panel, beside in zip(axes[0], panels, outside):
        for label, (xs, ys) in panel.lines.items():
            ax.plot(list(xs), list(ys), marker="o" if len(xs) <= 12 else None, markersize=4, linewidth=1.4,
                    label=label)
        for label, y in panel.hlines.items():
            ax.axhline(y, color="grey", linestyle=":", linewidth=1, label=label)
        for label, x in panel.vlines.items():
            ax.axvline(x, color="grey", linestyle="--", linewidth=1, label=label)
        if panel.xlog:
            ax.set_xscale("log", base=2 if panel.xticks is not None else 10)
        if panel.ylog:
            ax.set_yscale("log")
        if panel.xticks is not None:
            ax.set_xticks(list(panel.xticks), list(panel.xticklabels or [f"{t:g}" for t in panel.xticks]))
            ax.minorticks_off()
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        if panel.xlabel == "step" and not panel.xlog and panel.xticks is None:
            step_axis(ax)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if beside:  # off the data
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        else:
            ax.legend(fontsize=7, loc="best")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return save_figure(fig, path)


def smooth(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled to 0)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out
