"""`fit` data-parallel under real `torchrun --nproc-per-node 2` (gloo, CPU): equal to one process on
the same global batch, codebooks bit-identical across ranks at every epoch end, resume after a kill
(with the same and with another number of processes), refusals; and the loader's shares alone."""

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from revq_pipe.pipeline.train.checkpoint import load_checkpoint
from revq_pipe.pipeline.train.distributed import DataParallelGroup
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train import loader as loader_module
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

DRIVER = Path(__file__).with_name("ddp_fit_driver.py")
# The console script pip installed beside this interpreter: found whether or not its venv is on PATH.
REVQ_PIPE = Path(sys.executable).with_name("revq-pipe")
SHAPE = (8, 4, 4)  # T = 32 tokens of d = 4 with the tiny preset
EPOCHS, BATCH = 2, 64  # 4 steps per epoch on 256 latents
TOLERANCE = 1e-5

pytestmark = pytest.mark.slow  # each torchrun start imports torch and diffusers twice


def make_store(url, n, seed, *, chunk_size=256):
    """Latents around 8 centres, each distinct latent 4 times: K=32 codes outnumber what the data
    needs, so the Non-Activation Reset moves codes at every epoch end."""
    centres = np.random.default_rng(123).normal(size=(8, *SHAPE))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n // 4)
    latents = centres[labels] + 0.3 * rng.normal(size=(n // 4, *SHAPE))
    write_latent_store(str(url), np.repeat(latents.astype(np.float32), 4, 0), np.repeat(labels, 4),
                       attrs={"vae": "test-vae", "image_size": 32}, chunk_size=chunk_size)
    return str(url)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {"root": root, "train": make_store(root / "train", 256, 0), "val": make_store(root / "val", 100, 1)}


def fit_kwargs(stores, out, update):
    """fit's arguments as JSON for the driver: its config as `FitConfig.to_dict()`."""
    config = FitConfig.from_preset("tiny", epochs=EPOCHS, batch_size=BATCH, codes=32, device="cpu",
                                   codebook_update=update)
    return dict(store=stores["train"], out=str(out), config=config.to_dict(), val=stores["val"], progress=False)


def fit_in_process(kwargs, **more):
    """fit in this process, with the driver's arguments."""
    return fit(**{**kwargs, "config": FitConfig.from_dict(kwargs["config"]), **more})


def torchrun(*command, log_dir=None):
    """`torchrun --standalone --nproc-per-node 2 COMMAND` (a free port; conftest's thread count)."""
    redirect = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *redirect, *map(str, command)], capture_output=True, text=True, timeout=600)


def driver(spec):
    return torchrun(DRIVER, json.dumps(spec))


def sha256(tensor):
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def weights(run):
    return load_file(Path(run) / "model.safetensors")


def assert_close_weights(a, b, *, exact_codebooks):
    assert a.keys() == b.keys()
    if exact_codebooks:
        assert torch.equal(a["quantizer.codebooks"], b["quantizer.codebooks"])
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= TOLERANCE, key


@pytest.fixture(scope="module")
def two_process_runs(stores):
    """Both codebook updates, 2 epochs, 2 processes; then a run whose rank 1 drifts (fit stops it);
    then a sparse run whose rank 1 is killed (SIGKILL) at the 2nd step of epoch 2, which ends the
    torchrun start. All in one start: each torchrun start imports torch and diffusers in every rank."""
    root = stores["root"]
    runs = [{"name": update, "fit": fit_kwargs(stores, root / f"ddp-{update}", update)}
            for update in ("sparse", "dense")]
    drift = {"name": "drift", "fit": fit_kwargs(stores, root / "ddp-drift", "sparse"), "drift": {"rank": 1}}
    killed = {"name": "killed", "fit": fit_kwargs(stores, root / "killed", "sparse"),
              "kill": {"rank": 1, "step": 4 + 2}}
    done = driver({"record": str(root / "hashes"), "runs": [*runs, drift, killed]})
    assert all(len(json.loads((root / "hashes" / f"{update}-rank{r}.json").read_text())) == EPOCHS
               for update in ("sparse", "dense") for r in (0, 1)), done.stderr[-3000:]
    assert done.returncode != 0 and "-9" in done.stderr, done.stderr[-3000:]  # torchrun reports the signal
    return {"sparse": root / "ddp-sparse", "dense": root / "ddp-dense", "drift": root / "ddp-drift",
            "killed": root / "killed", "hashes": root / "hashes"}


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_two_processes_train_as_one_process_on_the_same_global_batch(stores, two_process_runs, tmp_path, update):
    one = fit_in_process(fit_kwargs(stores, tmp_path / "one", update))
    two = two_process_runs[update]
    # The codebooks see the same global batches and the same update: the same bits. The rectifier's
    # gradients are averaged over two halves instead of one batch: rounding apart.
    assert_close_weights(weights(tmp_path / "one"), weights(two), exact_codebooks=True)
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == EPOCHS
    for mine, theirs in zip(one.history, lines):
        assert mine["codes_reset"] == theirs["codes_reset"] > 0  # counts summed over both processes first
        for key in ("usage_mean_pct", "usage_min_pct", "perplexity", "val_usage_mean_pct", "val_perplexity"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-12), key
        for key in ("codebook_loss", "rectifier_loss", "val_mse", "val_mse_raw", "val_mse_quantizer"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_codebooks_are_bit_identical_on_both_ranks_at_every_epoch_end(stores, two_process_runs, update):
    ranks = [json.loads((stores["root"] / "hashes" / f"{update}-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == EPOCHS and ranks[0] == ranks[1]
    assert len(set(ranks[0])) == EPOCHS  # they did train
    assert ranks[0][-1] == sha256(weights(two_process_runs[update])["quantizer.codebooks"])  # and rank 0 saved them


def test_replicas_that_drift_apart_stop_the_run(two_process_runs):
    for rank in (0, 1):  # every rank's fit raises, so none waits for the other in a collective
        error = (two_process_runs["hashes"] / f"drift-rank{rank}.error").read_text()
        assert error.startswith("RuntimeError: the codebooks after epoch 1 differ across processes"), error
    assert not (two_process_runs["drift"] / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def killed_run(two_process_runs):
    """The sparse run whose rank 1 was killed at the 2nd step of epoch 2: epoch 1's checkpoint."""
    out = two_process_runs["killed"]
    assert load_checkpoint(out, torch.device("cpu"))["epoch"] == 1
    return out


def test_resume_after_a_kill_with_two_processes_ends_as_the_uninterrupted_run(stores, two_process_runs,
                                                                             killed_run, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(killed_run, out)
    kwargs = fit_kwargs(stores, out, "sparse")
    done = torchrun(REVQ_PIPE, "fit", kwargs["store"], "--out", out, "--resume",
                    "--preset", "tiny", "--epochs", EPOCHS, "--batch-size", BATCH, "--codes", 32, "--val",
                    stores["val"], "--device", "cpu", "--codebook-update", "sparse", log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    whole, resumed = weights(two_process_runs["sparse"]), weights(out)
    for key in whole:  # the same processes, the same order of every sum: the same bits
        assert torch.equal(whole[key], resumed[key]), key
    # Rank 0 reports; rank 1 writes nothing to its stdout or stderr.
    logs = {rank: {stream: "".join(p.read_text() for p in (tmp_path / "logs").rglob(f"{rank}/{stream}.log"))
                   for stream in ("stdout", "stderr")} for rank in (0, 1)}
    assert "resuming after epoch 1" in logs[0]["stderr"] and "epoch 2/2" in logs[0]["stderr"]
    assert "fit: " in logs[0]["stdout"]
    assert logs[1] == {"stdout": "", "stderr": ""}


def test_resume_after_a_kill_with_one_process_ends_as_the_uninterrupted_run(stores, two_process_runs,
                                                                            killed_run, tmp_path, caplog):
    out = tmp_path / "killed"
    shutil.copytree(killed_run, out)
    caplog.set_level(logging.DEBUG, logger="revq_pipe")
    resumed = fit_in_process(fit_kwargs(stores, out, "sparse"), resume=True)
    assert resumed.started_at_epoch == 1
    assert "resuming after epoch 1 (trained on 2 processes until now, on 1 from here)" in caplog.text
    # The same global batches in the same order; the rectifier's gradient sums round differently.
    assert_close_weights(weights(two_process_runs["sparse"]), weights(out), exact_codebooks=True)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_with_exit_2(stores, tmp_path):
    done = torchrun(REVQ_PIPE, "fit", stores["train"], "--out", tmp_path / "run",
                    "--preset", "tiny", "--codes", 32, "--batch-size", 63, "--device", "cpu")
    reason = "error: --batch-size 63 is the global batch and must split evenly over the 2 processes"
    # Each rank refuses alike; torchrun may end the second before it prints, once the first has exited.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(line.startswith(reason) for line in errors)
    assert "exitcode  : 2" in done.stderr
    assert done.returncode == 1  # torchrun's own status when a worker fails
    assert not (tmp_path / "run").exists()


# The loader's shares, without processes: what each rank would read.

@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_shares_of_each_batch_make_up_the_one_process_batches(tmp_path, monkeypatch, resident, world):
    store = LatentStore.open(make_store(tmp_path / "store", 240, 0, chunk_size=16))
    monkeypatch.setattr(loader_module, "STREAM_BLOCK_BYTES", 2 * 16 * 128 * 4)  # blocks of 2 chunks: batches span blocks
    for kwargs in (dict(batch_size=48), dict(batch_size=50, shuffle=False, drop_last=False)):
        whole = list(LatentLoader(store, device=torch.device("cpu"), resident=resident, **kwargs).epoch(3))
        shares = [list(LatentLoader(store, device=torch.device("cpu"), resident=resident,
                                    group=DataParallelGroup(rank, world), **kwargs).epoch(3))
                  for rank in range(world)]
        assert all(len(rank_batches) == len(whole) for rank_batches in shares)
        for step, batch in enumerate(whole):
            assert torch.equal(torch.cat([rank_batches[step] for rank_batches in shares]), batch)


def test_a_global_batch_must_divide_by_the_world_size():
    DataParallelGroup(0, 4).require_divisible(64)
    with pytest.raises(UserError, match="use a multiple of 3 such as 63"):
        DataParallelGroup(0, 3).require_divisible(64)
