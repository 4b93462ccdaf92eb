"""Sparse AdamW's update as two Triton kernels after one sort (pipeline/train/codebook_optim.py has
the method: dense AdamW's updates, applied only to the chosen codes, each first catching up on the
zero-gradient steps it missed).

Unfused, `SparseAdamW.apply` is about 25 small torch operations per step (segment ids, a scatter
sum, a norm, gathers of codes and moments, the momentum tail, the moment and code updates, four
scatters back). Here, after `torch.sort` of the chosen rows (stable: duplicates stay in batch
order):
- `segment_sums_kernel`: at each run of equal rows, its first position sums the run's token
  gradients one after the other, in batch order (the order of the deterministic scatter sum of
  the torch path, so the same bits), and each program adds up its runs' squared sums;
- `sparse_adamw_kernel`: every program sums those partial sums in one fixed order into the global
  norm (the clipping factor), and each run's first position updates its row: momentum tail of the
  missed steps, moment decay, the AdamW step, the row's last step.
No host synchronisation, no data-dependent shapes: the step counter and the learning rate are
read from device tensors, so the update can be captured in a CUDA graph. Step-dependent factors
(bias corrections, beta powers) are computed in float64 as exp(n log beta), which avoids the
cancellation of 1 - beta2^n at small n; the per-element arithmetic is float32 as in the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from revq_pipe.kernels.jit import INTERPRETED, jit

BLOCK = 128
PARTIALS_BLOCK = 1024


@jit
def _runs(sorted_rows_ptr, num_rows, BLOCK: tl.constexpr):
    """This program's positions, their rows, and which positions start a run of equal rows."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < num_rows
    row = tl.load(sorted_rows_ptr + offs, mask=valid, other=-1)
    previous = tl.load(sorted_rows_ptr + offs - 1, mask=valid & (offs > 0), other=-1)
    return offs, row, valid & (row != previous)


@jit
def segment_sums_kernel(sorted_rows_ptr, order_ptr, grads_ptr, sums_ptr, partials_ptr, num_rows,
                        stride_gn, stride_gd, D: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """sums[i] = the sum of the token gradients of the run starting at sorted position i (in order);
    partials[program] = the sum of its runs' squared sums."""
    offs, row, start = _runs(sorted_rows_ptr, num_rows, BLOCK)
    j = tl.arange(0, D_BLOCK)[None, :]
    total = tl.zeros((BLOCK, D_BLOCK), tl.float32)
    step = 0
    active = start
    while tl.max(active.to(tl.int32), axis=0) > 0:
        token = tl.load(order_ptr + offs + step, mask=active, other=0)
        total += tl.load(grads_ptr + token[:, None] * stride_gn + j * stride_gd, mask=active[:, None] & (j < D),
                         other=0.0).to(tl.float32)
        step += 1
        more = active & (offs + step < num_rows)
        active = more & (tl.load(sorted_rows_ptr + offs + step, mask=more, other=-1) == row)
    tl.store(sums_ptr + offs[:, None] * D + j, total, mask=start[:, None] & (j < D))
    squares = tl.where(start[:, None], total * total, 0.0)
    tl.store(partials_ptr + tl.program_id(0), tl.sum(tl.sum(squares, axis=1), axis=0))


@jit
def _one_minus_beta_power(log_beta, n):
    """1 - beta^n in float64 (n float64): no cancellation worth the name at small n."""
    return 1.0 - tl.exp(n * log_beta)


@jit
def _global_norm(partials_ptr, num_partials, PARTIALS_BLOCK: tl.constexpr):
    """The square root of the sum of all partials, in the same order in every program."""
    total = tl.zeros((PARTIALS_BLOCK,), tl.float32)
    for first in range(0, num_partials, PARTIALS_BLOCK):
        offs = first + tl.arange(0, PARTIALS_BLOCK)
        total += tl.load(partials_ptr + offs, mask=offs < num_partials, other=0.0)
    return tl.sqrt(tl.sum(total, axis=0))


@jit
def _momentum_tail(m, v, last, missed, lr, log_beta1, log_beta2, eps, WINDOW: tl.constexpr):
    """Sum over j = 1..min(missed, WINDOW) of dense AdamW's zero-gradient update j after step
    `last`: lr/bc1 * beta1^j m / (beta2^(j/2) sqrt(v) / sqrt(bc2) + eps) at step last + j."""
    tail = tl.zeros_like(m)
    sqrt_v = tl.sqrt(v)
    longest = tl.minimum(tl.max(missed, axis=0), WINDOW)
    for j in range(1, longest + 1):
        n = (last + j).to(tl.float64)
        step_size = lr * tl.exp(j * log_beta1) / _one_minus_beta_power(log_beta1, n)
        v_scale = tl.exp(j * 0.5 * log_beta2) / tl.sqrt(_one_minus_beta_power(log_beta2, n))
        step_size = tl.where(j <= missed, step_size, 0.0).to(tl.float32)
        tail += step_size[:, None] * m / (v_scale.to(tl.float32)[:, None] * sqrt_v + eps)
    return tail


@jit
def sparse_adamw_kernel(sorted_rows_ptr, sums_ptr, partials_ptr, num_partials, params_ptr, exp_avg_ptr,
                        exp_avg_sq_ptr, last_step_ptr, step_ptr, lr_ptr, log_betas_ptr, norm_ptr, num_rows, beta1,
                        beta2, one_minus_beta1, one_minus_beta2, eps, max_grad_norm, D: tl.constexpr,
                        D_BLOCK: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
                        PARTIALS_BLOCK: tl.constexpr):
    """One AdamW step of every chosen row, after its momentum tail; the gradient clipped by the
    global norm of the per-row sums (written to norm_ptr). Scalar arguments arrive as float32, as
    the torch path uses them; log(beta1), log(beta2) as float64 from log_betas_ptr."""
    log_beta1 = tl.load(log_betas_ptr)
    log_beta2 = tl.load(log_betas_ptr + 1)
    norm = _global_norm(partials_ptr, num_partials, PARTIALS_BLOCK)
    tl.store(norm_ptr, norm, mask=tl.program_id(0) == 0)
    clip = tl.minimum(max_grad_norm / (norm + 1e-6), 1.0)
    offs, row, start = _runs(sorted_rows_ptr, num_rows, BLOCK)
    j = tl.arange(0, D_BLOCK)[None, :]
    element = start[:, None] & (j < D)
    at_row = row[:, None] * D + j
    p = tl.load(params_ptr + at_row, mask=element, other=0.0)
    m = tl.load(exp_avg_ptr + at_row, mask=element, other=0.0)
    v = tl.load(exp_avg_sq_ptr + at_row, mask=element, other=0.0)
    last = tl.load(last_step_ptr + row, mask=start, other=0)
    step = tl.load(step_ptr)
    lr = tl.load(lr_ptr).to(tl.float64)
    missed = tl.where(start, step - 1 - last, 0)

    p -= _momentum_tail(m, v, last, missed, lr, log_beta1, log_beta2, eps, WINDOW)
    m *= tl.exp(missed.to(tl.float64) * log_beta1).to(tl.float32)[:, None]
    v *= tl.exp(missed.to(tl.float64) * log_beta2).to(tl.float32)[:, None]
    g = tl.load(sums_ptr + offs[:, None] * D + j, mask=element, other=0.0) * clip
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * g * g
    n = step.to(tl.float64)
    step_size = (lr / _one_minus_beta_power(log_beta1, n)).to(tl.float32)
    bias2_sqrt = tl.sqrt(_one_minus_beta_power(log_beta2, n)).to(tl.float32)
    p -= step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(params_ptr + at_row, p, mask=element)
    tl.store(exp_avg_ptr + at_row, m, mask=element)
    tl.store(exp_avg_sq_ptr + at_row, v, mask=element)
    tl.store(last_step_ptr + row, tl.zeros_like(last) + step, mask=start)


def kernels_run_on(device: torch.device) -> bool:
    """True where these kernels run: CUDA, or CPU tensors under Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def sparse_adamw_update(params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        last_step: torch.Tensor, rows: torch.Tensor, token_grads: torch.Tensor, *,
                        step: torch.Tensor, lr: torch.Tensor, betas: tuple[float, float], log_betas: torch.Tensor,
                        eps: float, max_grad_norm: float, window: int) -> torch.Tensor:
    """Update, in place, the rows `rows` (N,) of params, exp_avg, exp_avg_sq (R, d, contiguous) and
    last_step (R,) int64 from the token gradients (N, d): summed per row, clipped by their global
    norm, after each row's momentum tail since its last step. `step` (0-dim int64) is the step being
    taken (already counted), `lr` (0-dim float32) the rate and `log_betas` (2,) float64 the
    logarithms of the betas, all on the device (float arguments would reach the kernel as float32).
    Returns the global norm before clipping (0-dim, on the device)."""
    num_rows, dim = token_grads.shape
    sorted_rows, order = torch.sort(rows, stable=True)
    sums = torch.empty((num_rows, dim), dtype=torch.float32, device=params.device)
    programs = triton.cdiv(num_rows, BLOCK)
    partials = torch.empty(programs, dtype=torch.float32, device=params.device)
    norm = torch.empty((), dtype=torch.float32, device=params.device)
    layout = {"D": dim, "D_BLOCK": triton.next_power_of_2(dim), "BLOCK": BLOCK}
    segment_sums_kernel[(programs,)](sorted_rows, order, token_grads, sums, partials, num_rows, *token_grads.stride(),
                                     **layout)
    beta1, beta2 = betas
    sparse_adamw_kernel[(programs,)](sorted_rows, sums, partials, programs, params, exp_avg, exp_avg_sq, last_step,
                                     step, lr, log_betas, norm, num_rows, beta1, beta2, 1 - beta1, 1 - beta2, eps,
                                     max_grad_norm, **layout, WINDOW=window, PARTIALS_BLOCK=PARTIALS_BLOCK)
    return norm
