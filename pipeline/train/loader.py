"""Latent batches from a latent store, fed from memory: no per-sample Python, no DataLoader workers.

Two modes, chosen once per loader:
- resident: the whole store is read once onto the device (ImageNet at float16 is about 5 GB) and
  each epoch is a seeded index permutation; a batch is one `index_select` on the device.
- streaming: for stores that do not fit, each epoch visits the store's chunks in a seeded random
  order, reads blocks of chunks in a background thread (prefetch), and shuffles within a block.

With `flip` (a store encoded with `--flip`), each sample of an epoch is its image's latent or its
horizontally flipped image's, one of the two at random: flip augmentation, as latent-caching
tokenizer and diffusion pipelines do it, without decoding an image again.

The order of an epoch (and its flip choices) depends only on (seed, epoch) - the `data_order`
random stream, shared with no other purpose (seeds.py) - so a resumed run sees the same batches.

Data parallel (pipeline/train/distributed.py): `batch_size` is the global batch and every process walks
the same global order, yielding only its `share` of each batch; a run sees the same global batches
with any number of processes, also when it resumes with another. Each process holds the whole
store when resident and reads every block when streaming (the reads are not divided).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from revq_pipe.pipeline.train.distributed import DataParallelGroup
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.seeds import stream_generator
from revq_pipe.pipeline.storage.store import FLIP_ARRAY, LatentStore

# Streaming reads about this many bytes of latents per block (whole chunks, at least two).
STREAM_BLOCK_BYTES = 256 << 20
# Fraction of free device (or host) memory the resident copy may take.
RESIDENT_FRACTION = 0.5


def open_training_store(url: str) -> tuple[LatentStore, np.ndarray, np.ndarray]:
    """The latent store to train on and its mean/std, refused when empty, when a latent is NaN or
    inf (the first such row named: LatentStore.check_finite), or when its statistics are not finite."""
    store = LatentStore.open(url)
    mean, std = store.require_stats()
    store.check_finite()
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise UserError(f"{url} has non-finite mean/std: recompute them with `revq-pipe stats {url}`")
    if len(store) == 0:
        raise UserError(f"{url} holds no latents")
    return store, mean, std


def _whole_array(store: LatentStore, array) -> np.ndarray:
    """All rows of one latent array of `store`, checked for NaN/inf a chunk at a time."""
    rows, step = np.asarray(array[:]), array.chunks[0]
    for start in range(0, len(rows), step):
        store.refuse_non_finite(rows[start:start + step], range(start, start + step), array.basename)
    return rows


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on the device (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LatentLoader:
    """Batches of raw latents (float32, on `device`) from a latent store, one seeded order per epoch;
    with a `group` of several processes, this process's share of each global batch."""

    def __init__(self, store: LatentStore, batch_size: int, device: torch.device, *, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, resident: bool | None = None, flip: bool = False,
                 group: DataParallelGroup = DataParallelGroup()):
        if flip and not store.has_flip:
            raise ValueError(f"{store.url} holds no flipped latents (encode it with `flip=True`)")
        self.store, self.batch_size, self.device = store, batch_size, device
        self.shuffle, self.drop_last, self.seed, self.flip = shuffle, drop_last, seed, flip
        self.group = group
        self.n = len(store)
        arrays = [store.latents, store.latents_flip] if flip else [store.latents]
        if resident is None:  # one mode for all processes: the two modes order an epoch differently
            nbytes = len(arrays) * self.n * math.prod(store.latent_shape) * store.latents.dtype.itemsize
            copies = group.copies_in_host_memory(device)
            resident = group.all_true(copies * nbytes <= RESIDENT_FRACTION * free_memory(device))
        self.resident = resident
        # Resident with flips: rows [0, n) the originals, [n, 2n) their flipped images' latents.
        self.data = (torch.cat([torch.from_numpy(_whole_array(store, array)) for array in arrays]).to(device)
                     if resident else None)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[torch.Tensor]:
        """The batches of one epoch, in the order fixed by (seed, epoch)."""
        generator = stream_generator(self.seed, "data_order", epoch)
        return self._resident_batches(generator) if self.resident else self._streamed_batches(generator)

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """The latents at the given row indices (float32, on the device), never flipped."""
        if self.resident:
            return self.data[torch.as_tensor(indices, device=self.device)].float()
        order = np.argsort(indices)
        picked = np.empty((len(indices), *self.store.latent_shape), self.store.latents.dtype)
        picked[order] = self.store.latents.get_orthogonal_selection((np.asarray(indices)[order],))
        self.store.refuse_non_finite(picked, indices)
        return self._to_device(picked)

    def _share(self, batch: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """This process's rows of a global batch (all of them on one process); empty when a short
        last batch has fewer rows than processes."""
        return batch[self.group.share(len(batch))]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.float()

    def _resident_batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=generator) if self.shuffle else torch.arange(self.n)
        if self.flip:
            order = order + self.n * torch.randint(0, 2, (self.n,), generator=generator)
        order = order.to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            share = self._share(order[start:start + self.batch_size])
            if len(share):
                yield self.data.index_select(0, share).float()

    def _streamed_batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        chunk = self.store.chunk_size
        n_chunks = math.ceil(self.n / chunk)
        chunk_order = torch.randperm(n_chunks, generator=generator).tolist() if self.shuffle else list(range(n_chunks))
        chunk_bytes = chunk * math.prod(self.store.latent_shape) * self.store.latents.dtype.itemsize
        per_block = max(2, STREAM_BLOCK_BYTES // max(chunk_bytes, 1))
        blocks = [chunk_order[i:i + per_block] for i in range(0, n_chunks, per_block)]
        latents = self.store.latents

        def read(block: list[int]) -> np.ndarray:
            rows = np.concatenate([self.store.checked_rows(c * chunk, (c + 1) * chunk) for c in block])
            if self.flip:  # (rows, 2, C, H, W): each latent beside its flipped image's
                flipped = np.concatenate([self.store.checked_rows(c * chunk, (c + 1) * chunk, FLIP_ARRAY)
                                          for c in block])
                rows = np.stack([rows, flipped], axis=1)
            return rows

        remaining = len(self)
        carry = np.empty((0, *self.store.latent_shape), latents.dtype)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, blocks[0]) if blocks else None
            for i in range(len(blocks)):
                block = pending.result()
                pending = pool.submit(read, blocks[i + 1]) if i + 1 < len(blocks) else None
                if self.shuffle:
                    block = block[torch.randperm(len(block), generator=generator).numpy()]
                if self.flip:
                    views = torch.randint(0, 2, (len(block),), generator=generator).numpy()
                    block = block[np.arange(len(block)), views]
                block = np.concatenate([carry, block]) if len(carry) else block
                full = len(block) // self.batch_size
                for b in range(min(full, remaining)):
                    share = self._share(block[b * self.batch_size:(b + 1) * self.batch_size])
                    if len(share):
                        yield self._to_device(share)
                remaining -= min(full, remaining)
                carry = block[full * self.batch_size:]
            share = self._share(carry)
            if remaining and len(share):  # the last, partial batch (drop_last=False)
                yield self._to_device(share)
