"""Every member of every webdataset shard export-tokens writes has a safe name (S2): relative, no
`..`, no leading `/`, whatever the keys. Checked with tarfile's own extraction filter, and by
extracting every shard. Every key keeps a sample of its own, and its exact text in `key.txt`."""

import tarfile
from urllib.parse import unquote

import numpy as np
import pytest
import webdataset as wds
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

HOSTILE = ["/abs/path/name.jpg", "../../escape.png", "a/../../b/c.jpg", "./dot/./x.jpg", "deep/ok.v2.jpg",
           "//double//slash.jpg", "..\\..\\windows.jpg", "plain"]
ESCAPED = ["%2Fabs/path/name%2Ejpg", "%2E%2E/%2E%2E/escape%2Epng", "a/%2E%2E/%2E%2E/b/c%2Ejpg", "%2E/dot/%2E/x%2Ejpg",
           "deep/ok%2Ev2%2Ejpg", "%2F%2Fdouble%2F%2Fslash%2Ejpg", "%2E%2E%5C%2E%2E%5Cwindows%2Ejpg", "plain"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    latents = np.random.default_rng(0).normal(size=(len(HOSTILE) * 4, 16, 4, 4)).astype(np.float32)
    keys = HOSTILE + [f"more/{i}.jpg" for i in range(len(HOSTILE), len(latents))]
    store = write_latent_store(str(root / "latents.zarr"), latents, keys=keys)
    config = FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=8, device="cpu")
    fit(store.url, str(root / "run"), config, progress=False)
    return store, root / "run"


def members(shards) -> list[tarfile.TarInfo]:
    found = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            found += tar.getmembers()
    return found


@pytest.mark.parametrize("format", ["wds", "zarr+wds"])
def test_shard_members_are_safe_whatever_the_keys(hostile, tmp_path, format):
    store, run = hostile
    out = tmp_path / "tokens"
    export_tokens(str(run), store.url, str(out), format=format, device="cpu", progress=False)
    folder = out if format == "wds" else tmp_path / "tokens-wds"
    shards = sorted(folder.glob("*.tar"))
    assert shards
    extracted = tmp_path / "extracted"
    for member in members(shards):
        parts = member.name.replace("\\", "/").split("/")
        assert member.isfile() and not member.name.startswith("/") and ".." not in parts, member.name
        tarfile.data_filter(member, str(extracted))  # raises for escaping links, devices, odd modes
    for shard in shards:
        with tarfile.open(shard) as tar:
            tar.extractall(extracted, filter="data")
    written = {p.resolve() for p in extracted.rglob("*") if p.is_file()}
    assert all(path.is_relative_to(extracted.resolve()) for path in written)
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode())
    assert [sample["__key__"] for sample in samples][:len(HOSTILE)] == ESCAPED
    assert [sample["key.txt"] for sample in samples] == list(store.keys[:])
    assert [unquote(sample["__key__"]) for sample in samples] == list(store.keys[:])  # as the README says


def test_keys_that_once_became_one_sample_name_are_samples_of_their_own(tmp_path):
    latents = np.random.default_rng(0).normal(size=(16, 16, 4, 4)).astype(np.float32)
    keys = [f"k{i}.jpg" for i in range(12)] + ["/same/x.jpg", "same/x.png", "same/x_png", "same/x"]
    store = write_latent_store(str(tmp_path / "latents.zarr"), latents, keys=keys)
    config = FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=8, device="cpu")
    fit(store.url, str(tmp_path / "run"), config, progress=False)
    export_tokens(str(tmp_path / "run"), store.url, str(tmp_path / "shards"), format="wds", device="cpu",
                  progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "tokens-000000.tar"), shardshuffle=False).decode())
    assert [sample["key.txt"] for sample in samples] == keys
    assert [sample["__key__"] for sample in samples][12:] == ["%2Fsame/x%2Ejpg", "same/x%2Epng", "same/x_png", "same/x"]


def test_an_empty_key_is_refused_before_anything_is_written(tmp_path):
    latents = np.random.default_rng(0).normal(size=(16, 16, 4, 4)).astype(np.float32)
    store = write_latent_store(str(tmp_path / "latents.zarr"), latents, keys=[f"k{i}" for i in range(15)] + [""])
    config = FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=8, device="cpu")
    fit(store.url, str(tmp_path / "run"), config, progress=False)
    result = CliRunner().invoke(app, ["export-tokens", str(tmp_path / "run"), store.url, "--out",
                                      str(tmp_path / "shards"), "--format", "wds"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: a row has the empty key, which names no webdataset sample: "
                                                  "give every row a key"]
    assert not (tmp_path / "shards").exists()
