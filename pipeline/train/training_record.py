"""The run dir's training record, `training.json`: where a run's training data came from, how `fit`
trained, and what a published model card says about it.

    {"data":       {"url": absolute store URL, "count": N, "revq": the store's attrs (VAE, classes, ...)},
     "val":        {"url": ..., "count": ...} or null,
     "fit_config": the FitConfig as given (preset, device, the settings set), as of the last start or resume,
     "train":      the TrainConfig it resolved to}

It lives beside config.json rather than in it because it holds local paths (store locations, a
VAE folder): config.json describes the model alone, so `push_to_hub` publishes config.json, the
weights and a model card, never this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from revq_pipe.pipeline.atomic_files import write_json
from revq_pipe.pipeline.train.checkpoint import METRICS_NAME
from revq_pipe.pipeline.errors import UserError

RECORD_NAME = "training.json"


def write_training_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write RUN/training.json atomically (temp file + rename)."""
    write_json(run_dir / RECORD_NAME, record, indent=2)


def read_training_record(run_dir: str | Path) -> dict[str, Any]:
    """RUN/training.json, or {} for a model without one (a hub download, a model built by hand).

    Runs written before the record existed kept its `data` and `train` sections in config.json;
    those are read from there, so older runs keep working.
    """
    run_dir = Path(run_dir)
    path = run_dir / RECORD_NAME
    if path.is_file():
        return _read_json(path)
    config = run_dir / "config.json"
    if config.is_file():
        legacy = _read_json(config)
        return {key: legacy[key] for key in ("data", "train") if key in legacy}
    return {}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """RUN/metrics.jsonl as a list (one dict per completed epoch); [] when there is none."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_summary(run_dir: str | Path) -> dict[str, Any]:
    """What a model card tells about training, without local paths: the training store's size,
    its class count, the epochs done and the last epoch's metrics ({} when the run has no record)."""
    record, metrics = read_training_record(run_dir), read_metrics(run_dir)
    data = record.get("data") or {}
    summary: dict[str, Any] = {}
    if "count" in data:
        summary["train_count"] = data["count"]
    classes = (data.get("revq") or {}).get("classes")
    if classes:
        summary["classes"] = len(classes)
    if metrics:
        summary["epochs"] = len(metrics)
        summary["final"] = metrics[-1]
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
