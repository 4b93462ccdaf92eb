"""The latent store writer on its own: blocks out of order, skipped samples, chunks, resume."""

import numpy as np
import pytest
import torch

from revq_pipe.pipeline.storage.latent_writer import BlockOrder, ChunkWriter, WriteProgress
from revq_pipe.pipeline.images.sources import Block, Cursor
from revq_pipe.pipeline.storage.store import LatentStore

BLOCK = 3
CHUNK = 4
# Two parts (shards) of 7 and 4 samples; (part, index) pairs that fail to decode.
PART_SIZES = (7, 4)
BAD = {(0, 4), (1, 0)}


def block(part: int, start: int) -> tuple[Block, torch.Tensor]:
    """Samples [start, start + BLOCK) of a part, as a worker would deliver them, with latents
    that spell out their source position: row (part, index) holds [part, index]."""
    stop = min(start + BLOCK, PART_SIZES[part])
    good = [i for i in range(start, stop) if (part, i) not in BAD]
    b = Block(part, start, stop - start, last=stop == PART_SIZES[part], images=torch.empty(0),
              indices=good, keys=[f"p{part}/{i}" for i in good], labels=[10 * part + i for i in good],
              skipped=[(i, f"p{part}/{i}", "corrupt") for i in range(start, stop) if (part, i) in BAD])
    latents = torch.tensor([[part, i] for i in good], dtype=torch.float32).reshape(-1, 2, 1, 1)
    return b, latents


ALL_BLOCKS = [(0, 0), (0, 3), (0, 6), (1, 0), (1, 3)]
EXPECTED = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 5), (0, 6), (1, 1), (1, 2), (1, 3)]  # source order, no BAD


def create(url: str):
    return lambda: LatentStore.create(url, n=0, latent_shape=(2, 1, 1), dtype="float32", chunk_size=CHUNK,
                                      attrs={"count": 0}, unfinished=True)


def run_writer(open_store, start: WriteProgress, blocks) -> LatentStore | None:
    writer = ChunkWriter(open_store, start, parts=[0, 1], block_size=BLOCK, chunk_size=CHUNK)
    writer.start()
    for part, first in blocks:
        writer.submit(*block(part, first))
    return writer.finish()


def test_block_order_releases_blocks_in_source_order():
    order = BlockOrder([0, 1], Cursor(0, 4), BLOCK)  # resuming inside part 0's second block
    released = []
    for part, start in [(1, 3), (0, 6), (1, 0), (0, 3)]:
        released += [(b.part, b.start) for b, _ in order.add(block(part, start)[0], None)]
        assert order.done == (len(released) == 4)
    assert released == [(0, 3), (0, 6), (1, 0), (1, 3)]


def test_out_of_order_blocks_become_rows_in_source_order(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = run_writer(create(url), WriteProgress(), reversed(ALL_BLOCKS))
    again = LatentStore.open(url)
    assert store is not None and again.complete and len(again) == len(EXPECTED)
    expected = np.array(EXPECTED, np.float32)
    np.testing.assert_array_equal(again.latents[:].reshape(-1, 2), expected)
    assert [str(k) for k in again.keys[:]] == [f"p{p}/{i}" for p, i in EXPECTED]
    assert list(again.labels[:]) == [10 * p + i for p, i in EXPECTED]
    assert again.skipped == [("p0/4", "corrupt"), ("p1/0", "corrupt")]
    attrs = again.attrs
    assert (attrs["count"], attrs["source_count"], attrs["rows_done"]) == (9, 11, 9) and "progress" not in attrs
    mean, std = again.require_stats()
    np.testing.assert_allclose(mean, expected.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, expected.std(0), rtol=1e-6)


def test_a_resumed_writer_ends_with_the_uninterrupted_store(tmp_path):
    clean = run_writer(create(str(tmp_path / "clean.zarr")), WriteProgress(), ALL_BLOCKS)

    url = str(tmp_path / "resumed.zarr")
    with pytest.raises(RuntimeError, match="before every part was read"):  # the run stops after 2 blocks
        run_writer(create(url), WriteProgress(), ALL_BLOCKS[:2])
    partial = LatentStore.open(url, mode="r+", allow_incomplete=True)
    assert not partial.complete
    # One full chunk was committed: rows (0,0)..(0,3); the 5th row, (0,5), was not written.
    progress = WriteProgress.of(partial)
    assert progress == WriteProgress(rows=4, cursor=Cursor(0, 4), skipped=[])

    # The next run restarts at the block holding the cursor, (0, 3), and drops row (0, 3).
    resumed = run_writer(lambda: partial, progress, [(1, 3), (0, 6), (0, 3), (1, 0)])
    for name in ("latents", "labels", "keys", "mean", "std"):
        assert np.array_equal(clean.group[name][:], resumed.group[name][:]), name
    assert clean.attrs == resumed.attrs


def test_nothing_decodable_writes_nothing(tmp_path):
    url = tmp_path / "s.zarr"
    writer = ChunkWriter(create(str(url)), WriteProgress(), parts=[0], block_size=BLOCK, chunk_size=CHUNK)
    writer.start()
    empty = Block(0, 0, 2, last=True, images=torch.empty(0), skipped=[(0, "a", "corrupt"), (1, "b", "corrupt")])
    writer.submit(empty, None)
    assert writer.finish() is None
    assert writer.skipped == [("a", "corrupt"), ("b", "corrupt")] and not url.exists()
