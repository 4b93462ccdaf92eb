"""--cluster local:2 when dask worker processes die: while the cluster starts (it is started again,
or after three tries the command ends with one line and the same command then goes on), and in
the middle of a task (dask runs it again elsewhere). Each death is placed by a worker preload
(tests/worker_faults.py) at a known moment, and each result equals a single-process run's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import TINY_IMAGE_SIZE
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.encode import encode
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.stages.fit import fit

pytestmark = pytest.mark.slow

REVQ_PIPE = str(Path(sys.executable).parent / "revq-pipe")
PRELOAD = str(Path(__file__).parent / "worker_faults.py")
COUNT, CHUNK = 96, 8


def faulty_env(fault: str, once: Path | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REVQ_TEST_WORKER_FAULT": fault,
           "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([PRELOAD])}
    if once is not None:
        env["REVQ_TEST_WORKER_FAULT_ONCE"] = str(once)
    return env


def arrays(url) -> dict:
    group = zarr.open_group(str(url), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def assert_same_arrays(a, b) -> None:
    got, expected = arrays(a), arrays(b)
    assert sorted(got) == sorted(expected)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-faults")
    latents = np.random.default_rng(0).normal(size=(COUNT, 16, 4, 4)).astype(np.float32)
    store = write_latent_store(str(root / "latents.zarr"), latents, np.arange(COUNT) % 3,
                               [f"c{i % 3}/{i:03d}.jpg" for i in range(COUNT)], chunk_size=CHUNK)
    fit(store.url, str(root / "run"), FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=16, device="cpu"),
        progress=False)
    export_tokens(str(root / "run"), store.url, str(root / "single.zarr"), device="cpu", progress=False)
    return {"store": store.url, "run": str(root / "run"), "single": root / "single.zarr"}


def export_on_cluster(fitted, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [REVQ_PIPE, "export-tokens", fitted["run"], fitted["store"], "--out", str(out), "--cluster", "local:2",
            "--device", "cpu", "--batch-size", "8"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_worker_that_dies_while_the_cluster_starts_is_started_again(fitted, tmp_path):
    done = export_on_cluster(fitted, tmp_path / "tokens.zarr", faulty_env("start", once=tmp_path / "died"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "died").exists()  # the fault did happen
    assert "a dask worker process died while the local cluster started" in done.stderr
    assert_same_arrays(tmp_path / "tokens.zarr", fitted["single"])


def test_workers_that_die_at_every_start_end_in_one_line_and_the_same_command_goes_on(fitted, tmp_path):
    out = tmp_path / "tokens.zarr"
    done = export_on_cluster(fitted, out, faulty_env("start", once=None))
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the local dask cluster could not start" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    again = export_on_cluster(fitted, out)
    assert again.returncode == 0, again.stderr
    assert_same_arrays(out, fitted["single"])


def test_a_worker_killed_in_the_middle_of_an_export_task_leaves_the_same_token_store(fitted, tmp_path):
    fault = "call:revq_pipe.pipeline.storage.token_store:TokenStore.write:2"
    done = export_on_cluster(fitted, tmp_path / "tokens.zarr", faulty_env(fault, once=tmp_path / "died"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "died").exists()
    assert_same_arrays(tmp_path / "tokens.zarr", fitted["single"])


def test_a_worker_killed_in_the_middle_of_an_encode_task_leaves_the_same_store(photo_folder, tiny_dc_vae_dir,
                                                                              tmp_path):
    options = dict(vae=str(tiny_dc_vae_dir), image_size=TINY_IMAGE_SIZE, batch_size=1, workers=0, chunk_size=1,
                   progress=False)
    code = (f"from revq_pipe.stages.encode import encode\n"
            f"encode({str(photo_folder)!r}, {str(tmp_path / 'two.zarr')!r}, cluster='local:2', **{options!r})")
    fault = "call:revq_pipe.pipeline.scaleout.staged_encode:Piece.write_to:3"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=faulty_env(fault, once=tmp_path / "died"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "died").exists()
    encode(str(photo_folder), str(tmp_path / "single.zarr"), **options)
    assert_same_arrays(tmp_path / "two.zarr", tmp_path / "single.zarr")


def test_a_nan_row_met_by_a_cluster_task_is_one_line_and_the_next_export_runs(fitted, tmp_path):
    """The row is checked as a task reads it (the store's statistics stay finite: they came first);
    the token store this export began is left for the next export to replace."""
    shutil.copytree(fitted["store"], tmp_path / "nan.zarr")
    zarr.open_group(str(tmp_path / "nan.zarr"), mode="r+")["latents"][61, 0, 0, 0] = np.nan
    out = tmp_path / "tokens.zarr"
    done = export_on_cluster({**fitted, "store": str(tmp_path / "nan.zarr")}, out)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "row 61 (key 'c1/061.jpg') holds NaN or inf latents" in errors[0], done.stderr
    again = subprocess.run([REVQ_PIPE, "export-tokens", fitted["run"], fitted["store"], "--out", str(out), "--device",
                            "cpu", "--batch-size", "8"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert_same_arrays(out, fitted["single"])
