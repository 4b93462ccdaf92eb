"""LatentLoader's two modes against each other, and its automatic choice between them."""

import numpy as np
import pytest
import torch

from revq_pipe.pipeline.train import loader as loader_module
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.storage.store import write_latent_store

COUNT = 45  # not a multiple of the chunk (8) nor of the batch (6)
SHAPE = (2, 3, 3)
LATENTS = np.broadcast_to(np.arange(COUNT, dtype=np.float16)[:, None, None, None], (COUNT, *SHAPE)).copy()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Row i holds the value i everywhere, so a batch says which rows it holds."""
    return write_latent_store(str(tmp_path_factory.mktemp("loader") / "s.zarr"), LATENTS, chunk_size=8)


def rows_of(loader: LatentLoader, epoch: int) -> list[int]:
    return [int(row[0, 0, 0]) for batch in loader.epoch(epoch) for row in batch]


@pytest.fixture
def small_stream_blocks(monkeypatch):
    monkeypatch.setattr(loader_module, "STREAM_BLOCK_BYTES", 1)  # blocks of two chunks: several per epoch


@pytest.mark.usefixtures("small_stream_blocks")
def test_resident_and_streamed_loaders_yield_the_same_rows_each_epoch(store):
    resident, streamed = (LatentLoader(store, 6, torch.device("cpu"), seed=5, drop_last=False, resident=mode)
                          for mode in (True, False))
    assert resident.resident and not streamed.resident
    for epoch in (0, 1):
        assert sorted(rows_of(resident, epoch)) == sorted(rows_of(streamed, epoch)) == list(range(COUNT))
    in_order = [LatentLoader(store, 6, torch.device("cpu"), shuffle=False, drop_last=False, resident=mode)
                for mode in (True, False)]
    assert rows_of(in_order[0], 0) == rows_of(in_order[1], 0) == list(range(COUNT))
    dropping = [LatentLoader(store, 6, torch.device("cpu"), seed=5, resident=mode) for mode in (True, False)]
    for loader in dropping:  # whole batches only: 7 of them, 42 distinct rows
        rows = rows_of(loader, 0)
        assert len(rows) == 42 and len(set(rows)) == 42


def test_the_loader_keeps_the_store_resident_when_half_the_free_memory_holds_it(store, monkeypatch):
    nbytes = LATENTS.nbytes
    monkeypatch.setattr(loader_module, "free_memory", lambda device: 2 * nbytes)
    assert LatentLoader(store, 6, torch.device("cpu")).resident
    monkeypatch.setattr(loader_module, "free_memory", lambda device: 2 * nbytes - 2)
    streamed = LatentLoader(store, 6, torch.device("cpu"))
    assert not streamed.resident and streamed.data is None
