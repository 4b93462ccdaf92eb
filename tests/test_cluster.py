"""--cluster on real dask.distributed clusters of worker processes: encode and export-tokens write the
stores a single process writes, array for array, also when a worker is killed mid-run and when the
whole job is killed and run again.

Float sums on the CPU round by thread count, and the promise holds at equal counts: every worker
here computes with the one torch thread of the in-process runs (conftest), except the CLI's
`local:2` workers, which get half the cores each: their store is compared with one process at
that count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import webdataset as wds
import zarr
from typer.testing import CliRunner

from conftest import PHOTO_CLASSES, TINY_IMAGE_SIZE, TORCH_THREADS, torch_threads
from revq_pipe.cli import app
from revq_pipe.pipeline.scaleout.chunk_tasks import task_runs
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.sample_images import photo_crops, write_image_folder
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.stages.encode import encode
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit
from test_encode import damaged_folder

SMALL = dict(image_size=TINY_IMAGE_SIZE, batch_size=3, workers=0, chunk_size=4, progress=False)
# One image per block and per chunk: many small pieces, so a kill lands while work remains.
FINE = dict(image_size=TINY_IMAGE_SIZE, batch_size=1, workers=0, chunk_size=1, progress=False)
MANY_PHOTOS = 24
runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, which the commands under test reach by its address."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      env={"OMP_NUM_THREADS": str(TORCH_THREADS)}) as local, Client(local) as client:
        yield client


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many") / "photos"
    write_image_folder(root, photo_crops(PHOTO_CLASSES, MANY_PHOTOS, seed=1, out_size=48))
    return root


@pytest.fixture(scope="module")
def many_photos_in_one_process(many_photos, tiny_dc_vae_dir, tmp_path_factory) -> Path:
    """`many_photos` encoded with FINE settings without --cluster: what every cluster run of them must write."""
    out = tmp_path_factory.mktemp("many") / "single.zarr"
    encode(str(many_photos), str(out), vae=str(tiny_dc_vae_dir), **FINE)
    return out


def arrays(url) -> dict:
    """Every array of a store (a latent or token store), read whole."""
    group = zarr.open_group(str(url), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def assert_same_store(got, expected) -> None:
    """Same arrays, same values, same attrs but for how the encoder ran."""
    a, b = arrays(got), arrays(expected)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    attrs_a = dict(zarr.open_group(str(got)).attrs["revq"])
    attrs_b = dict(zarr.open_group(str(expected)).attrs["revq"])
    assert {**attrs_a, "encoder": None} == {**attrs_b, "encoder": None}
    assert list(zarr.open_group(str(got)).group_keys()) == []  # the staging is gone


def shards_with_bad_samples(photo_folder: Path, out: Path) -> str:
    """The photos as webdataset shards of 5 samples, with a truncated JPEG and a sample without an image."""
    files = sorted(photo_folder.rglob("*.jpg"))
    out.mkdir()
    with wds.ShardWriter(str(out / "s-%06d.tar"), maxcount=5, verbose=0) as sink:
        for i, path in enumerate(files):
            data = path.read_bytes()
            sink.write({"__key__": f"{i:03d}", "jpg": data[: len(data) // 3] if i == 4 else data, "cls": str(i % 3)})
            if i == 7:
                sink.write({"__key__": "no-image", "txt": b"nothing to see"})
    return str(out / f"s-{{000000..{len(list(out.glob('*.tar'))) - 1:06d}}}.tar")


def test_task_runs_cut_consecutive_numbers_into_about_four_tasks_per_worker():
    assert task_runs([], 2) == []
    assert task_runs(list(range(8)), 2) == [[i] for i in range(8)]
    assert task_runs(list(range(17)), 2) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 16]]
    assert task_runs([0, 1, 4, 5, 6, 9], 1) == [[0, 1], [4, 5], [6], [9]]  # a gap ends a run


def test_encode_with_skipped_images_on_two_workers_equals_a_single_process(photo_folder, tiny_dc_vae_dir, tmp_path,
                                                                          cluster):
    source, bad = damaged_folder(photo_folder, tmp_path / "photos")
    options = dict(vae=str(tiny_dc_vae_dir), **SMALL)
    single = encode(str(source), str(tmp_path / "single.zarr"), **options)
    distributed = encode(str(source), str(tmp_path / "two.zarr"), cluster=cluster.scheduler.address, **options)
    assert_same_store(tmp_path / "two.zarr", tmp_path / "single.zarr")
    attrs = LatentStore.open(str(tmp_path / "two.zarr")).attrs
    assert sorted(attrs["skipped_keys"]) == sorted(bad) and attrs["count"] == single.count == 15
    assert attrs["encoder"]["cluster"] == cluster.scheduler.address and attrs["encoder"]["dask_workers"] == 2
    assert distributed.encoded == 15 and "on 2 dask workers" in distributed.report()
    again = encode(str(source), str(tmp_path / "two.zarr"), cluster=cluster.scheduler.address, **options)
    assert again.already_complete


def test_encode_of_shards_with_flipped_latents_on_two_workers_equals_a_single_process(photo_folder, tiny_dc_vae_dir,
                                                                                     tmp_path, cluster):
    shards = shards_with_bad_samples(photo_folder, tmp_path / "shards")
    options = dict(vae=str(tiny_dc_vae_dir), flip=True, **{**SMALL, "batch_size": 2, "chunk_size": 3})
    encode(shards, str(tmp_path / "single.zarr"), **options)
    encode(shards, str(tmp_path / "two.zarr"), cluster=cluster.scheduler.address, **options)
    assert_same_store(tmp_path / "two.zarr", tmp_path / "single.zarr")
    store = LatentStore.open(str(tmp_path / "two.zarr"))
    assert store.has_flip and len(store) == 11 and store.attrs["skipped_keys"] == ["004", "no-image"]


def test_an_unreadable_shard_stops_the_job_with_its_reason(photo_shards, tiny_dc_vae_dir, tmp_path, cluster):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, shard in enumerate(sorted(Path(photo_shards).parent.glob("*.tar"))):
        (shards / f"s-{i:06d}.tar").write_bytes(shard.read_bytes() if i != 1 else b"not a tar archive" * 40)
    with pytest.raises(UserError, match="cannot read webdataset shard .*s-000001.tar"):
        encode(str(shards / "s-{000000..000002}.tar"), str(tmp_path / "s.zarr"), vae=str(tiny_dc_vae_dir),
               cluster=cluster.scheduler.address, **SMALL)


def test_cli_local_cluster_decodes_in_dataloader_processes_of_its_workers(photo_folder, tiny_dc_vae_dir, tmp_path):
    common = [photo_folder, "--vae", tiny_dc_vae_dir, "--image-size", TINY_IMAGE_SIZE, "--batch-size", 4]
    worker_threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the README: each of N local workers gets cores / N
    with torch_threads(worker_threads):
        single = runner.invoke(app, ["encode", *map(str, common), "--out", str(tmp_path / "single.zarr"),
                                     "--workers", "0"])
    assert single.exit_code == 0, single.output
    # dask's own way to start workers, a fresh interpreter each, as a user's `--cluster local:2` gets
    # (the other tests fork theirs from a preloaded forkserver: tests/forked_workers.py).
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
        result = runner.invoke(app, ["encode", *map(str, common), "--out", str(tmp_path / "two.zarr"), "--workers",
                                     "1", "--cluster", "local:2"])
    assert result.exit_code == 0, result.output
    assert "encode on 2 dask workers" in result.output and "images/s on 2 dask workers" in result.output
    assert_same_store(tmp_path / "two.zarr", tmp_path / "single.zarr")
    assert LatentStore.open(str(tmp_path / "two.zarr")).attrs["encoder"]["workers"] == 1


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A latent store of 600 rows in chunks of 8, and a tiny run fitted on it."""
    root = tmp_path_factory.mktemp("fitted")
    rng = np.random.default_rng(0)
    latents = (rng.normal(size=(600, 16, 4, 4)) * rng.uniform(0.5, 2, size=(16, 4, 4))).astype(np.float16)
    store = write_latent_store(str(root / "latents.zarr"), latents, np.arange(600) % 3,
                               [f"class{i % 3}/img.{i:04d}.jpg" for i in range(600)], chunk_size=8,
                               attrs={"vae": "test-vae", "image_size": 32})
    config = FitConfig.from_preset("tiny", codes=32, epochs=1, batch_size=64, device="cpu")
    fit(store.url, str(root / "run"), config, progress=False)
    reference = str(root / "single.zarr")
    export_tokens(str(root / "run"), store.url, reference, device="cpu", progress=False, format="zarr+wds",
                  shard_size=128)
    return store, root / "run", reference


def test_export_on_two_workers_equals_a_single_process(fitted, tmp_path, cluster):
    store, run, reference = fitted
    out = str(tmp_path / "two.zarr")
    summary = export_tokens(str(run), store.url, out, device="cpu", progress=False, format="zarr+wds", shard_size=128,
                            cluster=cluster.scheduler.address)
    assert summary.count == 600 and len(summary.shards) == 5
    assert_same_store(out, reference)
    for shard in sorted(Path(f"{reference}-wds").iterdir()):
        assert (Path(f"{out}-wds") / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_bad_cluster_usage_exits_2_with_one_line(photo_folder, tiny_dc_vae_dir, fitted, tmp_path, memory_root,
                                                 monkeypatch):
    store, run, _ = fitted
    monkeypatch.setattr("revq_pipe.pipeline.scaleout.cluster.CONNECT_TIMEOUT_S", 1)  # nothing listens on port 9
    encode_args = ["encode", str(photo_folder), "--vae", str(tiny_dc_vae_dir), "--out", str(tmp_path / "s.zarr"),
                   "--cluster"]
    for args, reason in [
        (encode_args + ["bogus"], "--cluster takes local, local:N or a scheduler address"),
        (encode_args + ["local:0"], "at least one worker"),
        (encode_args + ["tcp://127.0.0.1:9"], "cannot reach the dask scheduler at tcp://127.0.0.1:9"),
        (["encode", str(photo_folder), "--vae", str(tiny_dc_vae_dir), "--out", f"{memory_root}/s.zarr", "--cluster",
          "local"], "memory"),
        (["export-tokens", str(run), store.url, "--out", str(tmp_path / "t"), "--format", "wds", "--cluster", "local"],
         "--cluster writes a token store"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], (args, result.stderr)


def start_job(preloaded, call: str, *args, logs, **kwargs):
    """A `--cluster local:2` job in a child process of its own session, so that it and its dask
    workers die together. On 2 CPUs, so that its workers compute with one torch thread each, as
    the `cluster` fixture's that resume it and the in-process runs."""
    return preloaded.start(call, *args, logs=logs, cpus=2, forkserver=True, cluster="local:2", **kwargs)


def kill_when(job, ready, timeout_s: float = 240) -> None:
    """SIGKILL the job's whole session once `ready()` holds; fail if it ended before."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if job.poll() is not None:
            pytest.fail(f"the job ended before it could be killed: {job.stderr[-2000:]}")
        assert time.monotonic() < deadline, "the job never got far enough to be killed"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL


def staged_pieces(store: Path) -> int:
    return sum(1 for piece in (store / "staging").glob("*/zarr.json") if '"piece"' in piece.read_text())


@pytest.mark.slow
def test_killed_encode_job_resumes_to_the_identical_store(many_photos, many_photos_in_one_process, tiny_dc_vae_dir,
                                                          tmp_path, cluster, preloaded):
    options = dict(vae=str(tiny_dc_vae_dir), **FINE)
    out = tmp_path / "two.zarr"
    job = start_job(preloaded, "revq_pipe.stages.encode:encode", str(many_photos), str(out), logs=tmp_path / "job",
                    **options)
    kill_when(job, lambda: staged_pieces(out) >= 3)
    with pytest.raises(UserError, match="incomplete"):
        LatentStore.open(str(out))
    with pytest.raises(UserError, match="being written by an encode with `cluster`"):
        encode(str(many_photos), str(out), **options)

    staged = staged_pieces(out)
    resumed = encode(str(many_photos), str(out), cluster=cluster.scheduler.address, **options)
    assert resumed.encoded <= MANY_PHOTOS - staged and resumed.resumed_rows >= staged
    assert_same_store(out, many_photos_in_one_process)


@pytest.mark.slow
def test_killed_export_job_resumes_to_the_identical_token_store(fitted, tmp_path, cluster, preloaded):
    store, run, reference = fitted
    out = tmp_path / "two.zarr"
    job = start_job(preloaded, "revq_pipe.stages.export_tokens:export_tokens", str(run), store.url, str(out),
                    logs=tmp_path / "job", device="cpu", progress=False)
    kill_when(job, lambda: len(list((out / "chunks_done" / "c").glob("*"))) >= 5)
    with pytest.raises(UserError, match="being written by an export-tokens with `cluster`"):
        export_tokens(str(run), store.url, str(out), device="cpu", progress=False)
    export_tokens(str(run), store.url, str(out), device="cpu", progress=False, cluster=cluster.scheduler.address)
    assert_same_store(out, reference)
    assert TokenStore.open(str(out)).complete


@contextlib.contextmanager
def on_one_cpu():
    """This thread runs on one CPU in the block: the local clusters it starts give each worker
    cores / workers = 1 torch thread, as this process computes with (conftest)."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


@pytest.mark.slow
def test_bench_cluster_times_one_and_two_workers_and_finds_their_stores_equal():
    with on_one_cpu():  # local:1's worker would otherwise take every core, local:2's half each
        result = runner.invoke(app, ["bench", "cluster", "--images", "48", "--chunk-size", "8", "--codes", "64",
                                     "--repeats", "1"])
    assert result.exit_code == 0, result.output
    for row in ("encode one process (no --cluster)", "encode --cluster local:1", "encode --cluster local:2",
                "export-tokens one process (no --cluster)", "export-tokens --cluster local:1",
                "export-tokens --cluster local:2"):
        assert row in result.output
    assert "every store equals the single-process encode's and export's: yes" in result.output


@pytest.mark.slow
def test_a_worker_killed_mid_run_still_yields_the_identical_store(many_photos, many_photos_in_one_process,
                                                                  tiny_dc_vae_dir, tmp_path, cluster):
    """Runs last in this module: the killed worker's nanny starts a new one, but it takes a while."""
    options = dict(vae=str(tiny_dc_vae_dir), **FINE)
    out = tmp_path / "two.zarr"
    pids = cluster.run(os.getpid)
    killed: list[tuple[str, list[str]]] = []

    def kill_a_busy_worker():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            busy = {worker: [str(key) for key in keys] for worker, keys in cluster.processing().items()
                    if any(str(key).startswith("encode-") for key in keys)}
            if busy and (out / "staging").is_dir() and staged_pieces(out) >= 2:
                worker = sorted(busy)[0]
                os.kill(pids[worker], signal.SIGKILL)
                killed.append((worker, busy[worker]))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    summary = encode(str(many_photos), str(out), cluster=cluster.scheduler.address, **options)
    killer.join()
    assert killed, "no worker was busy with an encode task while pieces were being staged"
    # Its tasks were finished by another worker process: the killed one never came back.
    assert killed[0][0] not in cluster.scheduler_info(n_workers=-1)["workers"]
    assert summary.count == MANY_PHOTOS
    assert_same_store(out, many_photos_in_one_process)
