"""The latent and token stores: layout, chunk-aligned writes, the resume protocol, dask statistics,
chunk marks and staging for --cluster jobs, local paths and fsspec URLs."""

import ast
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.stats import latent_stats
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore

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
    mean, std = latent_stats(*store.dask_latents())
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


def test_a_latent_store_at_an_fsspec_url_is_written_resumed_and_finished(memory_root):
    url = f"{memory_root}/s.zarr"
    latents = np.random.default_rng(3).standard_normal((10, 2, 2, 2)).astype(np.float16)
    store = LatentStore.create(url, n=8, latent_shape=(2, 2, 2), dtype="float16", chunk_size=4, attrs={},
                               unfinished=True)
    store.write(0, latents[:4], np.arange(4), np.array(list("abcd")))
    store.commit(4, {"cursor": [0, 4]}, count=4)
    with pytest.raises(UserError, match="incomplete"):
        LatentStore.open(url)

    again = LatentStore.open(url, mode="r+", allow_incomplete=True)  # a new process picks it up
    assert (again.rows_done, again.progress, again.complete) == (4, {"cursor": [0, 4]}, False)
    again.resize(10)
    again.write(4, latents[4:], np.arange(4, 10), np.array(list("efghij")))
    again.finish(count=10)

    done = LatentStore.open(url)
    assert done.complete and done.rows_done == 10 and done.progress == {} and done.attrs["count"] == 10
    assert np.array_equal(done.latents[:], latents) and [str(k) for k in done.keys[:]] == list("abcdefghij")
    mean, std = done.require_stats()
    flat = latents.reshape(10, -1).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-5)
    assert done.nbytes_stored() > 0


def test_a_token_store_at_an_fsspec_url_is_appended_resumed_and_finished(memory_root):
    url = f"{memory_root}/t.zarr"
    ids = np.random.default_rng(4).integers(0, 300, size=(7, 5))
    store = TokenStore.create(url, n=7, tokens=5, codes=300, chunk_size=3, attrs={"run": "r"})
    store.append(ids[:3], np.zeros(3), np.array(list("abc")))
    with pytest.raises(ValueError, match="not one chunk"):
        store.append(ids[3:5], np.zeros(2), np.array(list("de")))

    again = TokenStore.open(url, mode="r+")
    assert (again.rows_done, again.complete) == (3, False)
    again.append(ids[3:6], np.ones(3), np.array(list("def")))
    again.append(ids[6:], np.ones(1), np.array(["g"]))
    assert not TokenStore.open(url).complete  # every row written, but not finished yet
    again.finish()

    done = TokenStore.open(url)
    assert done.complete and done.rows_done == 7 and done.attrs["run"] == "r"
    assert done.tokens.dtype == np.uint16 and np.array_equal(done.tokens[:], ids)
    assert list(done.labels[:]) == [0, 0, 0, 1, 1, 1, 1]


def test_stores_written_before_the_shared_protocol_read_as_before(tmp_path):
    # Token stores counted only rows_done; unfinished latent stores kept their rows in `progress`;
    # latent stores written whole had no flag at all.
    tokens = TokenStore.create(str(tmp_path / "t.zarr"), n=4, tokens=2, codes=8, chunk_size=2, attrs={})
    tokens.group.attrs["revq"] = {"format_version": 1, "count": 4, "rows_done": 2}
    assert (tokens.rows_done, tokens.complete) == (2, False)
    tokens.group.attrs["revq"] = {"format_version": 1, "count": 4, "rows_done": 4}
    assert (tokens.rows_done, tokens.complete) == (4, True)

    latents = LatentStore.create(str(tmp_path / "l.zarr"), n=6, latent_shape=(1, 1, 1), dtype="float32",
                                 chunk_size=2, attrs={})
    assert (latents.rows_done, latents.complete) == (6, True)
    latents.group.attrs["revq"] = {"complete": False, "progress": {"rows": 2, "cursor": [0, 3]}}
    assert (latents.rows_done, latents.complete, latents.progress["cursor"]) == (2, False, [0, 3])


def test_chunk_marks_count_the_store_s_chunks_and_go_when_removed(tmp_path):
    tokens = TokenStore.create(str(tmp_path / "t.zarr"), n=7, tokens=2, codes=8, chunk_size=3, attrs={})
    assert tokens.chunk_marks("done") is None
    marks = tokens.chunk_marks("done", create=True)
    assert marks.undone() == [0, 1, 2]  # 7 rows in chunks of 3
    marks.mark(1)
    again = TokenStore.open(tokens.url, mode="r+").chunk_marks("done")
    assert again.undone() == [0, 2] and tokens.chunk_marks("done", create=True).undone() == [0, 2]
    tokens.remove_chunk_marks("done")
    assert TokenStore.open(tokens.url).chunk_marks("done") is None


def test_staging_lists_finished_pieces_and_goes_with_remove_staging(tmp_path):
    store = LatentStore.create(str(tmp_path / "l.zarr"), n=0, latent_shape=(1, 2, 2), dtype="float32",
                               chunk_size=4, attrs={}, unfinished=True)
    staging = store.staging()
    latents = np.arange(12, dtype=np.float32).reshape(3, 1, 2, 2)
    arrays = {"latents": latents, "labels": np.array([0, 1, 2]), "keys": np.array(["a", "b", "c"])}
    staging.write_piece("000000-000000000", arrays, {"rows": 3})
    staging.write_piece("000000-000000001", {**arrays, "latents": latents[:0], "labels": np.zeros(0, np.int64),
                                            "keys": np.array([], dtype=str)}, {"rows": 0})
    assert staging.record("000000-000000002") is None
    again = LatentStore.open(store.url, mode="r+", allow_incomplete=True).staging()
    assert sorted(record["rows"] for record in again.records()) == [0, 3]
    assert np.array_equal(again.rows("000000-000000000", "latents", 1, 3), latents[1:3])
    assert list(again.rows("000000-000000000", "keys", 0, 3)) == ["a", "b", "c"]
    assert again.chunk_marks() is None and again.chunk_marks(2).undone() == [0, 1]
    store.remove_staging()
    assert LatentStore.open(store.url, mode="r+", allow_incomplete=True).staging().records() == []


# Modules that use the stores for a --cluster job or a policy: Zarr stays behind the stores' methods.
ZARR_FREE = ["pipeline/scaleout/staged_encode.py", "pipeline/scaleout/token_tasks.py",
             "pipeline/scaleout/chunk_tasks.py", "pipeline/storage/stats.py", "pipeline/storage/resume.py"]


@pytest.mark.parametrize("module", ZARR_FREE)
def test_tasks_and_store_policies_reach_zarr_only_through_the_stores(module):
    tree = ast.parse((Path(__file__).parents[1] / module).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name and name.split(".")[0] == "zarr"]
    groups = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "group"]
    assert not groups, f"{module} reaches into a store's Zarr group at lines {groups}"
    assert "zarr.json" not in (Path(__file__).parents[1] / module).read_text()
