"""Bad input ends with one `error:` line and exit status 2, before anything is written that would
block the next run: unwritable outputs (read-only, under a file, a full disk), damaged weights,
non-finite latents, token ids beyond the codebook, keys that cannot be file names."""

import hashlib
import json
import re
import shlex
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from private_mount import needs_private_mounts, run_with_tmpfs
from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.stages.encode import encode
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.stages.fit import fit

runner = CliRunner()
REVQ_PIPE = str(Path(sys.executable).parent / "revq-pipe")
COUNT = 24


def one_error_line(result, *fragments: str) -> str:
    """The single `error:` line of a CliRunner result that exited 2, holding every fragment."""
    return error_line(result.exit_code, result.output, *fragments)


def error_line(exit_code: int, output: str, *fragments: str) -> str:
    assert exit_code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def latents_with_keys(path, keys, *, vae, shape, seed=0, nan_row=None) -> LatentStore:
    latents = np.random.default_rng(seed).normal(size=(len(keys), *shape)).astype(np.float32)
    if nan_row is not None:
        latents[nan_row, 0, 0, 0] = np.nan
    return write_latent_store(str(path), latents, np.zeros(len(keys)), keys, chunk_size=8,
                              attrs={"vae": vae, "image_size": TINY_IMAGE_SIZE})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_dc_vae_dir):
    """A tiny run on latents shaped like the tiny DC VAE's (so decode can go on to images), and
    its token store."""
    root = tmp_path_factory.mktemp("fitted")
    keys = [f"class{i % 3}/img{i:02d}.jpg" for i in range(COUNT)]
    store = latents_with_keys(root / "latents.zarr", keys, vae=str(tiny_dc_vae_dir), shape=(4, 8, 8))
    fit(store.url, str(root / "run"), preset="tiny", codes=8, epochs=1, batch_size=8, device="cpu", progress=False)
    export_tokens(str(root / "run"), store.url, str(root / "tokens.zarr"), device="cpu", progress=False)
    return {"store": store.url, "run": str(root / "run"), "tokens": str(root / "tokens.zarr"),
            "vae": str(tiny_dc_vae_dir)}


def stage_args(fitted, photo_folder, stage: str, out: str) -> list[str]:
    return {
        "encode": ["encode", str(photo_folder), "--vae", fitted["vae"], "--image-size", str(TINY_IMAGE_SIZE),
                   "--workers", "0"],
        "fit": ["fit", fitted["store"], "--preset", "tiny", "--codes", "8", "--epochs", "1", "--device", "cpu"],
        "export-tokens": ["export-tokens", fitted["run"], fitted["store"], "--device", "cpu"],
        "decode": ["decode", fitted["run"], fitted["tokens"], "--device", "cpu"],
    }[stage] + ["--out", out]


@pytest.mark.parametrize("stage", ["encode", "fit", "export-tokens", "decode"])
def test_out_under_a_file_exits_2(fitted, photo_folder, tmp_path, stage):
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(app, stage_args(fitted, photo_folder, stage, str(tmp_path / "file" / "out")))
    one_error_line(result, "Not a directory", str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "not a folder"


@needs_private_mounts
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["encode", "fit"])
def test_out_on_a_read_only_file_system_exits_2(fitted, photo_folder, tmp_path, stage):
    (tmp_path / "mnt").mkdir()
    args = shlex.join([REVQ_PIPE, *stage_args(fitted, photo_folder, stage, str(tmp_path / "mnt" / "out"))])
    done = run_with_tmpfs(tmp_path / "mnt", 64, f'mount -o remount,ro "$MNT" && {args}')
    error_line(done.returncode, done.stderr, "Read-only file system")


FILL_DISK_ENCODE = """
import sys
from revq_pipe.stages import encode
encode.default_chunk_rows = lambda *shape: 4  # a chunk per 4 images, so a small disk fills mid-run
from revq_pipe.cli import app
app(sys.argv[1:])
"""


@needs_private_mounts
@pytest.mark.slow
def test_a_full_disk_stops_encode_with_one_line_and_the_same_command_resumes(photo_folder, tiny_dc_vae_dir, tmp_path):
    source = tmp_path / "photos"  # 36 images: nine chunks, more than the small disk holds
    for copy in range(3):
        for path in sorted(photo_folder.rglob("*.jpg")):
            target = source / path.parent.name / f"{copy}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "child.py").write_text(FILL_DISK_ENCODE)
    # one torch thread, as the clean encode below in this process (conftest): more round the latents otherwise
    command = (f"OMP_NUM_THREADS=1 {sys.executable} {tmp_path / 'child.py'} encode {source} --out \"$MNT/s.zarr\" --vae {tiny_dc_vae_dir}"
               f" --image-size {TINY_IMAGE_SIZE} --workers 0 --batch-size 3")
    done = run_with_tmpfs(tmp_path / "mnt", 64, f"""
        {command} 2> "{tmp_path}/first.err"; echo "first $?"
        mount -o remount,size=1m "$MNT" && {command} && cp -r "$MNT/s.zarr" "{tmp_path}/resumed.zarr"
    """)
    assert done.returncode == 0, done.stderr
    assert "first 2" in done.stdout
    line = error_line(2, (tmp_path / "first.err").read_text(), "no space left", "run the same command again to resume")
    kept = int(re.search(r"the (\d+) latents committed so far are kept", line).group(1))
    assert 0 < kept < 36 and kept % 4 == 0, line
    assert f"resumed after {kept} stored rows" in done.stdout

    encode(str(source), str(tmp_path / "clean.zarr"), vae=str(tiny_dc_vae_dir), image_size=TINY_IMAGE_SIZE,
           batch_size=3, workers=0, chunk_size=4, progress=False)
    clean, resumed = LatentStore.open(str(tmp_path / "clean.zarr")), LatentStore.open(str(tmp_path / "resumed.zarr"))
    for name in ("latents", "labels", "keys", "mean", "std"):
        np.testing.assert_array_equal(clean.group[name][:], resumed.group[name][:], err_msg=name)


def test_non_finite_latents_are_refused_before_anything_is_written(fitted, tmp_path):
    keys = [f"class{i % 3}/img{i:02d}.jpg" for i in range(COUNT)]
    bad = latents_with_keys(tmp_path / "nan.zarr", keys, vae=fitted["vae"], shape=(4, 8, 8), nan_row=13)
    for args in (["export-tokens", fitted["run"], bad.url, "--out", str(tmp_path / "t.zarr"), "--device", "cpu"],
                 ["export-tokens", fitted["run"], bad.url, "--out", str(tmp_path / "t-wds"), "--format", "wds"],
                 ["eval", fitted["run"], bad.url, "--device", "cpu"],
                 ["fit", bad.url, "--out", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu"]):
        one_error_line(runner.invoke(app, args), "row 13", "'class1/img13.jpg'", "NaN or inf")
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "t-wds").exists()
    assert not (Path(fitted["run"]) / "eval.json").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()
    # nothing left behind blocks the next, good run
    result = runner.invoke(app, ["export-tokens", fitted["run"], fitted["store"], "--out", str(tmp_path / "t.zarr")])
    assert result.exit_code == 0, result.output


def damage(weights: Path, how: str) -> None:
    data = bytearray(weights.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "corrupt header":
        data[8:40] = b"\x00" * 32
    elif how == "random bytes in the middle":
        middle = (header_end + len(data)) // 2
        data[middle:middle + 16] = np.random.default_rng(0).integers(0, 256, 16, dtype=np.uint8).tobytes()
    elif how == "NaN bytes":
        data[header_end + 64:header_end + 80] = b"\xff" * 16  # 0xffffffff is a float32 NaN
    weights.write_bytes(bytes(data))


def forget_checksum(run: Path) -> None:
    """Make the run one written before config.json recorded the weights' checksum."""
    config = json.loads((run / "config.json").read_text())
    del config["_weights_sha256"]
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("how, checksum, reason", [
    *[(how, True, "is not the file fit wrote") for how in
      ("truncated", "corrupt header", "random bytes in the middle", "NaN bytes")],
    ("truncated", False, "cannot be read as safetensors"),
    ("corrupt header", False, "cannot be read as safetensors"),
    ("NaN bytes", False, "holds NaN or inf"),
])
def test_damaged_weights_exit_2_naming_the_file(fitted, tmp_path, how, checksum, reason):
    run = tmp_path / "run"
    shutil.copytree(fitted["run"], run)
    damage(run / "model.safetensors", how)
    if not checksum:
        forget_checksum(run)
    result = runner.invoke(app, ["eval", str(run), fitted["store"], "--device", "cpu"])
    one_error_line(result, reason, str(run / "model.safetensors"), "--resume")
    assert not (run / "eval.json").exists()


def test_the_recorded_checksum_is_the_weights_sha256(fitted):
    """config.json's checksum is sha256 of model.safetensors, computed here with hashlib itself."""
    run = Path(fitted["run"])
    recorded = json.loads((run / "config.json").read_text())["_weights_sha256"]
    assert recorded == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()


def test_token_ids_beyond_the_codebook_are_refused_before_decoding(fitted, tmp_path):
    shutil.copytree(fitted["tokens"], tmp_path / "tokens.zarr")
    tokens = TokenStore.open(str(tmp_path / "tokens.zarr"), mode="r+")
    tokens.tokens[17, 5] = 8  # the run has K = 8 codes: ids 0..7
    for out in ("decoded.zarr", "images"):
        args = ["decode", fitted["run"], tokens.url, "--out", str(tmp_path / out), "--device", "cpu"]
        result = runner.invoke(app, args + (["--vae", fitted["vae"]] if out == "images" else []))
        one_error_line(result, "row 17", "'class2/img17.jpg'", "token id 8", "8 codes")
        assert not (tmp_path / out).exists()


def decode_images_of_keys(fitted, tmp_path, keys):
    store = latents_with_keys(tmp_path / "latents.zarr", keys, vae=fitted["vae"], shape=(4, 8, 8))
    export_tokens(fitted["run"], store.url, str(tmp_path / "tokens.zarr"), device="cpu", progress=False)
    return runner.invoke(app, ["decode", fitted["run"], str(tmp_path / "tokens.zarr"), "--out",
                               str(tmp_path / "images"), "--vae", fitted["vae"], "--device", "cpu"])


def test_a_key_too_long_for_a_file_name_is_refused_before_any_image(fitted, tmp_path):
    keys = ["ok/first.jpg", "ok/" + "x" * 300 + ".jpg", "ok/last.jpg"]
    one_error_line(decode_images_of_keys(fitted, tmp_path, keys), "(row 1)", "file name of 304 bytes", "255 per name")
    assert not (tmp_path / "images").exists()


def test_keys_that_map_to_one_image_file_are_refused(fitted, tmp_path):
    keys = ["dup/x.jpg", "other/y.jpg", "../dup/x.jpg"]
    one_error_line(decode_images_of_keys(fitted, tmp_path, keys), "'dup/x.jpg' (row 0)", "'../dup/x.jpg' (row 2)",
                   "both become the image file")
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("option", ["--epochs", "--batch-size"])
def test_out_of_range_numbers_are_usage_errors(fitted, tmp_path, option):
    """Typer's own usage message (a few lines, with the reason), exit 2, no traceback."""
    result = runner.invoke(app, ["fit", fitted["store"], "--out", str(tmp_path / "run"), option, "0"])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
