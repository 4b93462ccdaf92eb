"""How a ReVQ model is saved, loaded and published: the half of `ReVQ` that touches files and the hub.

`ReVQ` (pipeline/model/revq.py) holds tensors; this mixin, its base, gives it the Hugging Face
contract as diffusers' `ModelMixin` gives `AutoencoderDC` its: `save_pretrained` writes
config.json (the architecture and the weights' checksum), model.safetensors and README.md (the
model card), `from_pretrained` reads a run dir or a hub model `user/repo`, `push_to_hub` uploads
those three files and nothing else of the run (its training record keeps local paths).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import save_file

from revq_pipe.pipeline.atomic_files import write_atomically
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.hub import cache_only, lookup_failure, require_hub
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.model.model_card import LIBRARY_NAME, TAGS, model_card
from revq_pipe.pipeline.model.weights import (CHECKSUM_KEY, checked_model_config, file_sha256, load_verified,
                                              read_config_file)
from revq_pipe.pipeline.train.training_record import read_training_record, training_summary

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


class ReVQHubMixin(PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=list(TAGS)):
    """save_pretrained / from_pretrained / push_to_hub for `ReVQ` (the hub mixin's, with these files).

    A model loaded from a run dir also gets, from the run's training record, `training_summary`
    (what its model card says about training) and `recorded_vae` (the VAE of its latents, which
    config.json names only when it is a hub id or the embedded one)."""

    config: ReVQConfig
    training_summary: dict[str, Any]
    recorded_vae: str | None

    def save_pretrained(self, save_directory: str | Path, *, config: Any = None,
                        model_card_kwargs: dict[str, Any] | None = None, **unused: Any) -> None:
        """Write model.safetensors, config.json (the architecture) and README.md (the model card,
        regenerated every time so it describes these weights), each atomically: a crash leaves the
        previous complete file or the new one."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(directory)
        card = self.generate_model_card(**(model_card_kwargs or {}))
        write_atomically(directory / CARD_NAME, lambda tmp: card.save(tmp))

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        weights = save_directory / WEIGHTS_NAME
        write_atomically(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        # The weights' sha256 beside the architecture: loading refuses a file changed anywhere (weights.py).
        text = json.dumps({**self.config.to_dict(), CHECKSUM_KEY: file_sha256(weights)}, indent=2) + "\n"
        write_atomically(save_directory / CONFIG_NAME, lambda tmp: tmp.write_text(text))

    def generate_model_card(self, *args: Any, repo_id: str | None = None, **kwargs: Any):
        return model_card(self.config, self.training_summary, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload config.json, model.safetensors and the model card to the hub repo `repo_id` (the
        run's training record, with its local paths, stays here); a hub out of reach is a one-line UserError."""
        require_hub(f"push {repo_id}")
        kwargs["model_card_kwargs"] = {"repo_id": repo_id, **(kwargs.get("model_card_kwargs") or {})}
        return super().push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, device: str | torch.device | None = None,
                        **kwargs: Any):
        """Load a run dir (config.json + model.safetensors) or a hub model `user/repo` (downloaded
        into, or read offline from, the Hugging Face cache), in eval mode on `device` (default CPU)."""
        from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

        name = str(pretrained_model_name_or_path)
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, CONFIG_NAME)):
            read_config_file(Path(name) / CONFIG_NAME)  # a damaged one is refused before the hub mixin reads it
        if not os.path.isdir(name):
            if name.startswith((".", "/", "~")) or os.path.exists(name):
                raise UserError(f"{name} is not a ReVQ run directory")
            if cache_only():
                kwargs["local_files_only"] = True  # the cache only, instead of the hub client's retries
        try:
            return super().from_pretrained(name, device=device, **kwargs)
        except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError) as err:
            raise UserError(f"{name} is neither a run directory nor a ReVQ model on the Hugging Face hub "
                            f"(or in its cache): {lookup_failure(err)}") from err

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict[str, Any] | None = None, device: str | torch.device | None = None,
                         **unused: Any):
        from revq_pipe.pipeline.device import resolve_device

        if config is None:
            raise UserError(f"{model_id} is not a ReVQ run: it has no config.json")
        if os.path.isdir(model_id):
            weights = Path(model_id) / WEIGHTS_NAME
            if not weights.is_file():
                raise UserError(f"{model_id} has no {WEIGHTS_NAME}: the run has not finished an epoch yet")
        else:
            weights = Path(hf_hub_download(model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                                           force_download=force_download, local_files_only=local_files_only,
                                           token=token))
        state = load_verified(weights, config.get(CHECKSUM_KEY))
        # Checked against the weights before the model is built: config.json may have been edited.
        model = cls(checked_model_config(config, {name: tuple(t.shape) for name, t in state.items()},
                                         Path(model_id) / CONFIG_NAME))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{weights} does not match the config.json beside it: {err}") from err
        if os.path.isdir(model_id):
            model.training_summary = training_summary(model_id)
            model.recorded_vae = (read_training_record(model_id).get("data") or {}).get("revq", {}).get("vae")
        if device is not None:
            model.to(resolve_device(device) if isinstance(device, str) else device)
        return model.eval()
