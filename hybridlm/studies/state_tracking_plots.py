"""Plots of the state-tracking paper protocol: curves of the best runs, the sweep, the diagnostics."""
from __future__ import annotations

import sys
from pathlib import Path

from hybridlm.studies.plots import Panel, plot_panels, step_axis


def paper_plots(cfg, planned: list, states: dict, best: dict, out: Path) -> list[Path]:
    p = cfg.paper
    rep = p.report_length
    plots = []
    curves = []
    for task in cfg.tasks:
        lines = {}
        for model, entry in p.models.items():
            if (model, task) in best:
                run, st = best[(model, task)]
                points = [(h["step"], 100 * h[f"scaled_accuracy@{rep}"]) for h in st["history"]]
                lines[f"{entry.label} (d{run.meta['width']}, lr {run.meta['lr']:g})"] = (
                    [s for s, _ in points], [v for _, v in points])
        # down to −100: a run can answer inverted (scaled accuracy < 0), not only at chance
        curves.append(Panel(task, lines, "step", f"scaled accuracy @ {rep} (%)", ylim=(-105, 105)))
    if any(c.lines for c in curves):
        plots.append(plot_panels(curves, out / "state-tracking-paper.png", "Best run of each model: held-out accuracy"))
    sweep = []
    for task in cfg.tasks:
        lines = {}
        for model, entry in p.models.items():
            for width in p.widths:
                points = sorted((r.meta["lr"], 100 * states[r.id]["best"]["scaled_accuracy"]) for r in planned
                                if r.meta["model"] == model and r.meta["task"] == task and r.meta["width"] == width
                                and states.get(r.id))
                if points:
                    lines[f"{entry.label}, d{width}"] = ([x for x, _ in points], [y for _, y in points])
        sweep.append(Panel(task, lines, "learning rate", f"best scaled accuracy @ {rep} (%)", xlog=True,
                           ylim=(-5, 105)))
    if any(s.lines for s in sweep):
        plots.append(plot_panels(sweep, out / "state-tracking-paper-sweep.png", "The sweep"))
    for (model, task), (run, st) in best.items():
        path = diagnostics_plot(st["history"], out / f"state-tracking-paper-diagnostics-{model}-{task}.png",
                                f"{run.id}: layer 0")
        if path:
            plots.append(path)
    return [p for p in plots if p]


def diagnostics_plot(history: list[dict], path: Path, title: str) -> Path | None:
    """Three panels over training: mean Δ·tanh(θ) on '1' tokens per (head, pair), the same on '0'
    tokens (one colour per head), and mean |A|·Δ per head."""
    entries = [h for h in history if h.get("diagnostics")]
    if not entries:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot written: install matplotlib (pip install 'hybridlm[eval]')", file=sys.stderr)
        return None
    from hybridlm.eval.report import save_figure

    steps = [h["step"] for h in entries]
    layers = [h["diagnostics"][0] for h in entries]
    heads = len(layers[0]["decay"])
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, label in ((axes[0], "turn_on_1", "'1' tokens"), (axes[1], "turn_on_0", "'0' tokens")):
        for h in range(heads):
            pairs = len(layers[0][key][h])
            for s in range(pairs):
                ax.plot(steps, [layer[key][h][s] for layer in layers], color=colours(h % 10), linewidth=0.7,
                        alpha=0.7, label=f"head {h}" if s == 0 else None)
        ax.axhline(1, color="grey", linestyle=":", linewidth=1)
        ax.axhline(-1, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"mean Δ·tanh(θ) on {label}, per (head, pair); ±1 = a half turn", fontsize=9)
        ax.set_xlabel("step")
        step_axis(ax)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[1]:  # rotation off has no rotated pairs to label
        axes[0].legend(fontsize=7, loc="best")
    for h in range(heads):
        axes[2].plot(steps, [max(layer["decay"][h], 1e-12) for layer in layers], color=colours(h % 10),
                     label=f"head {h}")
    axes[2].set_yscale("log")
    axes[2].set_title("mean |A|·Δ per head (0 = no decay)", fontsize=9)
    axes[2].set_xlabel("step")
    step_axis(axes[2])
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
