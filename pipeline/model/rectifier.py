"""The rectifier kinds: one registry of what `ReVQConfig.rectifier` may name and how each is built.

`RECTIFIERS` (the registry's names) is what the config accepts and what `fit --rectifier` offers;
`build_rectifier` builds the kind a config names. The networks themselves (torch and diffusers)
live in pipeline/model/rectifier_networks.py and are imported only when a model is built, so
the config and the CLI read this registry without them.

Every kind but `none` comes in the config's two forms, `residual` (g(q) = q + f(q), the identity
at initialisation) and `paper` (g(q) = f(q)); rectifier_networks.py says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

    from revq_pipe.pipeline.model.config import ReVQConfig


def _vit(config: ReVQConfig, residual: bool) -> nn.Module:
    from revq_pipe.pipeline.model.rectifier_networks import vit_rectifier

    return vit_rectifier(config.latent_shape[0], config.rectifier_width, config.rectifier_layers,
                         config.attention_head_dim, residual=residual)


def _cnn(config: ReVQConfig, residual: bool) -> nn.Module:
    from revq_pipe.pipeline.model.rectifier_networks import cnn_rectifier

    return cnn_rectifier(config.latent_shape[0], config.rectifier_width, config.rectifier_layers, residual=residual)


def _mlp(config: ReVQConfig, residual: bool) -> nn.Module:
    from revq_pipe.pipeline.model.rectifier_networks import MLPRectifier

    # The MLP is residual per layer in both forms; the residual form also starts it at the identity.
    return MLPRectifier(config.latent_numel, config.rectifier_width, config.rectifier_layers, zero_init=residual)


def _none(config: ReVQConfig, residual: bool) -> nn.Module:
    from torch import nn

    return nn.Identity()


@dataclass(frozen=True)
class RectifierKind:
    """One rectifier kind: what it is (for help texts), and its builder from a config and its form."""

    description: str
    build: Callable[[ReVQConfig, bool], nn.Module]


RECTIFIER_KINDS: dict[str, RectifierKind] = {
    "vit": RectifierKind("EfficientViT blocks at latent resolution, as the paper's released code (default)", _vit),
    "cnn": RectifierKind("the same frame with ResBlocks in place of the EfficientViT blocks", _cnn),
    "mlp": RectifierKind("a residual MLP over the flattened latent", _mlp),
    "none": RectifierKind("the identity: the quantizer alone", _none),
}
RECTIFIERS = tuple(RECTIFIER_KINDS)


def build_rectifier(config: ReVQConfig) -> nn.Module:
    """The rectifier the config names (a kind of `RECTIFIER_KINDS`), in the config's form."""
    return RECTIFIER_KINDS[config.rectifier].build(config, config.rectifier_form == "residual")
