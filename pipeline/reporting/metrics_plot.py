"""metrics.png: a fit's per-epoch curves on one page, redrawn after every epoch.

Four panels: the two training losses, validation latent MSE with and without the rectifier (when
the run validates), code usage, and perplexity. A validation store of N < K latents can choose at
most N of a position's K codes, so its usage and perplexity sit far below training's however good
the codebooks are: those panels draw that ceiling and say why. Drawn on a bare matplotlib `Figure`
with the Agg canvas: no pyplot, so no global figure state and no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from revq_pipe.pipeline.atomic_files import write_atomically

if TYPE_CHECKING:  # matplotlib loads when a figure is drawn: half a second a process that draws none saves
    from matplotlib.figure import Figure

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

# The most a validation store of n latents can show of codebooks of k codes, per panel.
VALIDATION_CEILINGS = {"code usage": lambda n, k: 100 * n / k, "perplexity": lambda n, k: n}


def plot_metrics(history: list[dict[str, Any]], path: Path, title: str = "", *, val_count: int | None = None,
                 codes: int | None = None) -> None:
    """Draw the curves of `history` (metrics.jsonl's rows) into the PNG `path`, atomically;
    `val_count` validation latents and `codes` per position give the validation ceiling."""
    figure = draw_metrics(history, title, val_count=val_count, codes=codes)
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=90), suffix=".tmp.png")


def draw_metrics(history: list[dict[str, Any]], title: str = "", *, val_count: int | None = None,
                 codes: int | None = None) -> Figure:
    """The four panels of `history`'s curves on one figure (with the validation ceiling where
    `val_count` < `codes`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

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
        if drawn and panel in VALIDATION_CEILINGS and any("val_mse" in row for row in history):
            _validation_ceiling(figure, axes, VALIDATION_CEILINGS[panel], val_count, codes)
        if drawn:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "not measured (fit without --val)", ha="center", va="center",
                      transform=axes.transAxes, color="gray")
    return figure


def _validation_ceiling(figure: Figure, axes, ceiling, val_count: int | None, codes: int | None) -> None:
    """The line validation cannot pass when it has fewer latents than codes, and why, under the panels."""
    if val_count is None or codes is None or val_count >= codes:
        return
    axes.axhline(ceiling(val_count, codes), color=STYLES["validation"]["color"], linestyle=":", linewidth=1,
                 label=f"validation's ceiling ({val_count} latents)")
    figure.supxlabel(f"{val_count} validation latents can use at most {val_count} of the {codes} codes of a "
                     f"position: validation's usage and perplexity stay under the dotted line, however good the "
                     f"codebooks", fontsize="small")
