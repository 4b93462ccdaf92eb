"""The codebooks' optimizers: dense AdamW (the reference's) and a sparse AdamW that touches only the
chosen codes, behind one interface so the training loop never asks which one it has:

    quantized, loss = optimizer.learn(ids, tokens)   # one update from a batch's chosen codes
    optimizer.apply(ids, token_grads)                # the same from given token gradients (data parallel)
    optimizer.param_groups[0]["lr"] = lr             # one learning-rate rule for every optimizer
    optimizer.flush()                                # codebooks as dense AdamW has them (epoch end)
    optimizer.forget(positions, codes)               # moved codes lose their moments (reset)
    optimizer.state_dict() / load_state_dict(state)

Sparse AdamW: each step reads and writes only the codes that were chosen.

A step of ReVQ training chooses B*T codes out of T*K (at bs 128 on 256T_NC=262144: 32,768 of 67
million), and only those receive gradient from `mse(tokens, quantized)`. Dense AdamW still reads and
writes all T*K*d parameters and both moment buffers every step (and first materialises a
dense, mostly zero gradient): on that preset more time than the whole step budget allows.

What dense AdamW does to a code between two steps that choose it is fixed by the code's moments:
with zero gradient, m and v decay geometrically and the code keeps moving along m. This optimizer
applies those zero-gradient steps in closed form, when they matter:
- when a code is chosen again after k steps, first the k - 1 zero-gradient updates it missed (its
  momentum tail, summed over at most `window` steps, after which a tail term is below 1e-4 of the
  first), then the usual AdamW update;
- at the end of each epoch `flush` applies every code's pending tail, which leaves codebook and
  moments equal to dense AdamW's (to fp32 rounding), before the reset, validation and checkpoint.
So the updates are dense AdamW's, and a code chosen at every step follows exactly dense AdamW's
path. The one difference: between two choices a code waits where it was last updated instead of
drifting along its momentum, and the nearest-code search sees it there.

Gradients arrive per token; duplicates are summed per code after a sort, clipped by the global norm
(the number `clip_grad_norm_` computes on the dense gradient), and every duplicate then writes the
same value, so a step has no host synchronisation. There is no weight decay: the recipe uses none
for codebooks. `SparseAdamW(fused=True)` runs the same update as two Triton kernels after the sort
(kernels/sparse_adamw.py) instead of about 25 torch operations, counting its steps on the device,
which a CUDA graph of the whole training step needs.

Both optimizers take the mse gradient per token in closed form, 2 (quantized - tokens) / numel,
instead of through autograd: data-parallel training (pipeline/train/distributed.py) gathers these token
gradients from every process and applies the global batch's update everywhere. The per-code sums
run in a stable order with torch's deterministic algorithms, so the same tokens give the same
codebook bits on every process and at every thread count (torch's default sums use atomic adds
on CUDA, and on the CPU too for large batches).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from revq_pipe.kernels.sparse_adamw import kernels_run_on, sparse_adamw_update
from revq_pipe.pipeline.model.config import use_compile
from revq_pipe.pipeline.train.determinism import deterministic_algorithms

# Rows per chunk of the epoch-end flush over the whole codebook: eager torch holds (rows, window, d)
# temporaries (100 MB at d=8 on the CPU); compiled on CUDA it holds none, so chunks can be larger.
FLUSH_CHUNK = {"cpu": 1 << 15, "cuda": 1 << 18}


def momentum_tail(m: torch.Tensor, v: torch.Tensor, last: torch.Tensor, first_j: torch.Tensor,
                  last_j: torch.Tensor, *, lr: torch.Tensor, beta1: float, beta2: float, eps: float,
                  window: int) -> torch.Tensor:
    """Sum of dense AdamW's zero-gradient updates j = first_j..last_j (per row, j <= window) after step `last`.

    m, v (N, d): the moments right after step `last` (N,); returns the (N, d) displacement to subtract.
    The j-th term is lr/bc1 * beta1^j m / (beta2^(j/2) sqrt(v) / sqrt(bc2) + eps) at step last + j.
    """
    j = torch.arange(1, window + 1, device=m.device, dtype=torch.float32)
    steps = last.to(torch.float32)[:, None] + j
    step_size = lr * beta1 ** j / (1 - torch.pow(beta1, steps))
    v_scale = beta2 ** (j / 2) / torch.sqrt(1 - torch.pow(beta2, steps))
    in_range = (j >= first_j[:, None]) & (j <= last_j[:, None])
    step_size = torch.where(in_range, step_size, torch.zeros((), device=m.device))
    terms = step_size[:, :, None] * m[:, None, :] / (v_scale[:, :, None] * v.sqrt()[:, None, :] + eps)
    return terms.sum(dim=1)


def chosen_codes(codebooks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) code ids -> (B, T, d) code vectors of (T, K, d) codebooks."""
    return codebooks[torch.arange(codebooks.shape[0], device=ids.device), ids]


@torch.no_grad()
def quantize_with_gradients(codebooks: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor, *,
                            shares: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen codes (B, T, d) of `tokens`, the loss mse(tokens, quantized) on them, and the
    gradient of the global batch's loss with respect to each chosen code, where this batch is one
    of `shares` equal parts of the global batch (the loss is a mean over all of it)."""
    quantized = chosen_codes(codebooks, ids)
    loss = F.mse_loss(quantized, tokens)
    return quantized, loss, (quantized - tokens) * (2.0 / (tokens.numel() * shares))


class LearnsFromTokens:
    """`learn` for a codebook optimizer that has `codebooks` and `apply(ids, token_grads)`."""

    codebooks: torch.nn.Parameter

    def learn(self, ids: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update from the chosen codes `ids` (B, T) of `tokens` (B, T, d) with loss
        mse(tokens, quantized); returns the codes before the update and the loss."""
        quantized, loss, token_grads = quantize_with_gradients(self.codebooks, ids, tokens)
        self.apply(ids, token_grads)
        return quantized, loss


class DenseAdamW(LearnsFromTokens, torch.optim.AdamW):
    """torch's AdamW over the whole (T, K, d) codebook, clipped by the gradient's global norm: the
    reference code's update, with the codebook optimizers' interface. The dense gradient is what
    autograd makes of the token gradients (their sum per code), built directly."""

    def __init__(self, codebooks: torch.nn.Parameter, *, lr: float, max_grad_norm: float = 1.0,
                 fused: bool | None = None):
        super().__init__([codebooks], lr=lr, weight_decay=0.0, fused=fused)
        self.codebooks, self.max_grad_norm = codebooks, max_grad_norm

    @torch.no_grad()
    def apply(self, ids: torch.Tensor, token_grads: torch.Tensor) -> None:
        """One update from the chosen codes `ids` (B, T) and d loss / d quantized token (B, T, d)."""
        positions = torch.arange(self.codebooks.shape[0], device=ids.device)
        # Scatter sums in a fixed order: atomic adds otherwise (index_add_ on CUDA, index_put_ on the CPU).
        with deterministic_algorithms():
            grad = torch.zeros_like(self.codebooks).index_put_((positions, ids), token_grads, accumulate=True)
        self.codebooks.grad = grad
        torch.nn.utils.clip_grad_norm_([self.codebooks], self.max_grad_norm)
        self.step()
        self.zero_grad(set_to_none=True)

    def flush(self) -> None:
        """Nothing is pending: every code was updated at every step."""

    @torch.no_grad()
    def forget(self, positions: torch.Tensor, codes: torch.Tensor) -> None:
        """Zero the moments of codes that were moved (reset): their history belongs to another place."""
        if self.state:
            state = self.state[self.codebooks]
            state["exp_avg"][positions, codes] = 0
            state["exp_avg_sq"][positions, codes] = 0


class SparseAdamW(LearnsFromTokens):
    """AdamW over the codes of a (T, K, d) codebook, touching only the chosen codes each step."""

    def __init__(self, codebooks: torch.nn.Parameter, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, max_grad_norm: float = 1.0, window: int = 100, fused: bool = False,
                 host_reads: bool | None = None):
        self.codebooks = codebooks
        self.betas, self.eps, self.max_grad_norm, self.window = betas, eps, max_grad_norm, window
        # As torch optimizers have it, so one learning-rate rule serves every optimizer.
        self.param_groups = [{"lr": lr}]
        device = codebooks.device
        # The rate as a device tensor, updated in place when it changes: a new tensor each step would
        # sync with the GPU, a new Python float each epoch would make the compiled tail recompile,
        # and a CUDA graph of the step reads it where it was captured.
        self._lr_tensor_value = lr
        self._lr_tensor_cache = torch.tensor(lr, dtype=torch.float32, device=device)
        t, k, _ = codebooks.shape
        # Moments as of each code's last update (`last_step`), not decayed since.
        self.exp_avg = torch.zeros_like(codebooks, memory_format=torch.contiguous_format)
        self.exp_avg_sq = torch.zeros_like(codebooks, memory_format=torch.contiguous_format)
        self.last_step = torch.zeros(t * k, dtype=torch.int64, device=device)
        # `fused`: the update as the Triton kernels of kernels/sparse_adamw.py where they run (else the
        # torch operations below, the same update); they count steps on the device, not the host.
        self.kernel = fused and kernels_run_on(device)
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        self._log_betas = torch.tensor([math.log(b) for b in betas], dtype=torch.float64, device=device)
        self._steps = 0
        # Whether a step may read a device value on the host (default: on the CPU, where it costs no
        # sync): the torch path then shortens the momentum tail's window to the longest gap.
        self.host_reads = device.type == "cpu" if host_reads is None else host_reads
        # Compiled: one fused reduction instead of (N, window, d) temporaries.
        self._tail = torch.compile(momentum_tail, dynamic=True) if use_compile(device) else momentum_tail

    @property
    def steps(self) -> int:
        """Steps taken (read back from the device when the kernels count them: a sync)."""
        return int(self.step_count) if self.kernel else self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = value
        self.step_count.fill_(value)

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = value

    @property
    def _lr_tensor(self) -> torch.Tensor:
        if self._lr_tensor_value != self.lr:
            self._lr_tensor_value = self.lr
            self._lr_tensor_cache.fill_(self.lr)
        return self._lr_tensor_cache

    def _catch_up(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                  missed: torch.Tensor) -> None:
        """Apply, in place, the `missed` (N,) zero-gradient AdamW steps that followed step `last`."""
        beta1, beta2 = self.betas
        window = self.window
        if self.host_reads and len(missed):
            window = min(window, int(missed.max()))
        if window > 0:
            p -= self._tail(m, v, last, torch.ones_like(missed), missed, lr=self._lr_tensor, beta1=beta1,
                            beta2=beta2, eps=self.eps, window=window)
        missed = missed.to(torch.float32)[:, None]
        m.mul_(beta1 ** missed)
        v.mul_(beta2 ** missed)

    @torch.no_grad()
    def apply(self, ids: torch.Tensor, token_grads: torch.Tensor) -> torch.Tensor:
        """Apply one update. `ids` (B, T) chosen codes; `token_grads` (B, T, d) d loss / d quantized token.

        Returns the gradient's global norm before clipping (a 0-dim tensor on the device).
        """
        t, k, d = self.codebooks.shape
        rows = (ids + torch.arange(t, device=ids.device) * k).reshape(-1)
        if self.kernel:
            self.step_count += 1
            return sparse_adamw_update(self.codebooks.view(-1, d), self.exp_avg.view(-1, d), self.exp_avg_sq.view(-1, d),
                                       self.last_step, rows, token_grads.reshape(-1, d), step=self.step_count,
                                       lr=self._lr_tensor, betas=self.betas, log_betas=self._log_betas, eps=self.eps,
                                       max_grad_norm=self.max_grad_norm, window=self.window)
        rows, order = torch.sort(rows, stable=True)  # duplicates in batch order: one summation order
        grads = token_grads.reshape(-1, d)[order].float()
        # Segment ids of equal rows in sorted order; per-code gradient = sum over its segment.
        starts = torch.ones_like(rows, dtype=torch.bool)
        starts[1:] = rows[1:] != rows[:-1]
        segment = torch.cumsum(starts, 0) - 1
        with deterministic_algorithms():
            per_code = torch.zeros_like(grads).index_add_(0, segment, grads)
        norm = torch.linalg.vector_norm(per_code)
        g = per_code[segment] * (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)

        self._steps += 1
        beta1, beta2 = self.betas
        params = self.codebooks.view(-1, d)
        m_all, v_all = self.exp_avg.view(-1, d), self.exp_avg_sq.view(-1, d)
        p, m, v, last = params[rows], m_all[rows], v_all[rows], self.last_step[rows]
        self._catch_up(p, m, v, last, self._steps - 1 - last)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1 ** self._steps
        bias2_sqrt = (1 - beta2 ** self._steps) ** 0.5
        p -= (self.lr / bias1) * m / (v.sqrt() / bias2_sqrt + self.eps)
        # Duplicated rows carry identical values, so whichever write lands last is the same.
        m_all[rows], v_all[rows], params[rows] = m, v, p
        self.last_step[rows] = self._steps
        return norm

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every code's pending zero-gradient steps: codebook and moments become dense AdamW's."""
        d, steps = self.codebooks.shape[-1], self.steps
        params, m_all, v_all = self.codebooks.view(-1, d), self.exp_avg.view(-1, d), self.exp_avg_sq.view(-1, d)
        chunk = FLUSH_CHUNK.get(params.device.type, FLUSH_CHUNK["cpu"])
        for start in range(0, len(params), chunk):
            rows = slice(start, start + chunk)
            last = self.last_step[rows]
            self._catch_up(params[rows], m_all[rows], v_all[rows], last, steps - last)
            last.fill_(steps)

    @torch.no_grad()
    def forget(self, positions: torch.Tensor, codes: torch.Tensor) -> None:
        """Zero the moments of codes that were moved (reset): their history belongs to another place.
        Call after `flush`, when no zero-gradient steps are pending."""
        self.exp_avg[positions, codes] = 0
        self.exp_avg_sq[positions, codes] = 0

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "last_step": self.last_step,
                "steps": self.steps, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.last_step.copy_(state["last_step"])
        self.steps = int(state["steps"])
        self.lr = float(state.get("lr", self.lr))


def codebook_optimizer(kind: str, codebooks: torch.nn.Parameter, *, lr: float, max_grad_norm: float,
                       fused: bool = False, host_reads: bool | None = None) -> DenseAdamW | SparseAdamW:
    """The codebook update `kind` names: "sparse" (SparseAdamW; with `fused`, its update as Triton
    kernels where they run; `host_reads` as SparseAdamW takes it) or "dense" (torch AdamW, fused on
    CUDA)."""
    if kind == "sparse":
        return SparseAdamW(codebooks, lr=lr, max_grad_norm=max_grad_norm, fused=fused, host_reads=host_reads)
    return DenseAdamW(codebooks, lr=lr, max_grad_norm=max_grad_norm,
                      fused=True if codebooks.device.type == "cuda" else None)
