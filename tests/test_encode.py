"""`revq-pipe encode`: tiny real diffusers VAEs, real photo crops, ImageFolder and webdataset."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import PHOTO_CLASSES, PHOTO_COUNT, TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.storage import store as store_module
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.sources import decode_image, to_model_input
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.stages.encode import encode

runner = CliRunner()
SMALL = dict(image_size=TINY_IMAGE_SIZE, batch_size=3, workers=0, chunk_size=4, progress=False)


def direct_latents(vae_dir: Path, class_name: str, files: list[Path]) -> np.ndarray:
    """vae.encode of the preprocessed images, straight through diffusers: the reference."""
    import diffusers

    model = getattr(diffusers, class_name).from_pretrained(vae_dir).eval()
    x = to_model_input(torch.stack([decode_image(f.read_bytes(), TINY_IMAGE_SIZE) for f in files]))
    with torch.no_grad():
        out = model.encode(x)
    z = out.latent_dist.mean if class_name == "AutoencoderKL" else out.latent
    return z.numpy()


def store_arrays(url) -> dict:
    store = LatentStore.open(str(url))
    return {"latents": store.latents[:], "labels": store.labels[:], "keys": [str(k) for k in store.keys[:]],
            "mean": store.mean, "std": store.std, "attrs": store.attrs}


def cli(*args) -> "object":
    return runner.invoke(app, [str(a) for a in args])


def test_folder_with_classes_through_autoencoder_dc(photo_folder, tiny_dc_vae_dir, tmp_path):
    summary = encode(str(photo_folder), str(tmp_path / "s.zarr"), vae=str(tiny_dc_vae_dir), dtype="float32", **SMALL)
    got = store_arrays(tmp_path / "s.zarr")
    files = sorted(photo_folder.rglob("*.jpg"))
    assert list(got["keys"]) == [f.relative_to(photo_folder).as_posix() for f in files]
    assert [PHOTO_CLASSES[label] for label in got["labels"]] == [f.parent.name for f in files]
    assert got["latents"].shape == (PHOTO_COUNT, 4, 8, 8) and got["latents"].dtype == np.float32
    np.testing.assert_allclose(got["latents"], direct_latents(tiny_dc_vae_dir, "AutoencoderDC", files),
                               rtol=1e-4, atol=1e-5)
    flat = got["latents"].reshape(PHOTO_COUNT, -1).astype(np.float64)
    np.testing.assert_allclose(got["mean"], flat.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["std"], flat.std(0), rtol=1e-5, atol=1e-6)
    attrs = got["attrs"]
    assert attrs["complete"] and attrs["count"] == PHOTO_COUNT and attrs["vae"] == str(tiny_dc_vae_dir)
    assert attrs["vae_class"] == "AutoencoderDC" and attrs["image_size"] == TINY_IMAGE_SIZE
    assert attrs["latent_shape"] == [4, 8, 8] and attrs["skipped_keys"] == []
    assert summary.count == PHOTO_COUNT and summary.encoded == PHOTO_COUNT
    assert "12 latents of 4x8x8 stored as float32 (computed in float32)" in summary.report()
    assert attrs["classes"] == list(PHOTO_CLASSES)  # label i is the folder classes[i]


def test_flat_folder_through_autoencoder_kl_cli(flat_photo_folder, tiny_kl_vae_dir, tmp_path):
    # float16 storage, the default; the KL VAE's sample_size (32) is the default image size.
    result = cli("encode", flat_photo_folder, "--out", tmp_path / "s.zarr", "--vae", tiny_kl_vae_dir,
                 "--batch-size", 5, "--workers", 0)
    assert result.exit_code == 0, result.output
    # float16 is the storage dtype; on the CPU the VAE computes in float32 (bf16 autocast is CUDA's)
    assert "12 latents of 4x16x16 stored as float16 (computed in float32)" in result.output
    got = store_arrays(tmp_path / "s.zarr")
    assert set(got["labels"]) == {-1} and got["attrs"]["classes"] == []
    files = [flat_photo_folder / k for k in got["keys"]]
    expected = direct_latents(tiny_kl_vae_dir, "AutoencoderKL", files)
    assert got["latents"].dtype == np.float16
    np.testing.assert_allclose(got["latents"].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert got["attrs"]["vae_class"] == "AutoencoderKL"


def test_webdataset_shards_match_the_folder(photo_folder, photo_shards, tiny_dc_vae_dir, tmp_path):
    options = {**SMALL, "workers": 2}  # two worker processes, one shard each at a time
    encode(photo_shards, str(tmp_path / "wds.zarr"), vae=str(tiny_dc_vae_dir), **options)
    encode(str(photo_folder), str(tmp_path / "dir.zarr"), vae=str(tiny_dc_vae_dir), **SMALL)
    shards, folder = store_arrays(tmp_path / "wds.zarr"), store_arrays(tmp_path / "dir.zarr")
    assert list(shards["keys"]) == [k.rsplit(".", 1)[0] for k in folder["keys"]]
    assert np.array_equal(shards["labels"], folder["labels"])
    np.testing.assert_allclose(shards["latents"].astype(np.float32), folder["latents"].astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    assert shards["attrs"]["source"]["kind"] == "webdataset"


def test_folder_with_worker_processes_gives_the_same_store(photo_folder, tiny_dc_vae_dir, tmp_path):
    encode(str(photo_folder), str(tmp_path / "w2.zarr"), vae=str(tiny_dc_vae_dir), **{**SMALL, "workers": 2})
    encode(str(photo_folder), str(tmp_path / "w0.zarr"), vae=str(tiny_dc_vae_dir), **SMALL)
    two, none = store_arrays(tmp_path / "w2.zarr"), store_arrays(tmp_path / "w0.zarr")
    for name in ("latents", "labels", "keys", "mean", "std"):
        assert np.array_equal(two[name], none[name]), name
    assert two["attrs"]["encoder"]["workers"] == 2 and none["attrs"]["encoder"]["workers"] == 0
    assert {**two["attrs"], "encoder": None} == {**none["attrs"], "encoder": None}


def damaged_folder(photo_folder: Path, root: Path) -> tuple[Path, list[str]]:
    """A copy of the photos with odd colour modes, one truncated JPEG and one fake PNG."""
    shutil.copytree(photo_folder, root)
    files = sorted(root.rglob("*.jpg"))
    base = Image.open(files[0]).convert("RGB")
    base.convert("L").save(root / "astronaut" / "gray.png")
    base.convert("P").save(root / "astronaut" / "palette.png")
    base.convert("RGBA").save(root / "chelsea" / "alpha.png")
    base.convert("CMYK").save(root / "coffee" / "cmyk.jpg")
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) // 3])
    (root / "coffee" / "fake.png").write_bytes(b"\x89PNG not really")
    bad = [files[5].relative_to(root).as_posix(), "coffee/fake.png"]
    return root, bad


def test_corrupt_images_are_skipped_and_reported(photo_folder, tiny_dc_vae_dir, tmp_path):
    root, bad = damaged_folder(photo_folder, tmp_path / "photos")
    result = cli("encode", root, "--out", tmp_path / "s.zarr", "--vae", tiny_dc_vae_dir,
                 "--image-size", TINY_IMAGE_SIZE, "--batch-size", 4, "--workers", 0)
    assert result.exit_code == 0, result.output
    got = store_arrays(tmp_path / "s.zarr")
    assert len(got["keys"]) == PHOTO_COUNT + 5 - 2  # 4 odd colour modes and a fake PNG added
    assert sorted(got["attrs"]["skipped_keys"]) == sorted(bad) and got["attrs"]["skipped_count"] == 2
    assert not set(bad) & set(got["keys"])
    assert {"astronaut/gray.png", "astronaut/palette.png", "chelsea/alpha.png", "coffee/cmyk.jpg"} <= set(got["keys"])
    assert "2 skipped" in result.output and bad[0] in result.output


class InjectedCrash(RuntimeError):
    pass


def crash_after(monkeypatch, writes: int, after_write: bool) -> list[int]:
    """Make LatentStore.write fail on call number `writes + 1` (before or after it writes)."""
    real_write, starts = store_module.LatentStore.write, []

    def failing_write(self, start, latents, labels, keys, **flipped):
        starts.append(start)
        if len(starts) > writes:
            if after_write:
                real_write(self, start, latents, labels, keys, **flipped)
            raise InjectedCrash(f"simulated crash at row {start}")
        real_write(self, start, latents, labels, keys, **flipped)

    monkeypatch.setattr(store_module.LatentStore, "write", failing_write)
    return starts


@pytest.mark.parametrize("source_kind, writes, after_write", [("folder", 2, False), ("shards", 1, True)])
def test_interrupted_run_resumes_to_an_identical_store(photo_folder, photo_shards, tiny_dc_vae_dir, tmp_path,
                                                       monkeypatch, source_kind, writes, after_write):
    if source_kind == "folder":
        source, _ = damaged_folder(photo_folder, tmp_path / "photos")
        source = str(source)
    else:
        source = photo_shards
    options = dict(vae=str(tiny_dc_vae_dir), **SMALL)
    clean = encode(source, str(tmp_path / "clean.zarr"), **options)

    with monkeypatch.context() as patch:
        crash_after(patch, writes, after_write)
        with pytest.raises(InjectedCrash):
            encode(source, str(tmp_path / "resumed.zarr"), **options)
    with pytest.raises(UserError, match="incomplete"):
        LatentStore.open(str(tmp_path / "resumed.zarr"))

    with monkeypatch.context() as patch:
        starts = crash_after(patch, writes=10**6, after_write=False)  # records, never fails
        resumed = encode(source, str(tmp_path / "resumed.zarr"), **options)
    chunk = SMALL["chunk_size"]
    assert starts[0] == writes * chunk  # picks up at the first uncommitted chunk: nothing twice
    assert starts == list(range(writes * chunk, clean.count, chunk))  # ... and nothing missing
    assert resumed.resumed_rows == writes * chunk and resumed.count == clean.count

    a, b = store_arrays(tmp_path / "clean.zarr"), store_arrays(tmp_path / "resumed.zarr")
    for name in ("latents", "labels", "keys", "mean", "std"):
        assert np.array_equal(a[name], b[name]), name
    assert a["attrs"] == b["attrs"]


def test_a_store_at_an_fsspec_url_is_written_and_resumed_like_a_local_one(photo_folder, tiny_dc_vae_dir, tmp_path,
                                                                          memory_root, monkeypatch):
    url = f"{memory_root}/s.zarr"
    with monkeypatch.context() as patch:
        crash_after(patch, writes=1, after_write=False)
        with pytest.raises(InjectedCrash):
            encode(str(photo_folder), url, vae=str(tiny_dc_vae_dir), **SMALL)
    assert encode(str(photo_folder), url, vae=str(tiny_dc_vae_dir), **SMALL).resumed_rows == SMALL["chunk_size"]
    encode(str(photo_folder), str(tmp_path / "local.zarr"), vae=str(tiny_dc_vae_dir), **SMALL)
    remote, local = store_arrays(url), store_arrays(tmp_path / "local.zarr")
    for name in ("latents", "labels", "keys", "mean", "std"):
        assert np.array_equal(remote[name], local[name]), name
    assert encode(str(photo_folder), url, vae=str(tiny_dc_vae_dir), **SMALL).already_complete
    with pytest.raises(UserError, match="other settings"):
        encode(str(photo_folder), url, vae=str(tiny_dc_vae_dir), **{**SMALL, "image_size": 64})


def test_rerun_of_a_complete_store_does_nothing(photo_folder, tiny_dc_vae_dir, tmp_path):
    args = ("encode", photo_folder, "--out", tmp_path / "s.zarr", "--vae", tiny_dc_vae_dir,
            "--image-size", TINY_IMAGE_SIZE, "--workers", 0)
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 0 and "already complete" in again.output


def assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_bad_usage_exits_2_with_one_line(photo_folder, tiny_dc_vae_dir, tmp_path):
    vae = ("--vae", tiny_dc_vae_dir, "--image-size", TINY_IMAGE_SIZE, "--workers", 0)
    out = ("--out", tmp_path / "s.zarr")
    assert_user_error(cli("encode", tmp_path / "missing", *out, *vae), "source not found")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("encode", tmp_path / "empty", *out, *vae), "is empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text")
    assert_user_error(cli("encode", tmp_path / "docs", *out, *vae), "no images")
    assert_user_error(cli("encode", photo_folder, *out, "--vae", tmp_path / "no-such-vae"), "VAE directory not found")
    assert_user_error(cli("encode", photo_folder, *out, *vae, "--image-size", 30), "multiple of 4")
    assert_user_error(cli("encode", photo_folder, *out, *vae, "--dtype", "bfloat16"), "--dtype")
    (tmp_path / "fakes").mkdir()
    for i in range(3):
        (tmp_path / "fakes" / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert_user_error(cli("encode", tmp_path / "fakes", *out, *vae), "no decodable images")
    assert not (tmp_path / "s.zarr").exists()  # nothing half-written
    assert_user_error(cli("encode", photo_folder, "--out", photo_folder / "s.zarr", *vae), "inside SOURCE")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert_user_error(cli("encode", photo_folder, "--out", tmp_path / "notes", *vae, "--overwrite"), "not a Zarr store")


def test_other_settings_need_overwrite(photo_folder, tiny_dc_vae_dir, tmp_path):
    args = ("encode", photo_folder, "--out", tmp_path / "s.zarr", "--vae", tiny_dc_vae_dir, "--workers", 0)
    assert cli(*args, "--image-size", TINY_IMAGE_SIZE).exit_code == 0
    assert_user_error(cli(*args, "--image-size", 64), "other settings (image_size: 32 there, 64 now")
    assert_user_error(cli(*args, "--image-size", TINY_IMAGE_SIZE, "--dtype", "float32"), "dtype")
    replaced = cli(*args, "--image-size", 64, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert LatentStore.open(str(tmp_path / "s.zarr")).latent_shape == (4, 16, 16)


def test_default_vae_offline_falls_back_to_the_embedded_one(photo_folder, tiny_dc_vae_dir, tmp_path, monkeypatch,
                                                            caplog):
    import huggingface_hub.constants

    from revq_pipe.pipeline.images import vae as vae_module

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(vae_module, "EMBEDDED_VAE_DIR", tmp_path / "not-installed")
    assert_user_error(cli("encode", photo_folder, "--out", tmp_path / "a.zarr"), "no VAE available offline")

    monkeypatch.setattr(vae_module, "EMBEDDED_VAE_DIR", tiny_dc_vae_dir)
    monkeypatch.setattr(vae_module, "EMBEDDED_IMAGE_SIZE", TINY_IMAGE_SIZE)
    result = cli("encode", photo_folder, "--out", tmp_path / "b.zarr", "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "using the embedded VAE" in caplog.text  # one warning line (stderr outside pytest)
    attrs = LatentStore.open(str(tmp_path / "b.zarr")).attrs
    assert attrs["vae"] == "revq-pipe-embedded" and attrs["image_size"] == TINY_IMAGE_SIZE


def test_bench_encode_runs_end_to_end_on_the_cpu():
    from conftest import TINY_DC_CONFIG
    from revq_pipe.stages.bench.encode import bench_encode

    result = bench_encode("cpu", images=6, batch_size=3, vae_config=TINY_DC_CONFIG)
    names = [row.name for row in result.rows]
    assert names[0].startswith("reference: encoder alone, fp32") and names[-1].startswith("end to end")
    assert result.rows[-1].images == 6 and all(row.rate > 0 for row in result.rows)
    report = result.report()
    assert "img/s" in report and "1.00x" in report and "random weights" in report


def test_the_embedded_vae_has_one_name_by_path_too(tiny_dc_vae_dir, monkeypatch):
    from revq_pipe.pipeline.images import vae as vae_module

    monkeypatch.setattr(vae_module, "EMBEDDED_VAE_DIR", tiny_dc_vae_dir)
    monkeypatch.setattr(vae_module, "EMBEDDED_IMAGE_SIZE", TINY_IMAGE_SIZE)
    spec = vae_module.resolve_vae(str(tiny_dc_vae_dir))
    assert spec.name == "revq-pipe-embedded" and spec.default_image_size == TINY_IMAGE_SIZE and spec.note is None


def test_vae_resolution_errors(tmp_path, tiny_dc_vae_dir, monkeypatch):
    import json

    import huggingface_hub.constants

    from revq_pipe.pipeline.images.vae import resolve_vae

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="not in the Hugging Face cache, and the hub is offline"):
        resolve_vae("someone/some-vae")
    with pytest.raises(UserError, match="neither|not found"):
        resolve_vae("not a model id")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="UNet2DModel, not a VAE"):
        resolve_vae(str(tmp_path / "unet"))
    (tmp_path / "bare").mkdir()
    shutil.copy(tiny_dc_vae_dir / "config.json", tmp_path / "bare" / "config.json")
    with pytest.raises(UserError, match="no diffusers weights"):
        resolve_vae(str(tmp_path / "bare"))
    (tmp_path / "pipeline" / "vae").mkdir(parents=True)
    for item in tiny_dc_vae_dir.iterdir():
        shutil.copy(item, tmp_path / "pipeline" / "vae" / item.name)
    spec = resolve_vae(str(tmp_path / "pipeline"))  # a pipeline folder with a vae/ subfolder
    assert spec.subfolder == "vae" and spec.class_name == "AutoencoderDC" and spec.latent_shape(32) == (4, 8, 8)


def test_unreachable_hub_fails_fast_and_the_default_falls_back(tiny_dc_vae_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from revq_pipe.pipeline.images import vae as vae_module

    # Not offline, but the hub's address does not resolve (the .invalid domain never does).
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.revq-test.invalid")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="hub cannot be reached"):
        vae_module.resolve_vae("someone/some-vae")
    monkeypatch.setattr(vae_module, "EMBEDDED_VAE_DIR", tiny_dc_vae_dir)
    spec = vae_module.resolve_vae(None)
    assert spec.name == "revq-pipe-embedded" and "cannot be reached" in spec.note
