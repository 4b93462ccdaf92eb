"""The rectifier networks g: small networks at latent resolution mapping quantized latents toward the VAE's.

Which kinds exist, and how each is built from a config, is the registry's (pipeline/model/rectifier.py).

The network f follows the paper's released code, a one-stage DC-AE decoder without upsampling built
from diffusers' own `EfficientViTBlock`: conv in (with the channel-repeat shortcut of DC-AE's
decoder), L blocks of width W, RMSNorm over channels, ReLU, conv out. `cnn` swaps the blocks for
diffusers' `ResBlock`; `mlp` is a residual MLP over the flattened latent; `none` is the identity.

Two forms (`ReVQConfig.rectifier_form`):
- `residual` (default): g(q) = q + f(q) with f's last layer zero at initialisation, so g starts as
  the identity and training can only move it away from the bare quantizer where that helps. With
  the paper's form, measured on realistic latents, g first has to learn to pass its input through:
  after 6 epochs its output was far worse than no rectifier (validation MSE 0.38 vs 0.083).
- `paper`: g(q) = f(q), default PyTorch initialisation, as the released code has it.
"""

from __future__ import annotations

import torch
from torch import nn

# diffusers (seconds to import) is imported where its blocks are built: the MLP and `none` need none of it.


class ConvRectifier(nn.Module):
    """conv in + shortcut -> blocks at width W -> RMSNorm -> ReLU -> conv out, all at latent resolution;
    with `residual`, the input is added to that and conv out starts at zero (the identity at init)."""

    def __init__(self, channels: int, width: int, blocks: list[nn.Module], *, residual: bool):
        from diffusers.models.normalization import RMSNorm

        super().__init__()
        self.residual = residual
        self.width = width
        self.conv_in = nn.Conv2d(channels, width, 3, 1, 1)
        # DC-AE repeats each input channel W/C times as a shortcut around conv_in; rounding up and
        # cutting to W keeps the same shortcut for widths that are not a multiple of C.
        self.shortcut_repeats = -(-width // channels)
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = RMSNorm(width, 1e-5, elementwise_affine=True, bias=True)
        self.act = nn.ReLU()
        self.conv_out = nn.Conv2d(width, channels, 3, 1, 1)
        if residual:
            zero_(self.conv_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x.repeat_interleave(self.shortcut_repeats, dim=1)[:, : self.width]
        h = self.conv_in(x) + shortcut
        h = self.blocks(h)
        h = self.norm_out(h.movedim(1, -1)).movedim(-1, 1)
        out = self.conv_out(self.act(h))
        return x + out if self.residual else out


class MLPRectifier(nn.Module):
    """Residual MLP over the flattened latent: x + fc2(silu(fc1(norm(x)))) per layer, hidden width W;
    with `zero_init`, every fc2 starts at zero (the identity at init)."""

    def __init__(self, numel: int, width: int, layers: int, *, zero_init: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(numel), nn.Linear(numel, width), nn.SiLU(), nn.Linear(width, numel))
            for _ in range(layers)
        )
        if zero_init:
            for layer in self.layers:
                zero_(layer[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = h + layer(h)
        return h.view_as(x)


@torch.no_grad()
def zero_(layer: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero, in place: its output is exactly 0 until it trains."""
    for param in layer.parameters(recurse=False):
        param.zero_()
    return layer


def vit_rectifier(channels: int, width: int, layers: int, attention_head_dim: int, *, residual: bool) -> nn.Module:
    """The paper's rectifier: EfficientViT blocks (diffusers' own, as DC-AE's decoder has them)."""
    from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock

    blocks = [EfficientViTBlock(width, attention_head_dim=attention_head_dim, qkv_multiscales=(5,),
                                norm_type="rms_norm") for _ in range(layers)]
    return ConvRectifier(channels, width, blocks, residual=residual)


def cnn_rectifier(channels: int, width: int, layers: int, *, residual: bool) -> nn.Module:
    """The same frame with diffusers' ResBlocks in place of the EfficientViT blocks."""
    from diffusers.models.autoencoders.autoencoder_dc import ResBlock

    blocks = [ResBlock(width, width, norm_type="rms_norm", act_fn="silu") for _ in range(layers)]
    return ConvRectifier(channels, width, blocks, residual=residual)
