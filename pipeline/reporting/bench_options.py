"""The bench commands' options, read without torch: `bench search`'s shapes, `bench fit`'s step
variants and `bench quality`'s fit variants. The CLI checks them before it imports a benchmark
(pipeline/preflight.py); the benchmarks use the parsed values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import PRESETS
from revq_pipe.pipeline.train.config import STEP_OPTIONS

# The paper's VAE (DC-AE f32c32 at 256 px) gives 32*8*8 numbers per image: T = that / d groups.
LATENT_NUMBERS = 32 * 8 * 8
BENCH_PRESETS = ("512T_NC=16384", "256T_NC=65536", "256T_NC=262144")


@dataclass(frozen=True)
class SearchShape:
    """G groups of M queries, each group searching its own K codes of dimension d."""

    groups: int
    queries: int
    codes: int
    dim: int
    label: str

    @property
    def pairs(self) -> int:
        return self.groups * self.queries * self.codes


def parse_shape(shape: str) -> SearchShape:
    """A paper preset name (at its training batch size) or an explicit ``G,M,K,d``."""
    if shape in BENCH_PRESETS:
        preset = PRESETS[shape]
        dim = preset["dim"]
        return SearchShape(LATENT_NUMBERS // dim, preset["batch_size"], preset["codes"], dim, shape)
    parts = shape.split(",")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise UserError(f"`shape` must be one of {', '.join(BENCH_PRESETS)} or G,M,K,d with positive integers, got {shape!r}")
    groups, queries, codes, dim = values
    if dim > 64:
        raise UserError(f"`shape` d must be at most 64, got {dim}")
    return SearchShape(groups, queries, codes, dim, f"G={groups},M={queries},K={codes},d={dim}")


PROJECT = "this project"


def parse_variants(variants: str) -> list[tuple[str, tuple[str, ...]]]:
    """`default,fused-quantize+fused-adamw,...` -> [(row name, step options)]: each variant is the
    project's step with the `+`-joined step options (`default`: none of them). The default step
    always comes first: it is what the others are measured against."""
    parsed = [(PROJECT, ())]
    for variant in (v.strip() for v in variants.split(",")):
        if variant == "default":
            continue
        options = tuple(o for o in variant.split("+") if o)
        unknown = sorted(set(options) - set(STEP_OPTIONS))
        if unknown or not options:
            raise UserError(f"`variants` takes default or step options joined by +, separated by commas "
                            f"({', '.join(STEP_OPTIONS)}); got {variant!r}")
        parsed.append((f"{PROJECT}: {'+'.join(options)}", options))
    return parsed


# bench quality's variants, name -> fit settings. "paper" is the released code's rectifier g(q) = f(q);
# the others are revq-pipe's residual form g(q) = q + f(q), the identity at initialisation. The first
# seven are the rectifier ablation (the default set); the rest change training, not the model:
# "kmeans" and "random" set the codebook init (the default's k-means, or the paper's K random samples alone).
QUALITY_VARIANTS: dict[str, dict[str, Any]] = {
    "vit": {"rectifier": "vit", "rectifier_form": "residual"},
    "vit-paper": {"rectifier": "vit", "rectifier_form": "paper"},
    "cnn": {"rectifier": "cnn", "rectifier_form": "residual"},
    "cnn-paper": {"rectifier": "cnn", "rectifier_form": "paper"},
    "mlp": {"rectifier": "mlp", "rectifier_form": "residual"},
    "mlp-paper": {"rectifier": "mlp", "rectifier_form": "paper"},
    "none": {"rectifier": "none"},
    "vit-kmeans": {"rectifier": "vit", "codebook_init": "kmeans"},
    "none-kmeans": {"rectifier": "none", "codebook_init": "kmeans"},
    "vit-random": {"rectifier": "vit", "codebook_init": "random"},
    "none-random": {"rectifier": "none", "codebook_init": "random"},
    "vit-noflip": {"rectifier": "vit", "flip": False},
    "none-noflip": {"rectifier": "none", "flip": False},
}
RECTIFIER_ABLATION = list(QUALITY_VARIANTS)[:7]


def quality_variants(variants: Sequence[str] | None, *, images: str | None, vae: str | None) -> list[str]:
    """bench quality's variants (default: the rectifier ablation), checked with its image options."""
    variants = list(variants or RECTIFIER_ABLATION)
    unknown = [v for v in variants if v not in QUALITY_VARIANTS]
    if unknown:
        raise UserError(f"unknown variant {unknown[0]!r}: choose from {', '.join(QUALITY_VARIANTS)}")
    if (images is None) != (vae is None):
        raise UserError("PSNR needs both `images` (the validation store's source) and `vae`")
    return variants
