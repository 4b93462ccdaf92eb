"""LPIPS and rFID, computed only when their pretrained networks are already on this machine.

Both need weights this package does not ship and must not download in the middle of an eval:
LPIPS (the `lpips` package) needs torchvision's AlexNet weights, rFID (`pytorch-fid`) its
Inception weights, each in torch's hub cache. When something is missing the metric is skipped,
with the reason, instead of failing the evaluation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's file name, as lpips loads it
FID_INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's file name


def _cached_weights(name: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


class PerceptualMetrics:
    """Accumulates LPIPS and rFID of reconstructions against originals over any number of batches.

    `skipped` maps each metric that cannot run here to the reason; `update` and `result` cover
    the others.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped: dict[str, str] = {}
        self.lpips_model = self._load_lpips()
        self.inception = self._load_inception()
        self.lpips_values: list[np.ndarray] = []
        self.features: dict[str, list[np.ndarray]] = {"originals": [], "reconstructions": []}

    def _load_lpips(self):
        if importlib.util.find_spec("lpips") is None:
            self.skipped["lpips"] = "skipped (the lpips package is not installed)"
            return None
        if _cached_weights(ALEXNET_WEIGHTS) is None:
            self.skipped["lpips"] = f"skipped (no AlexNet weights {ALEXNET_WEIGHTS} in torch's hub cache)"
            return None
        import lpips

        return lpips.LPIPS(net="alex", verbose=False).to(self.device).eval()

    def _load_inception(self):
        if importlib.util.find_spec("pytorch_fid") is None:
            self.skipped["rfid"] = "skipped (the pytorch-fid package is not installed)"
            return None
        if _cached_weights(FID_INCEPTION_WEIGHTS) is None:
            self.skipped["rfid"] = f"skipped (no Inception weights {FID_INCEPTION_WEIGHTS} in torch's hub cache)"
            return None
        from pytorch_fid.inception import InceptionV3

        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(self.device).eval()

    @torch.inference_mode()
    def update(self, originals: np.ndarray, reconstructions: np.ndarray) -> None:
        """Add a batch of uint8 (N, S, S, 3) originals and their reconstructions."""
        if self.lpips_model is None and self.inception is None:
            return
        pair = [torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(self.device)
                for images in (originals, reconstructions)]
        if self.lpips_model is not None:  # lpips takes images in [-1, 1]
            self.lpips_values.append(self.lpips_model(pair[0] * 2 - 1, pair[1] * 2 - 1).flatten().cpu().numpy())
        if self.inception is not None:  # pytorch-fid's Inception takes [0, 1] and resizes to 299 itself
            for name, images in zip(self.features, pair):
                self.features[name].append(self.inception(images)[0].flatten(1).cpu().double().numpy())

    def result(self) -> dict[str, float]:
        """Mean LPIPS and rFID over everything added (only the metrics that ran)."""
        values: dict[str, float] = {}
        if self.lpips_values:
            values["lpips"] = float(np.concatenate(self.lpips_values).mean())
        if self.features["originals"]:
            from pytorch_fid.fid_score import calculate_frechet_distance

            stats = [(f.mean(axis=0), np.cov(f, rowvar=False))
                     for f in (np.concatenate(self.features[name]) for name in self.features)]
            values["rfid"] = float(calculate_frechet_distance(*stats[0], *stats[1]))
        return values
