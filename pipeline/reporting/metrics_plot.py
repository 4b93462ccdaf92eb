"""metrics.png: a fit's per-epoch curves on one page, redrawn after every epoch.

Four panels: the two training losses, validation latent MSE with and without the rectifier (when
the run validates), code usage, and perplexity. Drawn on a bare matplotlib `Figure` with the Agg
canvas: no pyplot, so no global figure state and no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from revq_pipe.pipeline.atomic_files import write_atomically

# One colour and line style per quantity, the same in every panel: the quantizer alone is always
# blue and the rectified output always orange, training solid and validation dashed.
STYLES = {
    "quantizer": dict(color="tab:blue"),
    "rectified": dict(color="tab:orange"),
    "training": dict(color="tab:green"),
    "training, worst position": dict(color="tab:olive", linestyle=":"),
    "validation": dict(color="tab:purple", linestyle="--"),
}
# (panel title, y label, [(metrics.jsonl key, legend label, quantity in STYLES)])
PANELS = (
    ("training losses", "MSE (normalised)", [("codebook_loss", "codebook (quantizer alone)", "quantizer"),
                                             ("rectifier_loss", "rectifier", "rectified")]),
    ("validation latent MSE", "MSE (normalised)", [("val_mse_quantizer", "quantizer alone", "quantizer"),
                                                   ("val_mse", "with rectifier", "rectified")]),
    ("code usage", "% of codes chosen", [("usage_mean_pct", "training, mean over positions", "training"),
                                         ("usage_min_pct", "training, worst position", "training, worst position"),
                                         ("val_usage_mean_pct", "validation, mean", "validation")]),
    ("perplexity", "exp(entropy), mean over positions", [("perplexity", "training", "training"),
                                                         ("val_perplexity", "validation", "validation")]),
)


def plot_metrics(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Draw the curves of `history` (metrics.jsonl's rows) into the PNG `path`, atomically."""
    figure = draw_metrics(history, title)
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=90), suffix=".tmp.png")


def draw_metrics(history: list[dict[str, Any]], title: str = "") -> Figure:
    """The four panels of `history`'s curves on one figure."""
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title)
    epochs = [row["epoch"] for row in history]
    for axes, (panel, ylabel, series) in zip(figure.subplots(2, 2).flat, PANELS):
        axes.set_title(panel)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        drawn = False
        for key, label, quantity in series:
            points = [(epoch, row[key]) for epoch, row in zip(epochs, history) if key in row]
            if points:
                axes.plot(*zip(*points), marker="o", markersize=3, label=label, **STYLES[quantity])
                drawn = True
        if drawn:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "not measured (fit without --val)", ha="center", va="center",
                      transform=axes.transAxes, color="gray")
    return figure
