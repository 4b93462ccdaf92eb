"""The rectifier kinds: one registry of what `ReVQConfig.rectifier` may name and how each is built.

`RECTIFIERS` (the registry's names) is what the config accepts and what `fit --rectifier` offers;
`build_rectifier` builds the kind a config names. The networks themselves (torch and diffusers)
live in pipeline/model/rectifier_networks.py and are imported only when a model is built, so
the config and the CLI read this registry without them.

Every kind but `none` comes in the config's two forms, `residual` (g(q) = q + f(q), the identity
at initialisation) and `paper` (g(q) = f(q)); rectifier_networks.py says why.
"""

from __future__ import annotations

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


# The registry: each kind's builder, from a config and whether the form is residual.
RECTIFIER_KINDS: dict[str, Callable[[ReVQConfig, bool], nn.Module]] = {
    "vit": _vit,  # EfficientViT blocks at latent resolution, as the paper's released code (default)
    "cnn": _cnn,  # the same frame with ResBlocks in place of the EfficientViT blocks
    "mlp": _mlp,  # a residual MLP over the flattened latent
    "none": _none,  # the identity: the quantizer alone
}
RECTIFIERS = tuple(RECTIFIER_KINDS)


def build_rectifier(config: ReVQConfig) -> nn.Module:
    """The rectifier the config names (a kind of `RECTIFIER_KINDS`), in the config's form."""
    return RECTIFIER_KINDS[config.rectifier](config, config.rectifier_form == "residual")
