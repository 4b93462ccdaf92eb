"""Finding and loading the frozen VAE: a Hugging Face model id or a local diffusers directory.

The class comes from the model's own config (`_class_name` in config.json): AutoencoderDC (the
default, `.encode(x).latent`) or AutoencoderKL (the posterior mean, `.encode(x).latent_dist.mean`).
Resolution reads only config.json, so settings can be checked against an existing store before
any weights are loaded. Nothing here waits on the network when it need not: the local Hugging
Face cache and offline mode are checked first, and the one probe of the hub (pipeline/hub.py) has
a short timeout.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from revq_pipe.pipeline.images.embedded_vae import (EMBEDDED_IMAGE_SIZE, EMBEDDED_VAE_DIR, EMBEDDED_VAE_NAME,
                                                     EMBEDDED_VAE_NAMES)
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.hub import HUB_PROBE_TIMEOUT_S, hub_offline, hub_unreachable
from revq_pipe.pipeline.preflight import existing_vae

# The DC-AE f32c32 model the ReVQ paper uses: 256 px -> (32, 8, 8) latents.
DEFAULT_VAE_ID = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
HUB_IMAGE_SIZE = 256
SUPPORTED_CLASSES = ("AutoencoderDC", "AutoencoderKL")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class VaeSpec:
    """A resolved VAE, before its weights are loaded.

    `name` is what the store records: the hub id, the absolute local directory, or
    `revq-pipe-embedded`. `location`/`subfolder`/`local_files_only` are what `from_pretrained`
    gets. `note` is a line to show the user (the offline fallback to the embedded VAE).
    """

    name: str
    location: str
    subfolder: str | None
    class_name: str
    config: dict[str, Any]
    local_files_only: bool
    default_image_size: int
    note: str | None = None

    @property
    def spatial_factor(self) -> int:
        """How many pixels one latent position covers along each side."""
        key = "encoder_block_out_channels" if self.class_name == "AutoencoderDC" else "block_out_channels"
        return 2 ** (len(self.config[key]) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of one latent at `image_size`; sizes the encoder cannot divide are a UserError."""
        factor = self.spatial_factor
        if image_size <= 0 or image_size % factor:
            raise UserError(f"`image_size={image_size}` is not a positive multiple of {factor}, "
                            f"the spatial compression of {self.name}")
        side = image_size // factor
        return (int(self.config["latent_channels"]), side, side)

    def config_sha256(self) -> str:
        """Digest of the architecture config (diffusers' bookkeeping keys left out)."""
        public = {k: v for k, v in self.config.items() if not k.startswith("_")}
        return hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()

    def load(self, device: torch.device) -> "FrozenVae":
        """Load the weights (float32), frozen and in eval mode, on `device`."""
        import importlib.util

        import diffusers

        model_class = getattr(diffusers, self.class_name)
        # diffusers' fast loading needs accelerate; without it, ask for the plain path quietly.
        fast_loading = importlib.util.find_spec("accelerate") is not None
        try:
            module = model_class.from_pretrained(self.location, subfolder=self.subfolder, torch_dtype=torch.float32,
                                                 local_files_only=self.local_files_only,
                                                 low_cpu_mem_usage=fast_loading)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load VAE weights from {self.name}: {str(err).splitlines()[0]}") from err
        return FrozenVae(self, module, device)


class FrozenVae:
    """A VAE with gradients off and eval mode on; `encode` maps [-1, 1] images to latents."""

    def __init__(self, spec: VaeSpec, module: torch.nn.Module, device: torch.device):
        self.spec = spec
        self.device = device
        self.module = module.to(device).eval().requires_grad_(False)
        self.eager_encoder = self.module.encoder
        self.compiled_encoder: torch.nn.Module | None = None  # made at the first `tune` that asks for it
        self.channels_last = False
        self.static_batch: int | None = None  # the batch the compiled encoder always gets

    def autocast(self, compute: str):
        """The context for `compute` as stores record it: "bf16-autocast" (bf16 autocast on the
        VAE's device) or "float32" (no autocast).

        Enter it once around the whole loop: autocast caches the bf16 copies of the weights for
        as long as its outermost context is open.
        """
        if compute == "bf16-autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def tune(self, *, channels_last: bool = False, compile_batch: int | None = None) -> None:
        """Set how the encoder runs: `channels_last` weights and inputs (faster convolutions on CUDA;
        results change by rounding only), and with `compile_batch` the encoder under torch.compile,
        every batch padded to that size so the compiled code never meets a new shape. Calling it
        again with other values undoes the previous ones (the compiled encoder is kept for the next)."""
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.module.to(memory_format=layout)
        self.channels_last = channels_last
        if compile_batch is not None and self.compiled_encoder is None:
            self.compiled_encoder = torch.compile(self.eager_encoder, dynamic=False)
        self.module.encoder = self.eager_encoder if compile_batch is None else self.compiled_encoder
        self.static_batch = compile_batch

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of a (B, 3, S, S) batch in [-1, 1]: DC-AE's latent, or the KL posterior mean."""
        rows = len(images)
        if self.static_batch is not None and rows < self.static_batch:
            images = torch.cat([images, images.new_zeros((self.static_batch - rows, *images.shape[1:]))])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        output = self.module.encode(images)
        latents = output.latent_dist.mean if self.spec.class_name == "AutoencoderKL" else output.latent
        return latents[:rows]

    def encode_block(self, images: torch.Tensor, *, latent_shape: tuple[int, int, int], dtype: str,
                     flip: bool = False) -> torch.Tensor:
        """One block's latents from uint8 images (B, 3, S, S): in the storage `dtype`, on the device (not
        waited for); with `flip`, (B, 2, C, H, W) with each flipped image's latent beside its own.
        Every encode path calls this, so a latent depends on its block alone."""
        from revq_pipe.pipeline.images.sources import to_model_input

        x = to_model_input(images.to(self.device, non_blocking=True))
        # The flipped images go through the encoder as a batch of their own, so the unflipped latents
        # are the very ones an encode without --flip stores.
        z = torch.stack([self.encode(x), self.encode(x.flip(-1))], dim=1) if flip else self.encode(x)
        if tuple(z.shape[-3:]) != tuple(latent_shape):
            raise RuntimeError(f"{self.spec.name} produced latents of shape {tuple(z.shape[-3:])}, "
                               f"expected {tuple(latent_shape)}")
        return z.to(getattr(torch, dtype))

    def encode_blocks(self, blocks: Iterable, *, latent_shape: tuple[int, int, int], dtype: str,
                      flip: bool = False) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """Each decoded block (pipeline/images/sources.py) with its latents from `encode_block` (None when no
        image of it decoded); a block that reports a broken source (an unreadable shard) raises its
        reason as a UserError. Iterate inside `autocast`."""
        for block in blocks:
            if block.error:
                raise UserError(block.error)
            latents = None
            if len(block.images):
                latents = self.encode_block(block.images, latent_shape=latent_shape, dtype=dtype, flip=flip)
            yield block, latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from (B, C, H, W) latents."""
        return self.module.decode(latents).sample


def resolve_vae(spec: str | None) -> VaeSpec:
    """Turn `--vae` (a hub id, a local directory, or None for the default) into a VaeSpec.

    None means DC-AE f32c32 when it is in the local Hugging Face cache or the hub answers, and
    otherwise the embedded VAE shipped with the package (said in one line); "revq-pipe-embedded"
    (the name stores and runs record for it) or "embedded" names that one directly. Unknown paths or
    ids, and unsupported classes, are UserErrors.
    """
    if spec is None:
        return _resolve_default()
    if spec in EMBEDDED_VAE_NAMES:  # the name every artefact made with it records
        return _embedded_spec()
    existing_vae(spec)  # a folder here, or a hub id
    path = Path(spec).expanduser()
    if path.exists():
        if path.resolve() == EMBEDDED_VAE_DIR.resolve():
            return _embedded_spec()  # one name wherever the package is installed
        return _resolve_local(path.resolve(), name=str(path.resolve()))
    return _resolve_hub(spec)


def _resolve_default() -> VaeSpec:
    cached = cached_hub_spec(DEFAULT_VAE_ID)
    if cached is not None:
        return cached
    unreachable = None if hub_offline() else hub_unreachable()
    if hub_offline():
        reason = "it is not cached and the hub is offline (HF_HUB_OFFLINE)"
    elif unreachable:
        reason = f"it is not cached and the hub cannot be reached: {unreachable}"
    else:
        try:
            return _resolve_hub(DEFAULT_VAE_ID)
        except UserError as err:
            reason = str(err)
    if not (EMBEDDED_VAE_DIR / "config.json").is_file():
        raise UserError(f"no VAE available offline: {DEFAULT_VAE_ID} cannot be used ({reason}), and the "
                        f"embedded VAE is not installed; pass `vae=DIR` with a diffusers VAE directory")
    spec = _embedded_spec()
    spec.note = f"using the embedded VAE ({EMBEDDED_IMAGE_SIZE} px): {DEFAULT_VAE_ID} is not at hand ({reason})"
    return spec


def _embedded_spec() -> VaeSpec:
    spec = _resolve_local(EMBEDDED_VAE_DIR, name=EMBEDDED_VAE_NAME)
    spec.default_image_size = EMBEDDED_IMAGE_SIZE
    return spec


def _resolve_local(directory: Path, name: str) -> VaeSpec:
    for subfolder in (None, "vae"):
        config_path = directory / subfolder / "config.json" if subfolder else directory / "config.json"
        if config_path.is_file():
            spec = _spec_from_config(name, str(directory), subfolder, _read_config(config_path), local_files_only=True)
            if not any((config_path.parent / w).is_file() for w in WEIGHT_FILES):
                raise UserError(f"{config_path.parent} has a config.json but no diffusers weights "
                                f"({' or '.join(WEIGHT_FILES)})")
            return spec
    raise UserError(f"{directory} is not a diffusers VAE directory: no config.json (or vae/config.json) in it")


def _resolve_hub(repo_id: str) -> VaeSpec:
    cached = cached_hub_spec(repo_id)
    if cached is not None:
        return cached
    if hub_offline():
        raise UserError(f"VAE {repo_id} is not a local directory and not in the Hugging Face cache, "
                        f"and the hub is offline (HF_HUB_OFFLINE)")
    unreachable = hub_unreachable()
    if unreachable:
        raise UserError(f"VAE {repo_id} is not a local directory and not in the Hugging Face cache, and "
                        f"the hub cannot be reached ({unreachable})")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    for subfolder in (None, "vae"):
        try:
            config_path = hf_hub_download(repo_id, "config.json", subfolder=subfolder,
                                          etag_timeout=HUB_PROBE_TIMEOUT_S)
        except RepositoryNotFoundError as err:
            raise UserError(f"no Hugging Face model {repo_id} (or it is private)") from err
        except LocalEntryNotFoundError as err:  # the download failed, not a missing file
            raise UserError(f"cannot download {repo_id} from the Hugging Face hub: {err}") from err
        except EntryNotFoundError:
            continue
        except Exception as err:  # noqa: BLE001 - network failures come in many types
            raise UserError(f"cannot reach the Hugging Face hub for {repo_id}: {type(err).__name__}") from err
        return _spec_from_config(repo_id, repo_id, subfolder, _read_config(Path(config_path)), local_files_only=False)
    raise UserError(f"Hugging Face model {repo_id} has no config.json (nor vae/config.json)")


def cached_hub_spec(repo_id: str) -> VaeSpec | None:
    """The spec of a hub model whose config and weights are all in the local cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    for subfolder in (None, "vae"):
        prefix = f"{subfolder}/" if subfolder else ""
        config_path = try_to_load_from_cache(repo_id, f"{prefix}config.json")
        if isinstance(config_path, str) and any(
            isinstance(try_to_load_from_cache(repo_id, f"{prefix}{w}"), str) for w in WEIGHT_FILES
        ):
            config = _read_config(Path(config_path))
            return _spec_from_config(repo_id, repo_id, subfolder, config, local_files_only=True)
    return None


def _spec_from_config(name: str, location: str, subfolder: str | None, config: dict, local_files_only: bool) -> VaeSpec:
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise UserError(f"{name} is a {class_name or 'model without _class_name'}, not a VAE encode supports "
                        f"({', '.join(SUPPORTED_CLASSES)})")
    sample_size = config.get("sample_size")
    image_size = sample_size if isinstance(sample_size, int) and sample_size > 0 else HUB_IMAGE_SIZE
    return VaeSpec(name, location, subfolder, class_name, config, local_files_only, image_size)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read VAE config {path}: {err}") from err


def portable_vae_name(name: str | None) -> str | None:
    """A VAE name that means the same on any machine (a hub id, `revq-pipe-embedded`), or None for
    a local folder (stores record those as absolute paths): what a published config.json may name."""
    return None if name is None or Path(name).is_absolute() else name
