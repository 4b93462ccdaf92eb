"""What `encode` is asked to do, as one object: `EncodeConfig`, every setting of the stage.

Each field a user sets carries its `Setting` (pipeline/model/config.py): the CLI makes encode's
options from them (cli.py), the stage function takes the same names as keywords or one
`EncodeConfig` as `config=` (stages/encode.py), and a value is checked once, when the config is
made. So a new encode setting is one field here, and the code that uses it. Settings that need
the VAE to be checked (an image size its encoder cannot take) are the stage's to refuse. Nothing
heavy is imported here: the CLI makes and checks one before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from revq_pipe.pipeline.device import DEVICE_HELP, DEVICES, known_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import OVERWRITE_HELP, StageConfig, setting, switch
from revq_pipe.pipeline.preflight import LATENT_DTYPES, latent_dtype

# workers: PIL in the DataLoader processes; device: JPEGs decoded by torchvision on the encoding
# device (nvJPEG on a GPU), whose pixels differ from PIL's by a level here and there.
DECODE_PLACES = ("workers", "device")


def decode_place(decode_on: str) -> None:
    if decode_on not in DECODE_PLACES:
        raise UserError(f"`decode_on` must be one of {', '.join(DECODE_PLACES)}, not {decode_on!r}")


@dataclass(frozen=True)
class EncodeConfig(StageConfig):
    """How to encode a source: every setting of `encode` (its CLI options, in their order), and
    `progress`, which is how a Python caller's run shows itself rather than what it writes (the CLI
    always shows its progress bars). None for `image_size`, `workers`, `chunk_size`: the default the
    help states, decided when the VAE and the machine are known.

        EncodeConfig(batch_size=32, dtype="float32", flip=True)
    """

    stage = "encode"

    image_size: int | None = setting("Square input size S (default: the VAE's native size, 256 for DC-AE, 64 for "
                                     "the embedded VAE).", None, metavar="S")
    batch_size: int = setting("Images per VAE batch.", 64, metavar="N", minimum=1)
    device: str = setting(DEVICE_HELP + ".", "auto", metavar="|".join(DEVICES), validate=known_device)
    dtype: str = setting("Storage dtype of the latents. Compute is bf16 autocast on CUDA (float32 on the CPU); "
                         "--dtype float32 computes in float32 too.", "float16", choices=LATENT_DTYPES,
                         validate=latent_dtype)
    workers: int | None = setting("DataLoader worker processes that decode images (default: CPU count, at most 16; "
                                  "with --cluster, per dask worker: its machine's CPUs shared among its dask "
                                  "workers; 0: in the encoding process).", None, metavar="N", minimum=0)
    overwrite: bool = switch(OVERWRITE_HELP, "--overwrite")
    flip: bool = switch("Also store each image's horizontally flipped latent (latents_flip), which fit uses as "
                        "augmentation; twice the encoder work.", "--flip")
    follow_links: bool = switch("Follow links in an image folder that lead out of it (by default they are skipped, "
                                "with a warning).", "--follow-links")
    decode_on: str = setting("Where JPEGs are decoded: in the worker processes (PIL), or on the encoding device "
                             "(torchvision's decode_jpeg: nvJPEG on a GPU), for when the CPUs cannot feed the GPU; "
                             "pixels then differ by a level here and there, so the store records it. Other formats "
                             "decode in the workers either way.", "workers", choices=DECODE_PLACES,
                             validate=decode_place)
    compile_encoder: bool = switch("Run the encoder under torch.compile (faster on a GPU after a minute or more of "
                                   "compiling; latents differ by rounding).", "--compile")
    # Not in the settings fingerprint: a resumed store keeps the chunks it has.
    chunk_size: int | None = setting("Rows per Zarr chunk of a new store: the unit of work --cluster shares out "
                                     "(default: about 4 MB of latents; a resumed store keeps its own).", None,
                                     metavar="N", minimum=1)
    progress: bool = True
