"""Every member of every webdataset shard export-tokens writes has a safe name (S2): relative, no
`..`, no leading `/`, whatever the keys. Checked with tarfile's own extraction filter, and by
extracting every shard."""

import tarfile

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
SANITISED = ["abs/path/name", "escape", "a/b/c", "dot/x", "deep/ok_v2", "double/slash", "windows", "plain"]


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
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert [sample["__key__"] for sample in samples][:len(HOSTILE)] == SANITISED
    assert len(samples) == len(store)


def test_keys_that_become_one_sample_name_are_refused(tmp_path):
    latents = np.random.default_rng(0).normal(size=(16, 16, 4, 4)).astype(np.float32)
    keys = [f"k{i}.jpg" for i in range(14)] + ["/same/x.jpg", "same/x.png"]
    store = write_latent_store(str(tmp_path / "latents.zarr"), latents, keys=keys)
    config = FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=8, device="cpu")
    fit(store.url, str(tmp_path / "run"), config, progress=False)
    result = CliRunner().invoke(app, ["export-tokens", str(tmp_path / "run"), store.url, "--out",
                                      str(tmp_path / "shards"), "--format", "wds"])
    assert result.exit_code == 2
    assert "'/same/x.jpg' (row 14) and 'same/x.png' (row 15) both become the webdataset __key__ 'same/x'" in result.output
    assert not (tmp_path / "shards").exists()
