"""Every random purpose of training has its own stream, derived from --seed, and runs reproduce."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from revq_pipe.pipeline.train.codebook_init import sample_rows
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.seeds import STREAMS, stream_seed
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit


def test_each_stream_is_numpys_spawned_child_for_its_purpose():
    for seed in (0, 7):
        children = np.random.SeedSequence(seed).spawn(len(STREAMS))
        for stream, child in zip(STREAMS, children):
            expected = int(child.generate_state(1, np.uint64)[0]) >> 1
            assert stream_seed(seed, stream) == expected
        epoch_3 = np.random.SeedSequence(seed).spawn(len(STREAMS))[STREAMS.index("data_order")].spawn(4)[3]
        assert stream_seed(seed, "data_order", 3) == int(epoch_3.generate_state(1, np.uint64)[0]) >> 1


def test_no_two_purposes_or_epochs_share_a_seed():
    seeds = [stream_seed(0, stream, *index) for stream in STREAMS for index in [(), *[(e,) for e in range(20)]]]
    assert len(set(seeds)) == len(seeds)
    # the bug this replaces: reset noise of epoch e was seeded like the data order of epoch e + 1
    assert all(stream_seed(0, "reset_noise", e) != stream_seed(0, "data_order", e + 1) for e in range(20))
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_seed(0, "dropout")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("seeds") / "store")
    latents = np.random.default_rng(0).normal(size=(256, 8, 4, 4)).astype(np.float32)
    write_latent_store(url, latents, chunk_size=64)
    return url


def test_the_codebook_sample_is_not_the_first_batch(store):
    loader = LatentLoader(LatentStore.open(store), 64, torch.device("cpu"), seed=0)
    first_batch = next(iter(loader.epoch(0)))
    codes = 16
    sample = loader.rows(sample_rows(loader.n, codes, seed=0))
    shared = sum(bool((first_batch == row).all(dim=(1, 2, 3)).any()) for row in sample)
    assert shared < codes // 2  # by chance a few of 16 of 256 rows may also be in a batch of 64


def test_runs_reproduce_with_one_seed_and_differ_with_another(store, tmp_path):
    def weights(name, seed):
        config = FitConfig.from_preset("tiny", epochs=2, batch_size=32, codes=8, seed=seed, device="cpu")
        fit(store, str(tmp_path / name), config, progress=False)
        return load_file(tmp_path / name / "model.safetensors")

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["quantizer.codebooks"], other["quantizer.codebooks"])
