"""The ReVQ paper's released checkpoints (`ckpt.pth` + its yaml config + `preprocessor.pth`) as a
revq-pipe model, so `export-tokens`, `decode` and `eval` run on those weights.

What the released code saves, by name (read from its `src/xvq/models` and `configs/*.yaml`):
- yaml `model.input_data_size` [C, H, W]; `model.quantizer`: `num_code` K, `tokens_per_data` T,
  `num_group` G (T/G token positions share each codebook, position t using group t mod G);
  `model.decoder`: `TYPE` (dc_ae, or identity for no rectifier), one stage of `block_type`
  [EfficientViTBlock], `block_out_channels` [W], `layers_per_block` [L], `attention_head_dim`,
  `qkv_multiscales` [[5]], `norm_type` rms_norm.
- `ckpt.pth`: a dict with `quantizer` (`embeddings` (G, K, d), plus `index_offset` and `count`
  buffers) and `decoder` (`conv_in`, `up_blocks.0.<i>` EfficientViT blocks, `norm_out`,
  `conv_out`) state dicts (and the optimizer's, unused here).
- `preprocessor.pth`: `mean` and `std` (C*H*W,).
The decoder is the paper's rectifier form, g(q) = f(q), with DC-AE's channel-repeat shortcut around
`conv_in`: revq-pipe's `vit` rectifier in its `paper` form holds the same layers under the names
`rectifier.conv_in`, `rectifier.blocks.<i>`, `rectifier.norm_out`, `rectifier.conv_out`. The code
dim d = C*H*W / T is computed from the config for every preset (the released loader fixes d=4, so
its 256-token models do not load there).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch

from revq_pipe.pipeline.model.config import PRESETS, ReVQConfig
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.vae import DEFAULT_VAE_ID, HUB_IMAGE_SIZE
from revq_pipe.pipeline.model.weights import check_config_fits
from revq_pipe.pipeline.preflight import existing_file

# paper decoder parameter prefix -> revq-pipe model parameter prefix
PREFIXES = (("conv_in.", "rectifier.conv_in."), ("norm_out.", "rectifier.norm_out."),
            ("conv_out.", "rectifier.conv_out."))
BLOCK_KEY = re.compile(r"^up_blocks\.0\.(\d+)\.(.+)$")


def paper_model(checkpoint: str | Path, config: str | Path, preprocessor: str | Path, *,
                vae: str | None = DEFAULT_VAE_ID, image_size: int | None = HUB_IMAGE_SIZE):
    """A `ReVQ` holding the released weights; `vae`/`image_size` name what its latents come from
    (the paper's DC-AE f32c32 at 256 px unless told otherwise)."""
    from revq_pipe.pipeline.model.revq import ReVQ

    model_config = paper_config(_read_yaml(config), vae=vae, image_size=image_size)
    state = _torch_load(checkpoint)
    if not (isinstance(state, dict) and isinstance(state.get("quantizer"), dict)
            and isinstance(state.get("decoder"), dict)):
        raise UserError(f"{checkpoint} is not a ReVQ paper checkpoint: it has no `quantizer` and `decoder` state")
    stats = _torch_load(preprocessor)
    if not (isinstance(stats, dict) and all(isinstance(stats.get(name), torch.Tensor) for name in ("mean", "std"))):
        raise UserError(f"{preprocessor} is not the paper's preprocessor: it has no `mean` and `std` tensors")
    # Sizes are checked against the files before anything of the config's size is allocated: the
    # statistics fix C*H*W, the codebooks K and d, the decoder's tensors the rectifier.
    if {stats["mean"].numel(), stats["std"].numel()} != {model_config.latent_numel}:
        raise UserError(f"{preprocessor} has statistics of {stats['mean'].numel()} dimensions, the config's "
                        f"latents {model_config.latent_numel}")
    weights = {"quantizer.codebooks": _codebooks(state["quantizer"], model_config),
               **_rectifier_weights(state["decoder"], model_config)}
    if model_config.rectifier == "none":
        weights = {k: v for k, v in weights.items() if not k.startswith("rectifier.")}
    check_config_fits(model_config, {name: tuple(value.shape) for name, value in weights.items()},
                      f"{checkpoint} with {config}")
    model = ReVQ(model_config)
    model.load_state_dict(weights, strict=False)
    model.preprocessor.set_stats(stats["mean"], stats["std"])
    return model.eval()


def paper_config(yaml_config: dict[str, Any], *, vae: str | None, image_size: int | None) -> ReVQConfig:
    """The ReVQConfig of a released yaml config (its `name` becomes the preset when it is one); a
    value of the wrong kind anywhere (text for a number, a list for a section, 0 tokens) is one line."""
    try:
        return _paper_config(yaml_config, vae=vae, image_size=image_size)
    except UserError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError, IndexError) as err:
        raise UserError(f"not a ReVQ paper config: {type(err).__name__}: {str(err)[:120]}") from None


def _paper_config(yaml_config: dict[str, Any], *, vae: str | None, image_size: int | None) -> ReVQConfig:
    field = functools.partial(_paper_field, yaml_config)
    latent_shape = field("model.input_data_size", lambda v: tuple(int(x) for x in v))
    quantizer, decoder = field("model.quantizer", dict), field("model.decoder", dict)
    tokens, codes = field("model.quantizer.tokens_per_data", int), field("model.quantizer.num_code", int)
    groups = int(quantizer.get("num_group") or tokens)
    if tokens % groups:
        raise UserError(f"tokens_per_data {tokens} is not a multiple of num_group {groups}")
    name = str(yaml_config.get("name", ""))
    common = dict(latent_shape=latent_shape, tokens=tokens, codes=codes, dim=math.prod(latent_shape) // tokens,
                  preset=name if name in PRESETS else "custom", rectifier_form="paper", vae=vae, image_size=image_size)
    kind = decoder.get("TYPE")
    if kind == "identity":
        return ReVQConfig(**common, rectifier="none")
    width, layers = decoder.get("block_out_channels", []), decoder.get("layers_per_block", [])
    block = decoder.get("block_type")
    block = block[0] if isinstance(block, list) and len(block) == 1 else block
    supported = (kind == "dc_ae" and len(width) == 1 and len(layers) == 1 and block == "EfficientViTBlock"
                 and [list(m) for m in decoder.get("qkv_multiscales", [[5]])] == [[5]]
                 and decoder.get("norm_type", "rms_norm") == "rms_norm"
                 and int(decoder.get("latent_channels", latent_shape[0])) == latent_shape[0]
                 and int(width[0]) % latent_shape[0] == 0)
    if not supported:
        raise UserError(f"unsupported paper decoder {str(kind)[:40]} (with {', '.join(sorted(map(str, decoder))[:12])}): "
                        "revq-pipe maps the released one-stage EfficientViT decoder (dc_ae) and identity")
    return ReVQConfig(**common, rectifier="vit", rectifier_width=int(width[0]), rectifier_layers=int(layers[0]),
                      attention_head_dim=int(decoder.get("attention_head_dim", 32)))


def _codebooks(quantizer: dict[str, torch.Tensor], config: ReVQConfig) -> torch.Tensor:
    """(G, K, d) group codebooks -> (T, K, d) per position: position t uses group t mod G."""
    embeddings = quantizer.get("embeddings")
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3:
        raise UserError("the checkpoint's quantizer has no (groups, codes, dim) `embeddings`")
    groups, codes, dim = embeddings.shape
    if codes != config.codes or dim != config.dim or config.tokens % groups:
        raise UserError(f"the checkpoint's codebooks {tuple(embeddings.shape)} do not match the config "
                        f"(T={config.tokens}, K={config.codes}, d={config.dim})")
    return embeddings.float().repeat(config.tokens // groups, 1, 1)


def _paper_field(yaml_config: dict[str, Any], dotted: str, convert: Callable[[Any], Any]) -> Any:
    """The value at `dotted` ("model.quantizer.num_code") of a paper config, converted, or a UserError
    naming the first missing or malformed part of the path."""
    value: Any = yaml_config
    for depth, key in enumerate(dotted.split(".")):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(dotted.split(".")[:depth + 1])
            raise UserError(f"not a ReVQ paper config: it has no {where} (a paper config holds "
                            "model.input_data_size, model.quantizer and model.decoder)")
        value = value[key]
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise UserError(f"not a ReVQ paper config: {dotted} is {value!r}") from None


def _rectifier_weights(decoder: dict[str, torch.Tensor], config: ReVQConfig) -> dict[str, torch.Tensor]:
    weights = {}
    for name, value in decoder.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"the checkpoint's decoder parameter {name} is a {type(value).__name__}, not a tensor")
        block = BLOCK_KEY.match(str(name))
        if block:
            weights[f"rectifier.blocks.{block[1]}.{block[2]}"] = value
            continue
        for old, new in PREFIXES:
            if name.startswith(old):
                weights[new + name[len(old):]] = value
                break
        else:
            raise UserError(f"unexpected decoder parameter {name} in the checkpoint")
    return weights


def _torch_load(path: str | Path) -> Any:
    path = existing_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a foreign or damaged file: say which, in one line
        raise UserError(f"{path} cannot be read with torch.load(weights_only=True): {str(err).splitlines()[0]}") from err


def _read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = existing_file(path, "config")
    try:
        # The released configs use OmegaConf's ${...} interpolation only outside `model`: plain YAML reads them.
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(loaded, dict):
        raise UserError(f"{path} is not a ReVQ paper config")
    return loaded
