"""Leases on outputs (pipeline/lease.py): one job writes at a time, tasks of one job share, a dead
holder's lease is taken over; and the stages hold them (a second writer exits 2)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import JOB_ENV, LEASE_NAME, Lease, LeaseHeld, output_lease
from revq_pipe.pipeline.storage.store import write_latent_store

runner = CliRunner()

# A child that takes the lease on argv[1] as job argv[2], says so on stdout, then waits to be killed.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    os.environ["REVQ_JOB_ID"] = sys.argv[2]
    from revq_pipe.pipeline.lease import Lease
    lease = Lease.acquire(Path(sys.argv[1]), "test-holder")
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder():
    """Start a real process holding a lease; SIGKILL it at the end of the test (or earlier)."""
    children = []

    def start(folder, job):
        child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), job], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "held"
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()


def test_a_second_job_is_refused_while_the_first_holds_the_lease(tmp_path, holder, monkeypatch):
    child = holder(tmp_path / "out", "job-a")
    monkeypatch.setenv(JOB_ENV, "job-b")
    with pytest.raises(LeaseHeld, match=rf"test-holder` \(pid {child.pid} on "):
        Lease.acquire(tmp_path / "out", "encode")


def test_tasks_of_one_job_share_the_lease_and_the_last_removes_it(tmp_path, holder, monkeypatch):
    child = holder(tmp_path / "out", "job-a")
    monkeypatch.setenv(JOB_ENV, "job-a")
    with Lease.acquire(tmp_path / "out", "encode"):
        record = json.loads((tmp_path / "out" / LEASE_NAME).read_text())
        assert record["job"] == "job-a"
    assert (tmp_path / "out" / LEASE_NAME).exists()  # the other task still holds it
    child.kill()
    child.wait()
    with Lease.acquire(tmp_path / "out", "encode"):  # the other task's death ended its share
        pass
    assert not (tmp_path / "out" / LEASE_NAME).exists()


def test_a_killed_holders_lease_is_stale_and_taken_over(tmp_path, holder, monkeypatch):
    child = holder(tmp_path / "out", "job-a")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["pid"] == child.pid  # left behind
    monkeypatch.setenv(JOB_ENV, "job-b")
    with Lease.acquire(tmp_path / "out", "encode"):
        record = json.loads((tmp_path / "out" / LEASE_NAME).read_text())
        assert (record["job"], record["pid"], record["command"]) == ("job-b", os.getpid(), "encode")


def test_a_lease_removes_the_folder_it_made_when_nothing_was_written(tmp_path):
    with output_lease(tmp_path / "new" / "store.zarr", "encode"):
        assert (tmp_path / "new" / "store.zarr" / LEASE_NAME).is_file()
    assert not (tmp_path / "new" / "store.zarr").exists()
    with output_lease(tmp_path / "kept", "decode"):
        (tmp_path / "kept" / "image.png").write_bytes(b"")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["image.png"]


def test_remote_outputs_are_not_leased(memory_root):
    with output_lease(f"{memory_root}/store.zarr", "encode") as lease:
        assert lease is None


def test_a_lease_on_a_path_through_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        Lease.acquire(tmp_path / "file", "encode")
    with pytest.raises(UserError, match="cannot create .*Not a directory"):
        Lease.acquire(tmp_path / "file" / "store.zarr", "encode")


@pytest.mark.slow
def test_a_second_encode_on_one_store_exits_2_and_leaves_the_first_alone(tmp_path, holder, photo_folder,
                                                                         tiny_dc_vae_dir):
    out = tmp_path / "latents.zarr"
    holder(out, "another-job")
    result = runner.invoke(app, ["encode", str(photo_folder), "--out", str(out), "--vae", str(tiny_dc_vae_dir),
                                 "--image-size", str(TINY_IMAGE_SIZE), "--workers", "0"])
    assert result.exit_code == 2
    assert "is being written by another job" in result.output and "test-holder" in result.output
    assert [p.name for p in out.iterdir()] == [LEASE_NAME]  # nothing of the second run


def test_a_second_fit_on_one_run_dir_exits_2(tmp_path, holder):
    rng = np.random.default_rng(0)
    store = write_latent_store(str(tmp_path / "latents.zarr"), rng.normal(size=(64, 16, 4, 4)).astype(np.float32))
    holder(tmp_path / "run", "another-job")
    result = runner.invoke(app, ["fit", store.url, "--out", str(tmp_path / "run"), "--preset", "tiny",
                                 "--codes", "16", "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "is being written by another job" in result.output
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LEASE_NAME]


def test_under_torchrun_only_rank_0_takes_the_run_dirs_lease(tmp_path, holder, monkeypatch):
    """The other ranks of a data-parallel fit never write the run dir: they must not be refused
    by rank 0's lease (here a holder of another job stands in for it), nor take one of their own."""
    rng = np.random.default_rng(0)
    store = write_latent_store(str(tmp_path / "latents.zarr"), rng.normal(size=(64, 16, 4, 4)).astype(np.float32))
    holder(tmp_path / "run", "rank-0-job")
    args = ["fit", store.url, "--out", str(tmp_path / "run"), "--preset", "tiny", "--codes", "16", "--epochs", "1",
            "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 2  # rank 0 (RANK unset or "0") needs the lease
    monkeypatch.setenv("RANK", "1")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
