"""Hostile and damaged inputs, one per thing the project reads: each ends with one `error:` line and
exit status 2 (or, for single bad samples, a skip that is counted), writes nothing outside its
output, and leaves the next good run unblocked."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from test_paper_checkpoint import paper_files  # noqa: F401 - the paper's files, built as its code saves them
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store

runner = CliRunner()
COUNT, CHUNK, NAN_ROW = 48, 8, 29
SHAPE = (16, 4, 4)


def one_error_line(result, *fragments: str, after_log: bool = False) -> str:
    """The `error:` line of a run that exited 2: its only line (its last, after fit's log lines,
    with `after_log`), holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and (after_log or len(lines) == 1), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def keys_of(count: int) -> list[str]:
    return [f"cats/img{i:03d}.jpg" for i in range(count)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A good store, a run fitted on it, and a copy of the store whose row 29 became NaN after its
    statistics were computed (so they stay finite and prove nothing)."""
    root = tmp_path_factory.mktemp("hostile")
    latents = np.random.default_rng(0).normal(size=(COUNT, *SHAPE)).astype(np.float32)
    good = write_latent_store(str(root / "good.zarr"), latents, np.arange(COUNT) % 2, keys_of(COUNT), chunk_size=CHUNK)
    ok(["fit", good.url, "--out", str(root / "run"), "--preset", "tiny", "--codes", "8", "--epochs", "1",
        "--batch-size", "8", "--device", "cpu"])
    shutil.copytree(root / "good.zarr", root / "nan.zarr")
    zarr.open_group(str(root / "nan.zarr"), mode="r+")["latents"][NAN_ROW, 3, 1, 2] = np.nan
    return {"good": good.url, "nan": str(root / "nan.zarr"), "run": str(root / "run")}


# --------------------------------------------------------------------------- latent stores


def test_the_nan_row_hides_behind_finite_statistics(fitted):
    store = LatentStore.open(fitted["nan"])
    assert np.isfinite(store.mean).all() and np.isfinite(store.std).all()
    store.check_finite()  # the statistics cannot show it: readers must look at the rows


@pytest.mark.parametrize("format, options", [("zarr", []), ("wds", ["--shard-size", "8"]),
                                             ("parquet", ["--shard-size", "8"]), ("zarr+wds", ["--shard-size", "8"])])
def test_export_of_nan_rows_with_clean_statistics_exits_2_and_the_next_good_export_runs(fitted, tmp_path, format,
                                                                                      options):
    out = tmp_path / "tokens"
    args = lambda store: ["export-tokens", fitted["run"], store, "--out", str(out), "--format", format,  # noqa: E731
                          "--device", "cpu", "--batch-size", "8", *options]
    one_error_line(runner.invoke(app, args(fitted["nan"])), f"row {NAN_ROW}", f"(key 'cats/img{NAN_ROW:03d}.jpg')",
                   "NaN or inf latents")
    ok(args(fitted["good"]))  # no --overwrite needed: the failed export left nothing in the way
    ok(args(fitted["good"]))  # and that one is complete


def test_eval_and_fit_on_nan_rows_with_clean_statistics_exit_2(fitted, tmp_path):
    fit = ["--preset", "tiny", "--codes", "4", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    for args in (["eval", fitted["run"], fitted["nan"], "--device", "cpu"],
                 ["fit", fitted["nan"], "--out", str(tmp_path / "run"), *fit],
                 ["fit", fitted["good"], "--out", str(tmp_path / "run-val"), "--val", fitted["nan"], *fit]):
        one_error_line(runner.invoke(app, args), f"row {NAN_ROW}", f"'cats/img{NAN_ROW:03d}.jpg'", "NaN or inf",
                       after_log=args[0] == "fit")
    assert sorted(p.name for p in Path(fitted["run"]).glob("eval-*")) == []
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run-val" / "checkpoint.pt").exists()


@pytest.mark.parametrize("array", ["latents", "latents_flip"])
def test_the_non_finite_message_names_the_array_and_prints_the_key_as_text(tmp_path, array):
    latents = np.random.default_rng(0).normal(size=(16, *SHAPE)).astype(np.float32)
    store = LatentStore.create(str(tmp_path / "s.zarr"), n=16, latent_shape=SHAPE, dtype="float32", chunk_size=8,
                               attrs={}, unfinished=True, flip=True)
    flipped = latents[..., ::-1].copy()
    (latents if array == "latents" else flipped)[11, 0, 0, 0] = np.inf
    store.write(0, latents, np.zeros(16), np.array(keys_of(16)), latents_flip=flipped)
    store.finish()  # the statistics see the inf
    what = "NaN or inf latents" if array == "latents" else "NaN or inf flipped latents"
    with pytest.raises(UserError, match=rf"row 11 \(key 'cats/img011.jpg'\) holds {what}:"):
        LatentStore.open(store.url).check_finite()


# --------------------------------------------------------------------------- run dirs


def edited_run(fitted, tmp_path, edit) -> Path:
    run = tmp_path / "run"
    shutil.copytree(fitted["run"], run)
    config = json.loads((run / "config.json").read_text())
    text = edit(config)
    (run / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return run


CONFIG_EDITS = {
    "a billion codes": (lambda c: c.update(codes=10**9), "quantizer.codebooks [64, 1000000000, 4]"),
    "a rectifier ten million wide": (lambda c: c.update(rectifier_width=10**7), "[10000000, 16, 3, 3]"),
    "a billion rectifier layers": (lambda c: c.update(rectifier_layers=10**9), "rectifier layers are not in the weights"),
    "a JSON list": (lambda c: json.dumps([c]), "holds a JSON list"),
    "invalid JSON": (lambda c: json.dumps(c)[:-9], "cannot be read as a run's config"),
    "codes as text": (lambda c: c.update(codes="many"), 'codes must be an integer, not "many"'),
    "a latent shape of two sizes": (lambda c: c.update(latent_shape=[16, 16]), "latent_shape must be a list of 3 integers, not [16, 16]"),
    "no tokens": (lambda c: c.pop("tokens"), "lacks tokens"),
    "a zero attention head dim": (lambda c: c.update(attention_head_dim=0), "attention head dim 0"),
    "another split": (lambda c: c.update(split="diagonal"), "unknown split"),
}


@pytest.mark.parametrize("edit", CONFIG_EDITS)
def test_a_hand_edited_config_is_refused_before_anything_is_allocated(fitted, tmp_path, edit):
    change, reason = CONFIG_EDITS[edit]
    run = edited_run(fitted, tmp_path, change)
    out = tmp_path / "tokens.zarr"
    one_error_line(runner.invoke(app, ["export-tokens", str(run), fitted["good"], "--out", str(out),
                                       "--device", "cpu"]), reason)
    assert not out.exists()


# --------------------------------------------------------------------------- the paper's files


class RunsCodeWhenUnpickled:
    """What a hostile pickle does: unpickling calls Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def paper_case(root: Path, tmp_path: Path, case: str) -> tuple[Path, Path, Path]:
    """(ckpt, yaml, preprocessor) for a hostile case, built from the good paper files in `root`."""
    import torch

    ckpt, yaml_path, stats = root / "ckpt.pth", root / "small.yaml", root / "preprocessor.pth"
    marker = tmp_path / "code-ran"
    yaml_text = yaml_path.read_text()
    edits = {"absurd num_code": ("num_code: 16", "num_code: 1000000000000"),
             "absurd input size": ("input_data_size: [8, 4, 4]", "input_data_size: [8, 100000, 100000]"),
             "absurd width": ("block_out_channels: [32]", "block_out_channels: [100000000]"),
             "absurd layers": ("layers_per_block: [2]", "layers_per_block: [1000000000]"),
             "zero tokens": ("tokens_per_data: 32", "tokens_per_data: 0"),
             "codes as text": ("num_code: 16", "num_code: lots"),
             "decoder as a list": ("  decoder:\n    TYPE: dc_ae", "  decoder: [1, 2]\n  unused:\n    TYPE: dc_ae"),
             "python tag": ("seed: 42", f"seed: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]")}
    if case in edits:
        old, new = edits[case]
        assert old in yaml_text, case
        yaml_path = tmp_path / "edited.yaml"
        yaml_path.write_text(yaml_text.replace(old, new))
    elif case == "pickle that runs code":
        ckpt = tmp_path / "ckpt.pth"
        torch.save({"quantizer": RunsCodeWhenUnpickled(marker), "decoder": {}}, ckpt)
    elif case == "wider decoder weights":
        state = torch.load(ckpt, weights_only=True)
        state["decoder"]["conv_in.weight"] = torch.zeros(64, 8, 3, 3)
        ckpt = tmp_path / "ckpt.pth"
        torch.save(state, ckpt)
    elif case == "text for a decoder tensor":
        state = torch.load(ckpt, weights_only=True)
        state["decoder"]["conv_in.weight"] = "weights"
        ckpt = tmp_path / "ckpt.pth"
        torch.save(state, ckpt)
    elif case == "statistics as lists":
        stats = tmp_path / "preprocessor.pth"
        torch.save({"mean": [0.0] * 128, "std": [1.0] * 128}, stats)
    return ckpt, yaml_path, stats


PAPER_CASES = {
    "pickle that runs code": "weights_only=True",
    "python tag": "is not valid YAML",
    "wider decoder weights": "rectifier.conv_in.weight [32, 8, 3, 3], but the weights hold [64, 8, 3, 3]",
    "absurd num_code": "do not match the config",
    "absurd input size": "statistics of 128 dimensions",
    "absurd width": "rectifier.conv_in.weight [100000000, 8, 3, 3]",
    "absurd layers": "rectifier layers are not in the weights",
    "zero tokens": "not a ReVQ paper config",
    "codes as text": "not a ReVQ paper config",
    "decoder as a list": "not a ReVQ paper config",
    "text for a decoder tensor": "conv_in.weight is a str, not a tensor",
    "statistics as lists": "no `mean` and `std` tensors",
}


@pytest.mark.parametrize("case", PAPER_CASES)
def test_hostile_paper_checkpoints_and_configs_are_one_line_errors_and_run_no_code(paper_files, tmp_path, case):
    ckpt, config, stats = paper_case(paper_files["root"], tmp_path, case)
    result = runner.invoke(app, ["import-checkpoint", str(ckpt), "--config", str(config), "--preprocessor", str(stats),
                                 "--out", str(tmp_path / "run")])
    one_error_line(result, PAPER_CASES[case])
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- latent files


def latent_file(path: Path, rows: int = 12, shape=(4, 2, 2), *, bad_row: int | None = None, value=np.nan,
                **arrays) -> Path:
    latents = np.random.default_rng(rows).normal(size=(rows, *shape)).astype(np.float32)
    if bad_row is not None:
        latents[bad_row, 0, 0, 0] = value
    if arrays or path.suffix == ".npz":
        np.savez(path, latents=latents, **arrays)
    else:
        np.save(path, latents)
    return path


LATENT_FILE_CASES = {
    "NaN in the first file": (lambda d: [latent_file(d / "a.npy", bad_row=10)], "row 10 holds NaN"),
    "inf in the second file": (lambda d: [latent_file(d / "a.npy"), latent_file(d / "b.npy", bad_row=3, value=np.inf)],
                               "b.npy: row 3 holds NaN or inf"),
    "a second file of another shape": (lambda d: [latent_file(d / "a.npy", rows=40),
                                                  latent_file(d / "b.npy", shape=(4, 3, 3))], "one store holds one shape"),
    "zero rows": (lambda d: [latent_file(d / "a.npy", rows=0)], "hold no rows"),
    "zero channels": (lambda d: [latent_file(d / "a.npy", shape=(0, 8, 8))], "have an empty dimension"),
    "a label past int64": (lambda d: [latent_file(d / "a.npz", labels=np.full(12, 2**63 + 5, np.uint64))],
                           "label 9223372036854775813 (row 0) is neither -1"),
    "a negative label": (lambda d: [latent_file(d / "a.npz", labels=np.array([0] * 7 + [-5] * 5))], "label -5 (row 7)"),
    "a header claiming a huge array": (lambda d: [_huge_header(d / "a.npy")], "cannot be read as .npy"),
}


def _huge_header(path: Path) -> Path:
    """A .npy file whose header promises 10^12 latents but holds a few bytes."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4, 2, 2)}
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        file.write(b"\0" * 64)
    return path


@pytest.mark.parametrize("case", LATENT_FILE_CASES)
def test_a_bad_latent_file_is_one_line_and_the_next_import_needs_no_overwrite(tmp_path, case):
    make, reason = LATENT_FILE_CASES[case]
    out = tmp_path / "out" / "latents.zarr"
    one_error_line(runner.invoke(app, ["import-latents", *map(str, make(tmp_path)), "--out", str(out)]), reason)
    assert not out.exists()
    good = latent_file(tmp_path / "good.npy", rows=20)
    ok(["import-latents", str(good), "--out", str(out)])
    assert len(LatentStore.open(str(out))) == 20


# --------------------------------------------------------------------------- image folders and shards


def encode_args(source, out, vae) -> list[str]:
    return ["encode", str(source), "--out", str(out), "--vae", str(vae), "--image-size", str(TINY_IMAGE_SIZE),
            "--workers", "0", "--batch-size", "3"]


def listing(root: Path, *outputs: Path) -> set[str]:
    """Every path under `root` (links not followed), outputs left out."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not any(p == o or o in p.parents for o in outputs)}


def test_an_image_folder_of_hostile_entries_encodes_its_images_and_skips_the_rest(photo_folder, tiny_dc_vae_dir,
                                                                                tmp_path):
    import os

    source = tmp_path / "photos"
    cats = source / "cats"
    cats.mkdir(parents=True)
    good = sorted(photo_folder.rglob("*.jpg"))[:4]
    for i, path in enumerate(good):
        shutil.copy(path, cats / f"good{i}.jpg")
    shutil.copy(good[0], os.fsdecode(bytes(cats) + b"/caf\xe9.jpg"))  # a name that is not UTF-8
    os.mkdir(os.fsdecode(bytes(source) + b"/d\xf6gs"))  # a class folder whose name is not UTF-8
    shutil.copy(good[1], os.fsdecode(bytes(source) + b"/d\xf6gs/dog.jpg"))
    (cats / "loop1.jpg").symlink_to("loop2.jpg")  # links that point at each other
    (cats / "loop2.jpg").symlink_to("loop1.jpg")
    os.mkfifo(cats / "pipe.jpg")  # reading it would wait forever
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "zero.jpg").symlink_to("/dev/zero")  # out of the folder: skipped by the link policy
    before = listing(tmp_path)
    out = tmp_path / "latents.zarr"
    output = ok(encode_args(source, out, tiny_dc_vae_dir))
    assert "skipped 2 file(s) or folder(s) whose names are not UTF-8 (e.g. d\\xf6gs)" in output
    store = LatentStore.open(str(out))
    assert list(store.keys[:]) == [f"cats/good{i}.jpg" for i in range(4)]
    assert [key for key, _ in store.skipped] == ["cats/empty.jpg", "cats/loop1.jpg", "cats/loop2.jpg", "cats/pipe.jpg"]
    assert "not a regular file" in dict(store.skipped)["cats/pipe.jpg"]
    assert "Too many levels of symbolic links" in dict(store.skipped)["cats/loop1.jpg"]
    assert listing(tmp_path, out) == before
    assert "already complete" in ok(encode_args(source, out, tiny_dc_vae_dir))


def shards_of(photo_folder: Path, folder: Path, key, label) -> str:
    """The 12 photos as webdataset shards of 5 samples, sample i keyed key(i) with `cls` label(i)."""
    import webdataset as wds

    folder.mkdir(exist_ok=True)
    with wds.ShardWriter(str(folder / "s-%06d.tar"), maxcount=5, verbose=0) as sink:
        for i, path in enumerate(sorted(photo_folder.rglob("*.jpg"))):
            sink.write({"__key__": key(i), "jpg": path.read_bytes(), "cls": label(i)})
    return str(folder / "s-{000000..000002}.tar")


def test_shard_members_named_up_and_out_stay_inside_every_output(photo_folder, tiny_dc_vae_dir, tmp_path):
    names = lambda i: ("../escape{}", "/abs/escape{}", "ok/{}")[i % 3].format(i)  # noqa: E731
    shards = shards_of(photo_folder, tmp_path / "shards", names, lambda i: str(i % 3))
    before = listing(tmp_path)
    latents, run, tokens = tmp_path / "latents.zarr", tmp_path / "run", tmp_path / "tokens.zarr"
    ok(encode_args(shards, latents, tiny_dc_vae_dir))
    assert LatentStore.open(str(latents)).key(0) == "../escape0"
    ok(["fit", str(latents), "--out", str(run), "--preset", "tiny", "--codes", "2", "--epochs", "1", "--batch-size",
        "4", "--device", "cpu"])
    ok(["export-tokens", str(run), str(latents), "--out", str(tokens), "--format", "zarr+wds", "--device", "cpu"])
    ok(["decode", str(run), str(tokens), "--out", str(tmp_path / "images"), "--vae", str(tiny_dc_vae_dir),
        "--device", "cpu"])
    outputs = [latents, run, tokens, tmp_path / "tokens.zarr-wds", tmp_path / "images"]
    assert listing(tmp_path, *outputs) == before and not Path("/abs").exists()
    expected = {("escape{}.png", "abs/escape{}.png", "ok/{}.png")[i % 3].format(i) for i in range(12)}
    assert {str(p.relative_to(tmp_path / "images")) for p in (tmp_path / "images").rglob("*.png")} == expected


@pytest.mark.parametrize("bad", ["99999999999999999999999", "nan", "-5"])
def test_a_webdataset_label_that_is_no_label_stops_encode_and_the_fixed_shard_resumes(photo_folder, tiny_dc_vae_dir,
                                                                                    tmp_path, bad, monkeypatch):
    keys = lambda i: f"sample{i:02d}"  # noqa: E731
    shards = shards_of(photo_folder, tmp_path / "shards", keys, lambda i: bad if i == 7 else str(i % 3))
    out = tmp_path / "latents.zarr"
    monkeypatch.setattr("revq_pipe.stages.encode.default_chunk_rows", lambda *shape: 3)
    one_error_line(runner.invoke(app, encode_args(shards, out, tiny_dc_vae_dir)), "s-000001.tar",
                   f"sample 'sample07': its cls '{bad}' is neither -1 (unknown) nor a class number")
    kept = LatentStore.open(str(out), allow_incomplete=True).rows_done
    assert kept == 3  # the chunks before it are kept
    shards_of(photo_folder, tmp_path / "shards", keys, lambda i: str(i % 3))  # the shard fixed
    assert f"resumed after {kept} stored rows" in ok(encode_args(shards, out, tiny_dc_vae_dir))
    clean = shards_of(photo_folder, tmp_path / "clean", keys, lambda i: str(i % 3))
    ok(encode_args(clean, tmp_path / "clean.zarr", tiny_dc_vae_dir))
    resumed, expected = LatentStore.open(str(out)), LatentStore.open(str(tmp_path / "clean.zarr"))
    for name in ("latents", "labels", "keys", "mean", "std"):
        np.testing.assert_array_equal(resumed.group[name][:], expected.group[name][:], err_msg=name)


# --------------------------------------------------------------------------- token and latent stores


def _replace_array(group, name: str, values: np.ndarray) -> None:
    del group[name]
    group.create_array(name, shape=values.shape, chunks=(CHUNK, *values.shape[1:]), dtype=values.dtype)[:] = values


def _damage_store(path: Path, case: str) -> None:
    group = zarr.open_group(str(path), mode="r+")
    if case == "a negative id":
        ids = group["tokens"][:].astype(np.int32)
        ids[21, 3] = -1
        _replace_array(group, "tokens", ids)
    elif case == "one token too many":
        ids = group["tokens"][:]
        _replace_array(group, "tokens", np.concatenate([ids, ids[:, :1]], axis=1))
    elif case == "float ids":
        _replace_array(group, "tokens", group["tokens"][:].astype(np.float32) + 0.5)
    elif case == "integer latents":
        _replace_array(group, "latents", group["latents"][:].astype(np.int32))
    elif case == "attrs that are a list":
        group.attrs["revq"] = [1, 2]
    elif case == "no labels":
        del group["labels"]
    elif case == "garbage metadata":
        (path / "zarr.json").write_text("{garbage")


STORE_CASES = {
    "a negative id": ("tokens", "row 21 (key 'cats/img021.jpg') holds token id -1"),
    "one token too many": ("tokens", "holds 65 tokens per image, the run 64"),
    "float ids": ("tokens", "its 'tokens' must be integer ids (N, T), not float32"),
    "attrs that are a list": ("tokens", "was exported by another run"),
    "no labels": ("tokens", "it has no 'labels' array"),
    "garbage metadata": ("tokens", "is not a Zarr v3 group"),
    "integer latents": ("latents", "its 'latents' must be floats (N, C, H, W), not int32"),
}


@pytest.mark.parametrize("case", STORE_CASES)
def test_a_damaged_token_or_latent_store_is_one_line_before_anything_is_written(fitted, tmp_path, case):
    which, reason = STORE_CASES[case]
    if which == "tokens":
        tokens = tmp_path / "tokens.zarr"
        ok(["export-tokens", fitted["run"], fitted["good"], "--out", str(tokens), "--device", "cpu"])
        _damage_store(tokens, case)
        args = ["decode", fitted["run"], str(tokens), "--out", str(tmp_path / "out"), "--device", "cpu"]
    else:
        shutil.copytree(fitted["good"], tmp_path / "latents.zarr")
        _damage_store(tmp_path / "latents.zarr", case)
        args = ["export-tokens", fitted["run"], str(tmp_path / "latents.zarr"), "--out", str(tmp_path / "out")]
    one_error_line(runner.invoke(app, args), reason)
    assert not (tmp_path / "out").exists()
