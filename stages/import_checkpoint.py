"""`revq-pipe import-checkpoint`: the ReVQ paper's released weights -> a revq-pipe run dir.

The converted run holds config.json, model.safetensors and a model card like a fitted one, and a
training record naming the files it came from, so `export-tokens`, `decode` and `eval` take it as
RUN (see pipeline/model/paper_checkpoint.py for the mapping).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from revq_pipe.pipeline.lease import output_lease
from revq_pipe.pipeline.preflight import check_import_checkpoint, empty_output
from revq_pipe.pipeline.model.paper_checkpoint import paper_model
from revq_pipe.pipeline.train.training_record import write_training_record
from revq_pipe.pipeline.images.vae import DEFAULT_VAE_ID, HUB_IMAGE_SIZE


@dataclass
class ImportedRun:
    out: Path
    config: object  # ReVQConfig

    def report(self) -> str:
        c = self.config
        return (f"Converted the paper's checkpoint into {self.out}: {c.name} (T={c.tokens}, K={c.codes}, d={c.dim}, "
                f"rectifier {c.rectifier} {c.rectifier_width}x{c.rectifier_layers}, paper form), VAE {c.vae} at "
                f"{c.image_size} px. Use it as RUN: revq-pipe export-tokens {self.out} STORE --out TOKENS")


def import_checkpoint(checkpoint: str, config: str, preprocessor: str, out: str, *, vae: str = DEFAULT_VAE_ID,
                      image_size: int = HUB_IMAGE_SIZE, overwrite: bool = False) -> ImportedRun:
    """Convert `checkpoint` (ckpt.pth) with its yaml `config` and `preprocessor` (preprocessor.pth)
    into the run dir `out`; the latents it tokenizes come from `vae` at `image_size`."""
    check_import_checkpoint(checkpoint, config, preprocessor, out, overwrite=overwrite)
    run_dir = Path(out)
    model = paper_model(checkpoint, config, preprocessor, vae=vae, image_size=image_size)
    with output_lease(run_dir, "import-checkpoint"):
        empty_output(out, overwrite)  # again, now that no other job can write it
        model.save_pretrained(run_dir)
        write_training_record(run_dir, {"imported_from": {"checkpoint": str(Path(checkpoint).resolve()),
                                                          "config": str(Path(config).resolve()),
                                                          "preprocessor": str(Path(preprocessor).resolve())}})
    return ImportedRun(run_dir, model.config)
