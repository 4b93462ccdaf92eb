"""--cluster local:2 when dask worker processes die: while the cluster starts (it is started again,
or after three tries the command ends with one line and the same command then goes on), and in
the middle of a task (dask runs it again elsewhere). Each death is placed by a worker preload
(tests/worker_faults.py) at a known moment, and each result equals a single-process run's. The
commands run in this process; their workers are processes of their own, as in any --cluster run."""

import shutil
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.encode import encode
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.stages.fit import fit
from test_cluster import arrays  # every array of a store, read whole

pytestmark = pytest.mark.slow

PRELOAD = str(Path(__file__).parent / "worker_faults.py")
COUNT, CHUNK = 96, 8


@pytest.fixture
def faults(monkeypatch):
    """`faults(fault, once)`: the workers of the local clusters started from then on die at `fault`
    (each one, or only the first when `once` names a file); `faults(None)`: none die. The fault
    reaches each worker process as environment variables its nanny sets (dask's
    distributed.nanny.environ), the preload as dask's distributed.worker.preload."""
    monkeypatch.setitem(dask.config.get("distributed.worker"), "preload", [PRELOAD])

    def place(fault: str | None, once: Path | None = None) -> None:
        environ = {"REVQ_TEST_WORKER_FAULT": fault or ""}
        if once is not None:
            environ["REVQ_TEST_WORKER_FAULT_ONCE"] = str(once)
        monkeypatch.setitem(dask.config.get("distributed.nanny"), "environ", environ)

    return place


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


def export_on_cluster(fitted, out: Path):
    """`revq-pipe export-tokens ... --cluster local:2`, run here; its Result (exit_code, output)."""
    return CliRunner().invoke(app, ["export-tokens", fitted["run"], fitted["store"], "--out", str(out), "--cluster",
                                    "local:2", "--device", "cpu", "--batch-size", "8"])


def test_a_worker_that_dies_while_the_cluster_starts_is_started_again(fitted, tmp_path, faults):
    faults("start", once=tmp_path / "died")
    done = export_on_cluster(fitted, tmp_path / "tokens.zarr")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "died").exists()  # the fault did happen
    assert "a dask worker process died while the local cluster started" in done.output
    assert_same_arrays(tmp_path / "tokens.zarr", fitted["single"])


def test_workers_that_die_at_every_start_end_in_one_line_and_the_same_command_goes_on(fitted, tmp_path, faults):
    out = tmp_path / "tokens.zarr"
    faults("start")
    done = export_on_cluster(fitted, out)
    assert done.exit_code == 2, done.output
    errors = [line for line in done.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the local dask cluster could not start" in errors[0], done.output
    assert "Traceback" not in done.output
    faults(None)
    again = export_on_cluster(fitted, out)
    assert again.exit_code == 0, again.output
    assert_same_arrays(out, fitted["single"])


def test_a_worker_killed_in_the_middle_of_an_export_task_leaves_the_same_token_store(fitted, tmp_path, faults):
    faults("call:revq_pipe.pipeline.storage.token_store:TokenStore.write:2", once=tmp_path / "died")
    done = export_on_cluster(fitted, tmp_path / "tokens.zarr")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "died").exists()
    assert_same_arrays(tmp_path / "tokens.zarr", fitted["single"])


def test_a_worker_killed_in_the_middle_of_an_encode_task_leaves_the_same_store(photo_folder, tiny_dc_vae_dir,
                                                                              tmp_path, faults):
    options = dict(vae=str(tiny_dc_vae_dir), image_size=TINY_IMAGE_SIZE, batch_size=1, workers=0, chunk_size=1,
                   progress=False)
    faults("call:revq_pipe.pipeline.scaleout.staged_encode:Piece.write_to:3", once=tmp_path / "died")
    encode(str(photo_folder), str(tmp_path / "two.zarr"), cluster="local:2", **options)
    assert (tmp_path / "died").exists()
    faults(None)
    encode(str(photo_folder), str(tmp_path / "single.zarr"), **options)
    assert_same_arrays(tmp_path / "two.zarr", tmp_path / "single.zarr")


def test_a_nan_row_met_by_a_cluster_task_is_one_line_and_the_next_export_runs(fitted, tmp_path):
    """The row is checked as a task reads it (the store's statistics stay finite: they came first);
    the token store this export began is left for the next export to replace."""
    shutil.copytree(fitted["store"], tmp_path / "nan.zarr")
    zarr.open_group(str(tmp_path / "nan.zarr"), mode="r+")["latents"][61, 0, 0, 0] = np.nan
    out = tmp_path / "tokens.zarr"
    done = export_on_cluster({**fitted, "store": str(tmp_path / "nan.zarr")}, out)
    assert done.exit_code == 2, done.output
    errors = [line for line in done.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "row 61 (key 'c1/061.jpg') holds NaN or inf latents" in errors[0], done.output
    again = CliRunner().invoke(app, ["export-tokens", fitted["run"], fitted["store"], "--out", str(out), "--device",
                                     "cpu", "--batch-size", "8"])
    assert again.exit_code == 0, again.output
    assert_same_arrays(out, fitted["single"])
