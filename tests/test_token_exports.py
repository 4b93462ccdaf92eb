"""Token exports for training loaders: shard size, a seeded shuffled order, parquet files that load
with pyarrow and `datasets`, class names, the README's multi-worker webdataset loader, and the one
field (the latent store's key) on which the zarr, wds and parquet exports of a store join."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
import zarr
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

COUNT, CLASSES = 40, ["cat", "dog", "fox"]
# Keys with dots in their names, some differing only after a dot: webdataset cuts a sample's key at
# the first dot of a member's file name, so these are the keys an export could mix up.
DOTTED = ["cat/img.v2.jpg", "cat/img.v2.png", "cat/img_v2.jpg", "cat/img.v2", "cat/img", "cat/img.tar.gz"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A class-sorted latent store (as an ImageFolder gives), a run, and its Zarr token store."""
    root = tmp_path_factory.mktemp("exports")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [14, 13, 13])
    keys = DOTTED + [f"{CLASSES[label]}/img.{i:03d}.jpg" for i, label in enumerate(labels)][len(DOTTED):]
    store = write_latent_store(str(root / "latents.zarr"), rng.normal(size=(COUNT, 8, 4, 4)).astype(np.float32),
                               labels, keys, chunk_size=16, attrs={"vae": "test-vae", "classes": CLASSES})
    config = FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=16, device="cpu")
    fit(store.url, str(root / "run"), config, progress=False)
    assert cli("export-tokens", root / "run", store.url, "--out", root / "tokens.zarr").exit_code == 0
    tokens = TokenStore.open(str(root / "tokens.zarr"))
    by_key = {str(k): row for k, row in zip(tokens.keys[:], tokens.tokens[:])}
    return {"root": root, "run": root / "run", "store": store.url, "tokens": tokens, "by_key": by_key}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def shard_samples(folder):
    return list(wds.WebDataset(sorted(str(p) for p in folder.glob("tokens-*.tar")), shardshuffle=False).decode())


def shard_samples_of(path):
    return list(wds.WebDataset(str(path), shardshuffle=False))


def test_class_names_are_in_the_token_store(exported):
    assert exported["tokens"].attrs["classes"] == CLASSES


def test_shard_size_default_and_option(exported, tmp_path):
    export = exported["root"]
    assert cli("export-tokens", export / "run", exported["store"], "--out", tmp_path / "default",
               "--format", "wds").exit_code == 0
    assert len(list((tmp_path / "default").glob("*.tar"))) == 1  # 40 rows, 10,000 per shard
    assert cli("export-tokens", export / "run", exported["store"], "--out", tmp_path / "small",
               "--format", "wds", "--shard-size", 16).exit_code == 0
    sizes = [len(shard_samples_of(p)) for p in sorted((tmp_path / "small").glob("*.tar"))]
    assert sizes == [16, 16, 8]


def test_shuffled_export_is_a_seeded_permutation_keeping_each_rows_tokens(exported, tmp_path):
    def export(name, *extra):
        out = tmp_path / name
        result = cli("export-tokens", exported["run"], exported["store"], "--out", out, "--format", "wds",
                     "--shard-size", 16, *extra)
        assert result.exit_code == 0, result.output
        return out

    ordered, first, again, other = export("ordered"), export("a", "--shuffle"), export("b", "--shuffle"), \
        export("c", "--shuffle", "--seed", 1)
    keys = {name: [s["key.txt"] for s in shard_samples(folder)] for name, folder in
            (("ordered", ordered), ("first", first), ("other", other))}
    assert sorted(keys["first"]) == sorted(keys["ordered"]) and keys["first"] != keys["ordered"]
    assert keys["other"] != keys["first"]
    for a, b in zip(sorted(first.glob("*.tar")), sorted(again.glob("*.tar"))):  # same seed: the same bytes
        assert a.read_bytes() == b.read_bytes()
    # every shard mixes classes, where the store's order gives one class per shard at first
    first_shard = [s["cls"] for s in shard_samples_of(sorted(first.glob("*.tar"))[0])]
    assert len(set(first_shard)) == 3
    for sample in shard_samples(first):
        np.testing.assert_array_equal(sample["tokens.npy"], exported["by_key"][sample["key.txt"]])


def test_parquet_export_loads_with_pyarrow_and_datasets(exported, tmp_path, monkeypatch):
    out = tmp_path / "parquet"
    result = cli("export-tokens", exported["run"], exported["store"], "--out", out, "--format", "parquet",
                 "--shard-size", 16, "--shuffle")
    assert result.exit_code == 0, result.output
    files = sorted(str(p) for p in out.glob("*.parquet"))
    assert len(files) == 3
    table = pq.read_table(files)
    assert table.column_names == ["key", "label", "class", "tokens"] and table.num_rows == COUNT
    rows = table.to_pylist()
    for row in rows:
        np.testing.assert_array_equal(row["tokens"], exported["by_key"][row["key"]])
        assert row["class"] == CLASSES[row["label"]] and row["key"].startswith(row["class"] + "/")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="datasets is not installed: pip install -e '.[test]' brings it")
    dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.num_rows == COUNT and dataset[0]["key"] == rows[0]["key"]
    ids = dataset.with_format("torch")[:8]["tokens"].long()
    assert ids.shape == (8, 32) and ids.dtype == torch.int64


def test_the_readme_training_loop_reads_shards_with_two_workers(exported, tmp_path):
    out = tmp_path / "shards"
    assert cli("export-tokens", exported["run"], exported["store"], "--out", out, "--format", "wds",
               "--shard-size", 16, "--shuffle").exit_code == 0
    # The README's loader, as written there (with this test's paths and sizes).
    shards = sorted(str(p) for p in out.glob("tokens-*.tar"))
    dataset = (wds.WebDataset(shards, shardshuffle=len(shards), nodesplitter=wds.split_by_node)
               .shuffle(1000).decode().to_tuple("key.txt", "tokens.npy", "cls").batched(8))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=2)
    embedding = torch.nn.Embedding(8, 4)
    seen = []
    for keys, ids, labels in loader:
        ids = torch.as_tensor(ids).long()  # uint16 on disk; int64 for nn.Embedding and cross_entropy
        labels = torch.as_tensor(labels)
        assert embedding(ids).shape == (len(keys), 32, 4) and labels.dtype == torch.int64
        seen += keys
    assert sorted(seen) == sorted(exported["by_key"])


def test_zarr_wds_and_parquet_exports_join_on_the_key(exported, tmp_path):
    """One row per image in each export, joined on the latent store's key: the same tokens and label."""
    for format in ("wds", "parquet"):
        result = cli("export-tokens", exported["run"], exported["store"], "--out", tmp_path / format,
                     "--format", format, "--shard-size", 16, "--shuffle")
        assert result.exit_code == 0, result.output
    tokens = exported["tokens"]
    zarr_rows = {key: (list(ids), label) for key, ids, label in
                 zip(tokens.keys[:].tolist(), tokens.tokens[:], tokens.labels[:].tolist())}
    wds_rows = {s["key.txt"]: (list(s["tokens.npy"]), s["cls"]) for s in shard_samples(tmp_path / "wds")}
    parquet_rows = {row["key"]: (row["tokens"], row["label"])
                    for row in pq.read_table(sorted(str(p) for p in (tmp_path / "parquet").glob("*.parquet"))).to_pylist()}
    store_keys = zarr.open_group(exported["store"], mode="r")["keys"][:].tolist()
    assert len(zarr_rows) == len(wds_rows) == len(parquet_rows) == COUNT  # no two keys shared a row
    assert sorted(zarr_rows) == sorted(wds_rows) == sorted(parquet_rows) == sorted(store_keys)
    assert set(DOTTED) <= set(store_keys)
    for key in store_keys:
        assert zarr_rows[key] == wds_rows[key] == parquet_rows[key], key
