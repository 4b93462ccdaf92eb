"""export-tokens and decode: token store layout, resume, webdataset shards, the exact round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore, token_dtype
from revq_pipe.stages import export_tokens as export_module
from revq_pipe.stages.decode import decode
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

LATENT_SHAPE = (16, 4, 4)  # the tiny preset's d=4 gives T=64 tokens
COUNT = 40
CHUNK = 16  # 40 rows = chunks of 16, 16 and 8: resume and the short last chunk are both exercised
CODES = 32  # fit needs at least K latents for its initial codebook sample
VAE_ID = "test-vae"


def latent_store(path, shape=LATENT_SHAPE, count=COUNT, vae=VAE_ID, seed=0) -> LatentStore:
    rng = np.random.default_rng(seed)
    latents = (rng.normal(size=(count, *shape)) * rng.uniform(0.5, 2, size=shape)).astype(np.float16)
    labels = np.arange(count) % 3
    keys = [f"class{label}/img.{i:03d}.jpg" for i, label in enumerate(labels)]
    return write_latent_store(str(path), latents, labels, keys, chunk_size=CHUNK,
                              attrs={"vae": vae, "image_size": 32})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A latent store and a run fitted on it with the tiny preset (one short epoch)."""
    root = tmp_path_factory.mktemp("fitted")
    store = latent_store(root / "latents.zarr")
    config = FitConfig.from_preset("tiny", codes=CODES, epochs=1, batch_size=16, device="cpu")
    fit(store.url, str(root / "run"), config, progress=False)
    return store, root / "run"


def reference_model(run) -> ReVQ:
    return ReVQ.from_pretrained(run, device="cpu")


def store_latents(store: LatentStore) -> torch.Tensor:
    return torch.from_numpy(store.latents[:].astype(np.float32))


def test_token_dtype_follows_codes():
    assert token_dtype(16384) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(262144) == np.uint32
    with pytest.raises(UserError):
        token_dtype(0)


def test_export_writes_uint32_ids_for_more_than_65536_codes(tmp_path):
    # A one-token model keeps a 70,000-code codebook small; its ids need uint32.
    store = latent_store(tmp_path / "latents.zarr", shape=(1, 2, 2), count=8)
    config = ReVQConfig(latent_shape=(1, 2, 2), tokens=1, codes=70_000, dim=4, rectifier="none",
                        vae=VAE_ID)
    model = ReVQ(config)
    model.preprocessor.set_stats(*store.require_stats())
    model.save_pretrained(tmp_path / "run")

    export_tokens(str(tmp_path / "run"), store.url, str(tmp_path / "tokens.zarr"), device="cpu", progress=False)
    tokens = TokenStore.open(str(tmp_path / "tokens.zarr"))
    assert tokens.tokens.dtype == np.uint32
    assert tokens.attrs["codes"] == 70_000
    np.testing.assert_array_equal(tokens.tokens[:], model.tokenize(store_latents(store)).numpy())


def test_export_token_store_lines_up_with_latent_store(fitted, tmp_path):
    store, run = fitted
    out = str(tmp_path / "tokens.zarr")
    summary = export_tokens(str(run), store.url, out, batch_size=7, device="cpu", progress=False)
    assert "40 images" in summary.report()

    tokens = TokenStore.open(out)
    model = reference_model(run)
    assert tokens.tokens.shape == (COUNT, model.config.tokens)
    assert tokens.tokens.dtype == np.uint16
    assert tokens.chunk_size == CHUNK
    np.testing.assert_array_equal(tokens.tokens[:], model.tokenize(store_latents(store)).numpy())
    np.testing.assert_array_equal(tokens.labels[:], store.labels[:])
    np.testing.assert_array_equal(tokens.keys[:], store.keys[:])
    attrs = tokens.attrs
    assert attrs["run"] == export_module.Run.load(run).sha256
    assert (attrs["preset"], attrs["tokens"], attrs["codes"], attrs["dim"]) == ("tiny", 64, CODES, 4)
    assert attrs["latent_shape"] == list(LATENT_SHAPE) and attrs["vae"] == VAE_ID
    assert attrs["rows_done"] == COUNT


def test_batched_model_methods_on_no_rows_give_empty_arrays_of_their_kind(fitted):
    _, run = fitted
    model = reference_model(run)
    ids = model.tokenize_batched(np.zeros((0, *LATENT_SHAPE), np.float16), 7)
    assert ids.shape == (0, model.config.tokens) and ids.dtype == np.int64
    for latents in (model.detokenize_batched(ids, 7), model.forward_batched(np.zeros((0, *LATENT_SHAPE)), 7)):
        assert latents.shape == (0, *LATENT_SHAPE) and latents.dtype == np.float32


def fail_on_call(monkeypatch, owner, name: str, failing_call: int):
    """Make owner.name raise on its `failing_call`-th call: a crash in the middle of an export."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


def test_resume_after_injected_failure_gives_identical_token_store(fitted, tmp_path, monkeypatch):
    store, run = fitted
    clean, resumed = str(tmp_path / "clean.zarr"), str(tmp_path / "resumed.zarr")
    export_tokens(str(run), store.url, clean, device="cpu", progress=False)

    with monkeypatch.context() as patch:
        fail_on_call(patch, TokenStore, "append", failing_call=2)
        with pytest.raises(RuntimeError, match="injected"):
            export_tokens(str(run), store.url, resumed, device="cpu", progress=False)
    assert TokenStore.open(resumed).rows_done == CHUNK  # the first chunk survived, the second did not
    with pytest.raises(UserError, match="unfinished"):
        decode(str(run), resumed, str(tmp_path / "decoded.zarr"), device="cpu", progress=False)

    summary = export_tokens(str(run), store.url, resumed, device="cpu", progress=False)
    assert summary.resumed_from == CHUNK
    again = export_tokens(str(run), store.url, resumed, device="cpu", progress=False)
    assert "already complete" in again.report()
    a, b = TokenStore.open(clean), TokenStore.open(resumed)
    for name in ("tokens", "labels", "keys"):
        np.testing.assert_array_equal(getattr(a, name)[:], getattr(b, name)[:])
    assert a.attrs == b.attrs


def read_shards(folder) -> list[dict]:
    names = sorted(str(path) for path in folder.glob("tokens-*.tar"))
    return list(wds.WebDataset(names, shardshuffle=False).decode())


def test_webdataset_shards_hold_keys_tokens_and_labels(fitted, tmp_path, monkeypatch):
    store, run = fitted
    out = tmp_path / "tokens.zarr"
    export_tokens(str(run), store.url, str(out), device="cpu", format="zarr+wds", shard_size=12, progress=False)

    tokens = TokenStore.open(str(out))
    samples = read_shards(tmp_path / "tokens.zarr-wds")
    assert len(list((tmp_path / "tokens.zarr-wds").glob("tokens-*.tar"))) == 4  # 12+12+12+4
    assert [s["key.txt"] for s in samples] == list(tokens.keys[:]) == list(store.keys[:])  # the store's keys, exactly
    assert [s["__key__"] for s in samples] == [f"class{i % 3}/img%2E{i:03d}%2Ejpg" for i in range(COUNT)]
    np.testing.assert_array_equal(np.stack([s["tokens.npy"] for s in samples]), tokens.tokens[:])
    assert samples[0]["tokens.npy"].dtype == np.uint16
    assert [s["cls"] for s in samples] == list(store.labels[:])


def test_webdataset_resume_after_injected_failure_gives_identical_shards(fitted, tmp_path, monkeypatch):
    store, run = fitted
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    export_tokens(str(run), store.url, str(clean), device="cpu", format="wds", shard_size=12, progress=False)

    with monkeypatch.context() as patch:
        fail_on_call(patch, wds.TarWriter, "write", failing_call=30)  # inside the third shard
        with pytest.raises(RuntimeError, match="injected"):
            export_tokens(str(run), store.url, str(resumed), device="cpu", format="wds", shard_size=12,
                          progress=False)
    assert sorted(p.name for p in resumed.glob("tokens-*.tar")) == ["tokens-000000.tar", "tokens-000001.tar"]

    export_tokens(str(run), store.url, str(resumed), device="cpu", format="wds", shard_size=12, progress=False)
    names = sorted(p.name for p in clean.glob("tokens-*"))
    assert names == sorted(p.name for p in resumed.glob("tokens-*")) and len(names) == 4
    for name in names:
        assert (clean / name).read_bytes() == (resumed / name).read_bytes()


def test_export_refuses_store_of_another_shape_or_vae(fitted, tmp_path):
    _, run = fitted
    other_shape = latent_store(tmp_path / "shape.zarr", shape=(16, 2, 2))
    with pytest.raises(UserError, match="shape"):
        export_tokens(str(run), other_shape.url, str(tmp_path / "a.zarr"), device="cpu", progress=False)
    other_vae = latent_store(tmp_path / "vae.zarr", vae="another-vae")
    with pytest.raises(UserError, match="VAE"):
        export_tokens(str(run), other_vae.url, str(tmp_path / "b.zarr"), device="cpu", progress=False)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_export_refuses_tokens_of_another_store_without_overwrite(fitted, tmp_path):
    store, run = fitted
    out = str(tmp_path / "tokens.zarr")
    export_tokens(str(run), store.url, out, device="cpu", progress=False)
    other = latent_store(tmp_path / "other.zarr", seed=1)
    with pytest.raises(UserError, match="`overwrite=True`") as refused:
        export_tokens(str(run), other.url, out, device="cpu", progress=False)
    # names the field that differs, its value there and now, as encode does
    assert f"{out} holds tokens made from other inputs (store: " in str(refused.value)
    assert "/latents.zarr there, " in str(refused.value) and "/other.zarr now)" in str(refused.value)
    export_tokens(str(run), other.url, out, device="cpu", overwrite=True, progress=False)
    assert TokenStore.open(out).attrs["store"] == str((tmp_path / "other.zarr").resolve())


def test_shards_into_a_used_folder_name_what_differs(fitted, tmp_path):
    store, run = fitted
    out = tmp_path / "shards"
    export_tokens(str(run), store.url, str(out), device="cpu", format="wds", shard_size=12, progress=False)
    with pytest.raises(UserError) as refused:
        export_tokens(str(run), store.url, str(out), device="cpu", format="wds", shard_size=10, progress=False)
    assert str(refused.value) == (f"{out} holds the tokens of another export (shard_size: 12 there, 10 now): pass "
                                  f"`overwrite=True` to replace them, or choose another `out`")
    result = CliRunner().invoke(app, ["export-tokens", str(run), store.url, "--out", str(out), "--format", "parquet",
                                      "--shard-size", "12", "--device", "cpu"])
    assert result.exit_code == 2 and result.output == (
        f"error: {out} holds the tokens of another export (format: wds there, parquet now): pass --overwrite to "
        f"replace them, or choose another --out\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"notes holds other files \(e.g. keep.txt\) and no token export"):
        export_tokens(str(run), store.url, str(tmp_path / "notes"), device="cpu", format="wds", progress=False)


def test_decode_of_exported_tokens_equals_the_model_exactly(fitted, tmp_path):
    store, run = fitted
    tokens, decoded = str(tmp_path / "tokens.zarr"), str(tmp_path / "decoded.zarr")
    export_tokens(str(run), store.url, tokens, device="cpu", progress=False)
    decode(str(run), tokens, decoded, device="cpu", progress=False)

    out = LatentStore.open(decoded)
    # The model over the same batches as decode (one token-store chunk each): CPU kernels may
    # round differently for another batch size, so only equal batches can be compared bit for bit.
    model, latents = reference_model(run), store_latents(store)
    with torch.inference_mode():
        expected = torch.cat([model(latents[start:start + CHUNK]) for start in range(0, COUNT, CHUNK)]).numpy()
    assert out.latents.dtype == np.float32
    np.testing.assert_array_equal(out.latents[:], expected)
    np.testing.assert_array_equal(out.labels[:], store.labels[:])
    np.testing.assert_array_equal(out.keys[:], store.keys[:])
    mean, std = out.require_stats()
    np.testing.assert_allclose(mean, expected.reshape(COUNT, -1).mean(0), rtol=1e-4, atol=1e-5)
    assert out.attrs["vae"] == VAE_ID


def test_decode_refuses_tokens_of_another_run(fitted, tmp_path):
    store, run = fitted
    tokens = str(tmp_path / "tokens.zarr")
    export_tokens(str(run), store.url, tokens, device="cpu", progress=False)
    other_run = tmp_path / "other-run"
    config = FitConfig.from_preset("tiny", codes=CODES, epochs=1, batch_size=16, seed=1, device="cpu")
    fit(store.url, str(other_run), config, progress=False)
    with pytest.raises(UserError, match="another run"):
        decode(str(other_run), tokens, str(tmp_path / "decoded.zarr"), device="cpu", progress=False)
    assert not (tmp_path / "decoded.zarr").exists()


def test_cli_export_and_decode(fitted, tmp_path):
    store, run = fitted
    runner = CliRunner()
    tokens, decoded = str(tmp_path / "tokens.zarr"), str(tmp_path / "decoded.zarr")
    result = runner.invoke(app, ["export-tokens", str(run), store.url, "--out", tokens, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["decode", str(run), tokens, "--out", decoded, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(LatentStore.open(decoded)) == COUNT


def test_a_token_store_where_a_latent_store_belongs_is_named_as_such(fitted, tmp_path):
    store, run = fitted
    tokens = str(tmp_path / "tokens.zarr")
    assert CliRunner().invoke(app, ["export-tokens", str(run), store.url, "--out", tokens, "--device", "cpu"]).exit_code == 0
    for args in (["export-tokens", str(run), tokens, "--out", str(tmp_path / "again.zarr")],
                 ["eval", str(run), tokens, "--latent-only"],
                 ["fit", tokens, "--out", str(tmp_path / "run")],
                 ["stats", tokens]):
        result = CliRunner().invoke(app, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
        assert lines[0] == f"error: {tokens} is a token store (made by export-tokens), not a latent store", args
    assert not (tmp_path / "run").exists() and not (tmp_path / "again.zarr").exists()


@pytest.mark.parametrize("args, reason", [
    (["export-tokens", "{run}", "{store}", "--out", "{tmp}/t.zarr", "--format", "csv"], "unknown --format"),
    (["export-tokens", "{tmp}/no-run", "{store}", "--out", "{tmp}/t.zarr"], "run directory not found"),
    (["export-tokens", "{run}", "{tmp}/no-store", "--out", "{tmp}/t.zarr"], "no Zarr store"),
    (["decode", "{run}", "{store}", "--out", "{tmp}/d.zarr"],
     "is a latent store (made by encode or import-latents), not a token store"),
    (["export-tokens", "{run}", "{store}", "--out", "{tmp}/t.zarr", "--device", "tpu"], "unknown device"),
])
def test_bad_usage_exits_2_with_one_line(fitted, tmp_path, args, reason):
    store, run = fitted
    args = [a.format(run=run, store=store.url, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0]
