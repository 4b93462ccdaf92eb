"""Data-parallel `fit` across processes started by torchrun (one per GPU, one or several machines).

`torchrun --nproc-per-node N $(which revq-pipe) fit ...` sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE; `in_process_group` joins the default process group from them (NCCL for CUDA
tensors, gloo for CPU ones) for the duration of the stage. Without them, or with one process,
nothing here talks to anyone and `DataParallelGroup()` is the group of one.

What keeps every process's model the same, step after step:
- Data: `--batch-size` is the global batch. Every process walks the one global order of an epoch
  (seeded by (seed, epoch) only) and takes its `share` of each global batch, so the batches a step
  sees do not depend on the number of processes.
- Codebooks: `SharedCodebookUpdate` all-gathers each process's chosen ids and their token
  gradients (scaled to the global batch's mean) in rank order, which is the global batch's order,
  and every process applies that same update with the deterministic optimizers of codebook_optim:
  the same bits everywhere, and the same bits as one process training on the global batch.
  Bytes per step: B x T x (d + 1) x 4 gathered, 1.1 to 2.5 MiB on the paper's presets (the
  README's table), where all-reducing the dense codebook gradient would move T x K x d x 4, 128 MiB
  to 2 GiB; both codebook updates, dense and sparse, use the gather.
- Rectifier: torch's DistributedDataParallel, which averages gradients across processes (all its
  parameters each step, 54 to 278 MiB on the presets: the larger exchange of the two).
- Non-Activation Reset: activation counts are summed across processes first; its noise comes from
  the `reset_noise` stream, which every process seeds alike.
- `check_identical` compares a digest of the codebooks across processes at every epoch end and
  stops the run if replicas ever differ, rather than training diverged copies.
Only rank 0 writes the run dir and logs; the other ranks log errors only. A run resumes with any
number of processes that divides its global batch: data and codebooks go on exactly as before, only
the rectifier's gradient sums round in another order.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from revq_pipe.pipeline.train.codebook_optim import DenseAdamW, SparseAdamW, quantize_with_gradients
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.checkpoint import launched_world_size
from revq_pipe.pipeline.train.config import check_global_batch

Stage = TypeVar("Stage", bound=Callable[..., Any])
# Every integer up to 2^24 is exactly a float32.
FLOAT32_EXACT_INTEGERS = 1 << 24


@dataclass(frozen=True)
class DataParallelGroup:
    """This process's place among the training processes, and the collectives between them.
    The default, one process, has rank 0 of 1 and every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def current(cls) -> "DataParallelGroup":
        """The initialised default process group as a DataParallelGroup (one process when none)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", rank)),
                   int(os.environ.get("LOCAL_WORLD_SIZE", world)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes files and reports progress."""
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """The device this process trains on: `cuda` becomes the GPU of its local rank."""
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None and self.local_world_size > 1:
            raise UserError(f"`device={device}` names one GPU, but torchrun started {self.local_world_size} "
                            f"processes on this machine: pass `device=cuda` (each takes the GPU of its local rank)")
        if device.index is not None:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {self.local_world_size} processes on this machine, which has "
                            f"{torch.cuda.device_count()} GPUs: use --nproc-per-node {torch.cuda.device_count()} or fewer")
        return torch.device("cuda", self.local_rank)

    def require_divisible(self, batch_size: int) -> None:
        check_global_batch(batch_size, self.world_size)

    def share(self, size: int) -> slice:
        """This process's rows of a global batch of `size` rows: the rank-th of world_size consecutive
        parts (equal when world_size divides size, as for training batches)."""
        return slice(size * self.rank // self.world_size, size * (self.rank + 1) // self.world_size)

    def copies_in_host_memory(self, device: torch.device) -> int:
        """How many processes on this machine hold a resident copy of a store in the same memory."""
        return self.local_world_size if device.type == "cpu" else 1

    # Collectives: on one process, each returns its input.

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all processes, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over all processes (on one process, `tensor` itself)."""
        return self.sum_(tensor.clone()) / self.world_size if self.distributed else tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every process, in place; returns it."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every process."""
        return all(self.gather_objects(bool(flag)))

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (the same shape everywhere) concatenated along dim 0 in rank order."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @contextmanager
    def together(self) -> Iterator[None]:
        """A UserError inside, on any process, stops every process with it (the first rank's), so that
        none waits forever in a collective for a process that has stopped."""
        reason = None
        try:
            yield
        except UserError as err:
            if not self.distributed:
                raise
            reason = str(err)
        reasons = [r for r in self.gather_objects(reason) if r is not None]
        if reasons:
            raise UserError(reasons[0])

    def resumed_note(self, trained_on: int) -> str:
        """Words for a run resumed on another number of processes than the `trained_on` it had: exact
        in the data (the same global batches) and the codebooks; only the rectifier's gradient sums
        round in another order."""
        if trained_on == self.world_size:
            return ""
        return f" (trained on {trained_on} processes until now, on {self.world_size} from here)"

    def require_same(self, value: Any, what: str) -> None:
        """Stop every process with a UserError unless all hold the same `value` (naming `what`)."""
        values = self.gather_objects(value)
        if any(v != values[0] for v in values):
            raise UserError(f"the {self.world_size} processes disagree on {what}: "
                            + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))

    def check_identical(self, name: str, tensor: torch.Tensor) -> None:
        """Compare a sha256 of `tensor`'s bytes across processes; replicas that differ are a bug, and
        training on would silently average diverged models, so it stops (RuntimeError, exit 1)."""
        if not self.distributed:
            return
        digest = hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        digests = self.gather_objects(digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"{name} differ across processes (sha256 by rank: "
                               + ", ".join(f"{r}: {d[:12]}" for r, d in enumerate(digests))
                               + "): the replicas drifted apart, a bug in revq-pipe's data-parallel exchange")

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """`module` wrapped in DistributedDataParallel (gradients averaged across processes)."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        # 1x1 convolutions' weight gradients come back with arbitrary strides on their size-1 dims,
        # which DDP's literal stride comparison warns about; the copy it then makes is a few KB.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        device = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                 gradient_as_bucket_view=True)

    def shared_codebook_update(self, optimizer: DenseAdamW | SparseAdamW) -> "DenseAdamW | SparseAdamW | SharedCodebookUpdate":
        """`optimizer` updating from the global batch on every process (itself on one process)."""
        return SharedCodebookUpdate(optimizer, self) if self.distributed else optimizer


class SharedCodebookUpdate:
    """A codebook optimizer whose every update is the global batch's, the same on every process.

    Each process sends its chosen ids and their token gradients (scaled to the global batch's mean
    loss) in one all-gather, each id as a float32 number beside its d gradient numbers (exact for
    K <= 2^24; the presets have at most 2^18): B/world x T x (d + 1) x 4 bytes from each process.
    Concatenated in rank order they are the global batch's ids and gradients exactly as one process
    would compute them, and every process applies them with the same deterministic update.
    """

    def __init__(self, optimizer: DenseAdamW | SparseAdamW, group: DataParallelGroup):
        self.optimizer, self.group = optimizer, group
        self.codebooks = optimizer.codebooks
        if self.codebooks.shape[1] > FLOAT32_EXACT_INTEGERS:
            raise UserError(f"data-parallel fit exchanges code ids as float32, exact up to "
                            f"{FLOAT32_EXACT_INTEGERS} codes per position, not {self.codebooks.shape[1]}")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def learn(self, ids: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update from the global batch; returns this process's chosen codes (before it) and its loss."""
        quantized, loss, token_grads = quantize_with_gradients(self.codebooks, ids, tokens,
                                                               shares=self.group.world_size)
        packed = torch.cat([ids.to(torch.float32)[..., None], token_grads], dim=-1)
        gathered = self.group.gather_rows(packed)
        self.optimizer.apply(gathered[..., 0].to(torch.int64), gathered[..., 1:])
        return quantized, loss

    def flush(self) -> None:
        self.optimizer.flush()

    def forget(self, positions: torch.Tensor, codes: torch.Tensor) -> None:
        self.optimizer.forget(positions, codes)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def in_process_group(stage: Stage) -> Stage:
    """Run `stage` inside torchrun's process group when its environment names more than one process.

    Joins the default group (gloo for CPU tensors, and NCCL for CUDA ones when CUDA is present)
    unless the caller or an earlier stage has already initialised one; the `revq_pipe` logger of
    ranks other than 0 shows errors only meanwhile. Inside, the stage finds its place with
    `DataParallelGroup.current()`.
    """

    @functools.wraps(stage)
    def run(*args: Any, **kwargs: Any) -> Any:
        _join_torchrun_group()
        logger = logging.getLogger("revq_pipe")
        level = logger.level
        if not DataParallelGroup.current().is_writer:
            logger.setLevel(logging.ERROR)
        try:
            return stage(*args, **kwargs)
        finally:
            logger.setLevel(level)

    return run  # type: ignore[return-value]


def _join_torchrun_group() -> None:
    """Initialise the default process group from torchrun's environment, once per process: nothing
    when there is nothing to join (one process) or it is initialised already.

    The group stays until the process exits. Joining it again for a second stage in one process
    (a script calling fit twice) is not safe: the rendezvous keys of the first group are still in
    torchrun's store, and a process can read another's stale address from them (gloo then fails
    with "connection refused").
    """
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank < torch.cuda.device_count():  # NCCL binds each process to its GPU
            torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    atexit.register(_leave_group)


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
