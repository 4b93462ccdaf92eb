"""Ctrl-C in every stage, at a known moment (tests/kill_at.py sends the SIGINT from inside the
command, a preloaded child, at the nth call of a named function): the command exits with status 130 and
one `interrupted:` line saying how to go on (no traceback), and that command then finishes the
job, writing what an uninterrupted run writes. A command that does not unwind (a clean-up that
never ends) is ended anyway, a few seconds after Ctrl-C or at once after a second one.

The timeouts below only catch a command that never ends; nothing here measures how fast it is."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.lease import LEASE_NAME
from revq_pipe.pipeline.storage.store import write_latent_store

pytestmark = pytest.mark.slow

COUNT, CHUNK = 40, 8
HANG_GUARD_S = 300


def interrupted_line(child) -> str:
    """The `interrupted:` line of a command stopped by Ctrl-C, checked to be its last, with no traceback."""
    stderr = child.stderr
    assert child.exitcode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("interrupted: "), stderr[-3000:]
    return last


def interrupt_at(preloaded, logs: Path, target: str, nth: int, when: str, args: list[str],
                 encode_chunk_rows: int | None = None) -> str:
    """Run the command in a preloaded child that sends itself SIGINT at the nth call of `target`."""
    return interrupted_line(preloaded.run("kill_at:run_cli", args, target, nth, when, signal_name="SIGINT",
                                          encode_chunk_rows=encode_chunk_rows, logs=logs, timeout_s=HANG_GUARD_S,
                                          forkserver="--cluster" in args))


def finish(args: list[str], encode_chunk_rows: int | None = None) -> str:
    """Run the command to its end, in this process (with encode's chunks of `encode_chunk_rows`
    rows, as kill_at cuts them, when given)."""
    with pytest.MonkeyPatch.context() as patch:
        if encode_chunk_rows is not None:
            patch.setattr("revq_pipe.stages.encode.default_chunk_rows", lambda *shape: encode_chunk_rows)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


def same_output(a: Path, b: Path) -> None:
    """Two outputs hold the same: every array of a Zarr store, or every file of a folder, byte for byte."""
    if (a / "zarr.json").exists():
        ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
        assert sorted(ga.array_keys()) == sorted(gb.array_keys())
        for name in ga.array_keys():
            np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
        return
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        if name.suffix not in (".json",):  # manifests name their own folder
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def no_leftovers(path: Path) -> None:
    assert [p for p in path.rglob("*") if p.name == LEASE_NAME or p.name.endswith((".partial", ".tmp"))] == []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_dc_vae_dir):
    root = tmp_path_factory.mktemp("interrupts")
    latents = np.random.default_rng(0).normal(size=(COUNT, 4, 8, 8)).astype(np.float32)
    store = write_latent_store(str(root / "latents.zarr"), latents, np.arange(COUNT) % 3,
                               [f"class{i % 3}/img{i:02d}.jpg" for i in range(COUNT)], chunk_size=CHUNK,
                               attrs={"vae": str(tiny_dc_vae_dir), "image_size": TINY_IMAGE_SIZE})
    np.save(root / "latents.npy", latents)
    finish(["fit", store.url, "--out", str(root / "run"), "--preset", "tiny", "--codes", "8", "--epochs", "1",
            "--batch-size", "8", "--device", "cpu"])
    finish(["export-tokens", str(root / "run"), store.url, "--out", str(root / "tokens.zarr"), "--device", "cpu"])
    return {"store": store.url, "run": str(root / "run"), "tokens": str(root / "tokens.zarr"),
            "npy": str(root / "latents.npy"), "vae": str(tiny_dc_vae_dir)}


def stage_args(stage: str, fitted, photo_folder) -> list[str]:
    """The command of a stage, without --out."""
    encode = ["encode", str(photo_folder), "--vae", fitted["vae"], "--image-size", str(TINY_IMAGE_SIZE),
              "--batch-size", "3"]
    return {
        "encode": [*encode, "--workers", "0"],
        "encode with DataLoader workers": [*encode, "--workers", "2"],
        "encode --cluster": [*encode, "--workers", "0", "--cluster", "local:2"],
        "import-latents": ["import-latents", fitted["npy"]],
        "export-tokens": ["export-tokens", fitted["run"], fitted["store"], "--device", "cpu"],
        "export-tokens --format wds": ["export-tokens", fitted["run"], fitted["store"], "--device", "cpu",
                                       "--format", "wds", "--shard-size", "8"],
        "export-tokens --cluster": ["export-tokens", fitted["run"], fitted["store"], "--cluster", "local:2",
                                    "--batch-size", "8"],
        "decode": ["decode", fitted["run"], fitted["tokens"], "--device", "cpu"],
        "decode --images": ["decode", fitted["run"], fitted["tokens"], "--vae", fitted["vae"], "--device", "cpu"],
    }[stage]


ENCODE_CHUNKS = 3  # rows per chunk, so a few images span several
STAGE_MOMENTS = {  # stage: (function, nth call, before|after, encode's chunk rows)
    "encode": ("revq_pipe.pipeline.storage.store:RowStore.commit", 2, "after", ENCODE_CHUNKS),
    "encode with DataLoader workers": ("revq_pipe.pipeline.storage.store:RowStore.commit", 2, "after", ENCODE_CHUNKS),
    "encode --cluster": ("distributed.client:Future.result", 2, "after", ENCODE_CHUNKS),
    "import-latents": ("revq_pipe.pipeline.storage.store:LatentStore.write", 1, "after", None),
    "export-tokens": ("revq_pipe.pipeline.storage.store:RowStore.commit", 2, "after", None),
    "export-tokens --format wds": ("webdataset:TarWriter.write", 19, "before", None),
    "export-tokens --cluster": ("distributed.client:Future.result", 2, "after", None),
    "decode": ("revq_pipe.pipeline.storage.store:RowStore.commit", 2, "after", None),
    "decode --images": ("revq_pipe.pipeline.storage.decoded_images:DecodedImages.commit", 2, "before", None),
}


@pytest.mark.parametrize("stage", STAGE_MOMENTS)
def test_ctrl_c_stops_the_stage_and_the_same_command_finishes_it(stage, fitted, photo_folder, tmp_path, preloaded):
    target, nth, when, chunk_rows = STAGE_MOMENTS[stage]
    args = stage_args(stage, fitted, photo_folder)
    line = interrupt_at(preloaded, tmp_path / "child", target, nth, when, [*args, "--out", str(tmp_path / "stopped")],
                        chunk_rows)
    assert line == "interrupted: run the same command again to resume"
    for out in ("stopped", "clean"):
        finish([*args, "--out", str(tmp_path / out)], encode_chunk_rows=chunk_rows)
    same_output(tmp_path / "stopped", tmp_path / "clean")
    no_leftovers(tmp_path / "stopped")


FIT = ["--preset", "tiny", "--codes", "8", "--batch-size", "8", "--device", "cpu", "--epochs", "3"]


@pytest.mark.parametrize("moment, hint, again", [
    (("revq_pipe.pipeline.train.trainer:Trainer.step", 3, "before"),
     "interrupted: no epoch had completed: run the same command again to start over", []),
    (("revq_pipe.stages.fit:save_checkpoint", 2, "after"),
     "interrupted: the last completed epoch's checkpoint is kept in {run}: run the same command with --resume to "
     "continue", ["--resume"]),
])
def test_ctrl_c_in_fit_says_how_to_go_on_and_that_command_finishes_the_run(fitted, tmp_path, moment, hint, again,
                                                                          preloaded):
    args = lambda out: ["fit", fitted["store"], "--out", str(out), *FIT]  # noqa: E731
    line = interrupt_at(preloaded, tmp_path / "child", *moment, args(tmp_path / "stopped"))
    assert line == hint.format(run=tmp_path / "stopped")
    finish([*args(tmp_path / "stopped"), *again])
    finish(args(tmp_path / "clean"))
    assert (tmp_path / "stopped" / "model.safetensors").read_bytes() == \
        (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert untimed_metrics(tmp_path / "stopped") == untimed_metrics(tmp_path / "clean")
    no_leftovers(tmp_path / "stopped")


def untimed_metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("epoch_seconds", "samples_per_s")} for line in lines]


def test_ctrl_c_in_eval_writes_no_result_and_eval_then_runs(fitted, tmp_path, preloaded):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / name).write_bytes((Path(fitted["run"]) / name).read_bytes())
    args = ["eval", str(run), fitted["store"], "--device", "cpu", "--latent-only"]
    interrupt_at(preloaded, tmp_path / "child", "revq_pipe.pipeline.train.loader:LatentLoader.epoch", 1, "after", args)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors"]
    assert "saved to" in finish(args)


@pytest.mark.parametrize("times", ["once", "twice"])
def test_a_command_that_does_not_unwind_is_ended_after_ctrl_c(fitted, tmp_path, times, preloaded):
    """decode's work replaced by one that sends itself SIGINT (once, or again in its `finally`) and
    then waits ten minutes (tests/kill_at.py:run_stuck)."""
    child = preloaded.run("kill_at:run_stuck", ["decode", fitted["run"], fitted["tokens"], "--out",
                                                str(tmp_path / "out")], times, logs=tmp_path / "child",
                          timeout_s=HANG_GUARD_S)
    assert interrupted_line(child) == "interrupted: stopped at once; run the same command again to resume"


def test_a_store_stopped_between_two_resizes_of_its_arrays_resumes_to_every_row(fitted, photo_folder, tmp_path,
                                                                                 preloaded):
    """The writer grows the store's arrays one at a time: stopped in between (Ctrl-C in the last
    resize, or a kill), `latents` is longer than `labels`, and Zarr dropped the resumed run's labels
    past the end without a word (they came back as -1: found by the DataLoader case above)."""
    args = [*stage_args("encode", fitted, photo_folder), "--out", str(tmp_path / "stopped")]
    killed = preloaded.run("kill_at:run_cli", args, "revq_pipe.pipeline.storage.store:RowStore.commit", 2, "after",
                           encode_chunk_rows=ENCODE_CHUNKS, logs=tmp_path / "child", timeout_s=HANG_GUARD_S)
    assert killed.exitcode == -9, killed.stderr[-3000:]
    group = zarr.open_group(str(tmp_path / "stopped"), mode="r+")
    assert group["labels"].shape == (6,)
    group["latents"].resize((9, *group["latents"].shape[1:]))  # as the stopped writer left it
    finish(args, encode_chunk_rows=ENCODE_CHUNKS)
    finish([*args[:-1], str(tmp_path / "clean")], encode_chunk_rows=ENCODE_CHUNKS)
    same_output(tmp_path / "stopped", tmp_path / "clean")
