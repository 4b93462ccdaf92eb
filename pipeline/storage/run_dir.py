"""A fitted run as the stages after `fit` see it: the model, the data it was fitted on, its identity.

export-tokens, decode and eval all need the same things from RUN: the ReVQ model, its training
record (which store, VAE and classes it was fitted on, when the run has one), and a fingerprint
that names the exact weights (sha256 of model.safetensors) so token stores can say what made them.
RUN is a run directory or a Hugging Face model id (`user/repo`), read through the hub cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.train.training_record import read_training_record
from revq_pipe.pipeline.hub import cache_only, lookup_failure
from revq_pipe.pipeline.images.vae import VaeSpec
from revq_pipe.pipeline.model.weights import file_sha256
from revq_pipe.pipeline.preflight import fitted_run, local_run

# What a published run holds (ReVQ.push_to_hub): all a hub RUN needs.
HUB_FILES = ("config.json", "model.safetensors", "README.md")


@dataclass
class Run:
    """A run directory's model and metadata. `model` is in eval mode on the device it was loaded to."""

    path: Path
    model: Any  # revq_pipe.pipeline.model.revq.ReVQ (imported lazily: it pulls in the kernels)
    sha256: str
    record: dict[str, Any] = field(default_factory=dict)  # training.json ({} for a hub model)

    @classmethod
    def load(cls, run: str | Path, device: torch.device | str = "cpu") -> "Run":
        """Load RUN/config.json and RUN/model.safetensors; a missing or partial run is a user error."""
        from revq_pipe.pipeline.model.revq import ReVQ

        path = run_folder(run)
        fitted_run(path)
        model = ReVQ.from_pretrained(path, device=device).eval()
        return cls(path=path, model=model, sha256=file_sha256(path / "model.safetensors"),
                   record=read_training_record(path))

    @property
    def tokens(self) -> int:
        return self.model.config.tokens

    @property
    def codes(self) -> int:
        return self.model.config.codes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.model.config.latent_shape)

    @property
    def data_attrs(self) -> dict[str, Any]:
        """The `revq` attrs of the latent store the run was fitted on (vae, image size, classes, ...)."""
        return dict((self.record.get("data") or {}).get("revq", {}))

    @property
    def vae(self) -> str | None:
        """The VAE of the run's latents: as its training store records it, else as config.json names it."""
        return self.data_attrs.get("vae") or self.model.config.vae

    def token_attrs(self) -> dict[str, Any]:
        """What a token store records about the run that made it."""
        config = self.model.config
        return {"run": self.sha256, "preset": config.preset,
                "tokens": config.tokens, "codes": config.codes, "dim": config.dim,
                "latent_shape": list(self.latent_shape), "vae": self.vae}

    def check_store(self, store: LatentStore) -> None:
        """Refuse a latent store made by another VAE or with another latent shape than the run's."""
        if store.latent_shape != self.latent_shape:
            raise UserError(f"{store.url} holds latents of shape {list(store.latent_shape)}, but the run was "
                            f"fitted on {list(self.latent_shape)}")
        store_vae = store.attrs.get("vae")
        if self.vae is not None and store_vae is not None and store_vae != self.vae:
            raise UserError(f"{store.url} was encoded with the VAE {store_vae!r}, but the run was fitted on "
                            f"latents of {self.vae!r}")

    @property
    def image_size(self) -> int | None:
        """The square image size the run's latents were encoded at."""
        return self.data_attrs.get("image_size") or self.model.config.image_size

    def check_vae(self, spec: VaeSpec) -> None:
        """Refuse a VAE whose decoder cannot be the run's: another architecture or latent shape."""
        recorded = self.data_attrs.get("vae_config_sha256")
        if recorded is not None and spec.config_sha256() != recorded:
            raise UserError(f"`vae={spec.name}` is not the VAE the run's latents came from ({self.vae})")
        if self.image_size is not None and spec.latent_shape(self.image_size) != self.latent_shape:
            raise UserError(f"`vae={spec.name}` makes latents of shape {list(spec.latent_shape(self.image_size))} "
                            f"at {self.image_size} px, but the run's are {list(self.latent_shape)}")


def run_folder(run: str | Path) -> Path:
    """The local folder of RUN: the directory itself, or a hub model's snapshot in the Hugging Face
    cache (downloaded first unless the hub is offline)."""
    path = local_run(run)
    if path is not None:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    try:  # the cache alone when the hub is out of reach: no waiting on the client's retries
        return Path(snapshot_download(str(run), allow_patterns=list(HUB_FILES), local_files_only=cache_only()))
    except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise UserError(f"{run} is neither a run directory nor a model on the Hugging Face hub (or in its "
                        f"cache): {lookup_failure(err)}") from err
