"""Two writers on one output: while one command is paused in the middle of its work (it sends
itself SIGSTOP at a known moment: tests/kill_at.py, in a preloaded child), the same command on the same
output is turned away with one line and exit 2, touching nothing; the first then finishes, and
its output is what a run alone writes."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from test_interrupts import fitted  # noqa: F401 - a store shaped for the tiny VAE, a run, its tokens
from test_interrupts import same_output
from test_paper_checkpoint import paper_files  # noqa: F401 - the paper's files, as its code saves them

pytestmark = pytest.mark.slow

HANG_GUARD_S = 300


WRITERS = {  # stage: (its command without --out, where the first one pauses, kill_at options)
    "encode": (lambda f, photos: ["encode", str(photos), "--vae", f["vae"], "--image-size", str(TINY_IMAGE_SIZE),
                                  "--batch-size", "3", "--workers", "0"],
               ("revq_pipe.pipeline.storage.store:RowStore.commit", 1, "after", 3)),
    "import-latents": (lambda f, photos: ["import-latents", f["npy"]],
                       ("revq_pipe.pipeline.storage.store:LatentStore.write", 1, "after")),
    "fit": (lambda f, photos: ["fit", f["store"], "--preset", "tiny", "--codes", "8", "--epochs", "2",
                               "--batch-size", "8", "--device", "cpu"],
            ("revq_pipe.stages.fit:save_checkpoint", 1, "after")),
    "export-tokens": (lambda f, photos: ["export-tokens", f["run"], f["store"], "--device", "cpu"],
                      ("revq_pipe.pipeline.storage.store:RowStore.commit", 1, "after")),
    "decode --images": (lambda f, photos: ["decode", f["run"], f["tokens"], "--vae", f["vae"], "--device", "cpu"],
                        ("revq_pipe.pipeline.storage.decoded_images:DecodedImages.commit", 1, "after")),
}


def wait_paused(child) -> None:
    """Wait until the preloaded child has stopped itself (state T in /proc); a guard, not a timing."""
    deadline = time.monotonic() + HANG_GUARD_S
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert child.poll() is None, child.stderr[-3000:]
        assert time.monotonic() < deadline, "the first writer never paused"
        time.sleep(0.05)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", WRITERS)
def test_a_second_writer_is_turned_away_while_the_first_is_paused_midway(stage, fitted, photo_folder, tmp_path,
                                                                          preloaded):
    command, (target, nth, when, *chunk_rows) = WRITERS[stage]
    args = [*command(fitted, photo_folder), "--out", str(tmp_path / "out")]
    first = preloaded.start("kill_at:run_cli", args, target, nth, when, signal_name="SIGSTOP",
                            encode_chunk_rows=chunk_rows[0] if chunk_rows else None, logs=tmp_path / "first",
                            timeout_s=HANG_GUARD_S)
    try:
        wait_paused(first)
        before = files(tmp_path / "out")
        second = CliRunner().invoke(app, args)  # this process is a job of its own
        assert second.exit_code == 2, second.output
        errors = [line for line in second.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "is being written by another job" in errors[0], second.output
        assert "Traceback" not in second.output
        assert files(tmp_path / "out") == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait() == 0, first.stderr[-3000:]
    alone = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "alone")])
    assert alone.exit_code == 0, alone.output
    if (tmp_path / "out" / "zarr.json").exists():
        same_output(tmp_path / "out", tmp_path / "alone")
    else:
        same = {"model.safetensors", "class0/img00.png", "class2/img38.png"}
        assert {k: v for k, v in files(tmp_path / "out").items() if k in same} == \
            {k: v for k, v in files(tmp_path / "alone").items() if k in same}


# A process of another job that holds the lease on argv[1] until it is killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from revq_pipe.pipeline.lease import Lease
    lease = Lease.acquire(Path(sys.argv[1]), "another-job")
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def held(tmp_path):
    """Hold the lease on a folder from another process, for the rest of the test."""
    children = []

    def hold(folder: Path):
        child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "held"
        children.append(child)

    yield hold
    for child in children:
        child.kill()
        child.wait()


def test_import_checkpoint_and_stats_are_writers_too(paper_files, fitted, tmp_path, held):  # noqa: F811
    runner = CliRunner()
    root = paper_files["root"]
    held(tmp_path / "run")
    result = runner.invoke(app, ["import-checkpoint", str(root / "ckpt.pth"), "--config", str(root / "small.yaml"),
                                 "--preprocessor", str(root / "preprocessor.pth"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "is being written by another job" in result.output, result.output
    store = tmp_path / "latents.zarr"
    shutil.copytree(fitted["store"], store)
    held(store)
    result = runner.invoke(app, ["stats", str(store)])
    assert result.exit_code == 2 and "is being written by another job" in result.output, result.output
