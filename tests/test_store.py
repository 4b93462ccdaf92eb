"""The latent store: layout, chunk-aligned writes, the incomplete flag, dask statistics."""

import numpy as np
import pytest
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.stats import latent_stats
from revq_pipe.pipeline.store import LatentStore, write_latent_store

runner = CliRunner()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_is_lossless_across_chunks(tmp_path, dtype):
    rng = np.random.default_rng(0)
    latents = (rng.standard_normal((37, 4, 3, 3)) * 3).astype(dtype)
    labels = rng.integers(-1, 10, 37)
    keys = [f"class{i % 3}/img_{i}.jpg" for i in range(37)]
    store = write_latent_store(str(tmp_path / "s.zarr"), latents, labels, keys, chunk_size=8)
    again = LatentStore.open(str(tmp_path / "s.zarr"))
    assert again.chunk_size == 8 and len(again) == 37 and again.latent_shape == (4, 3, 3)
    assert np.array_equal(again.latents[:], latents) and again.latents.dtype == np.dtype(dtype)
    assert np.array_equal(again.labels[:], labels)
    assert [str(k) for k in again.keys[:]] == keys
    assert 0 < store.nbytes_stored()


def test_stats_accumulate_in_float64_over_chunks(tmp_path):
    # float16 values near 3000: any float16 accumulation would overflow (65504) or lose the spread.
    rng = np.random.default_rng(1)
    latents = (3000 + rng.standard_normal((300, 2, 2, 2)) * 4).astype(np.float16)
    store = write_latent_store(str(tmp_path / "s.zarr"), latents, chunk_size=64)
    flat = latents.reshape(300, -1).astype(np.float64)
    mean, std = latent_stats(store.latents)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-7)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-4)
    stored_mean, stored_std = store.require_stats()
    assert np.array_equal(stored_mean, mean) and np.array_equal(stored_std, std)


def test_stats_command_rewrites_mean_and_std(tmp_path):
    latents = np.random.default_rng(2).standard_normal((20, 3, 2, 2)).astype(np.float32)
    store = write_latent_store(str(tmp_path / "s.zarr"), latents, chunk_size=6)
    store.write_stats(np.zeros(12), np.ones(12))
    result = runner.invoke(app, ["stats", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    mean, std = LatentStore.open(str(tmp_path / "s.zarr")).require_stats()
    np.testing.assert_allclose(mean, latents.reshape(20, -1).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, latents.reshape(20, -1).std(0), rtol=1e-5)


def test_writes_must_be_chunk_aligned(tmp_path):
    store = LatentStore.create(str(tmp_path / "s.zarr"), n=10, latent_shape=(1, 1, 1), dtype="float32",
                               chunk_size=4, attrs={})
    rows = np.ones((4, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="aligned"):
        store.write(2, rows, np.zeros(4, np.int64), np.array(["a"] * 4))
    with pytest.raises(ValueError, match="aligned"):
        store.write(0, rows[:3], np.zeros(3, np.int64), np.array(["a"] * 3))
    store.write(8, rows[:2], np.zeros(2, np.int64), np.array(["a", "b"]))  # the short last chunk
    assert store.latents[8:].sum() == 2


def test_stores_grow_and_incomplete_ones_are_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = LatentStore.create(url, n=0, latent_shape=(2, 1, 1), dtype="float16", chunk_size=3,
                               attrs={"complete": False})
    store.resize(6)
    store.write(0, np.ones((3, 2, 1, 1), np.float16), np.arange(3), np.array(["a", "b", "c"]))
    assert len(store) == 6
    with pytest.raises(UserError, match="incomplete"):
        LatentStore.open(url)
    assert LatentStore.open(url, allow_incomplete=True).latents[:3].sum() == 6
    result = runner.invoke(app, ["stats", url])
    assert result.exit_code == 2 and "incomplete" in result.output
    store.resize(3)
    store.update_attrs(complete=True)
    assert len(LatentStore.open(url)) == 3


def test_missing_or_foreign_stores_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no Zarr store"):
        LatentStore.open(str(tmp_path / "nothing.zarr"))
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(UserError, match="not a latent store"):
        LatentStore.open(str(tmp_path / "other.zarr"))
