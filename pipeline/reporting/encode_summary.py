"""What one `encode` did, as the paragraph the CLI prints: images encoded, latents stored, skipped
samples, compression and speed (stages/encode.py fills it in)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from revq_pipe.pipeline.reporting.console import human_bytes


@dataclass
class EncodeSummary:
    """What one `encode` call did; `report()` is the paragraph the CLI prints."""

    store: str
    source: str
    vae: str
    image_size: int
    latent_shape: tuple[int, int, int]
    dtype: str
    compute: str
    count: int
    encoded: int
    resumed_rows: int
    skipped: list[tuple[str, str]]
    stored_bytes: int
    seconds: float
    already_complete: bool = False
    flip: bool = False  # the store holds each image's flipped latent too
    cluster: str | None = None  # the dask cluster that encoded, in words

    @property
    def raw_bytes(self) -> int:
        views = 2 if self.flip else 1
        return views * self.count * int(np.prod(self.latent_shape)) * np.dtype(self.dtype).itemsize

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("nan")

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")

    def report(self) -> str:
        shape = "x".join(map(str, self.latent_shape))
        if self.already_complete:
            return (f"{self.store} is already complete: {self.count} latents ({shape}, {self.dtype}) "
                    f"from {self.source}; nothing to do (--overwrite re-encodes).")
        resumed = f" (resumed after {self.resumed_rows} stored rows)" if self.resumed_rows else ""
        skipped = f"{len(self.skipped)} skipped"
        if self.skipped:
            shown = "; ".join(f"{key}: {reason}" for key, reason in self.skipped[:5])
            more = f"; and {len(self.skipped) - 5} more (all in the store's attrs)" if len(self.skipped) > 5 else ""
            skipped += f" ({shown}{more})"
        flipped = " (and their flipped images')" if self.flip else ""
        return (f"Encoded {self.encoded} images from {self.source} with {self.vae} at {self.image_size} px"
                f"{resumed}: {self.count} latents{flipped} of {shape} stored as {self.dtype} (computed in "
                f"{self.compute}) in {self.store}, "
                f"{skipped}. Latents take {human_bytes(self.stored_bytes)} for {human_bytes(self.raw_bytes)} raw "
                f"(compression {self.compression_ratio:.2f}x); {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} images/s{f' on {self.cluster}' if self.cluster else ''}.")
