"""Lazy AdamW for the codebooks: each step updates only the codes that were chosen.

A step of ReVQ training chooses B*T codes out of T*K (at bs 128 on 256T_NC=262144: 32,768 of 67
million), and only those receive gradient from `mse(tokens, quantized)`. Dense AdamW still reads and
writes all T*K*d parameters and both moment buffers every step (and autograd first materialises a
dense, mostly zero gradient), which on the largest preset costs more than the search itself. This
optimizer takes the per-token gradients directly, sums duplicates per code, clips by the global norm
(the same number `clip_grad_norm_` would compute on the dense gradient), and applies the AdamW
update (no weight decay: the recipe uses none for codebooks) to the chosen rows only.

Difference from dense AdamW: a code's moments change only on steps that choose it, so stale momentum
no longer moves codes nobody chose (this is the "lazy Adam" of sparse embeddings). When every code is
chosen at every step the two are the same update (tests check this).

No host synchronisation: duplicates are resolved by sorting the row ids and summing per segment,
and every duplicate then writes the same value, so the step is a fixed sequence of kernels.
"""

from __future__ import annotations

import torch


class LazyAdamW:
    """AdamW over the rows (codes) of a (T, K, d) codebook that received gradient this step."""

    def __init__(self, codebooks: torch.nn.Parameter, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, max_grad_norm: float = 1.0):
        self.codebooks = codebooks
        self.lr, self.betas, self.eps, self.max_grad_norm = lr, betas, eps, max_grad_norm
        self.exp_avg = torch.zeros_like(codebooks, memory_format=torch.contiguous_format)
        self.exp_avg_sq = torch.zeros_like(codebooks, memory_format=torch.contiguous_format)
        self.steps = 0

    @torch.no_grad()
    def step(self, ids: torch.Tensor, token_grads: torch.Tensor) -> torch.Tensor:
        """Apply one update. `ids` (B, T) chosen codes; `token_grads` (B, T, d) d loss / d quantized token.

        Returns the gradient's global norm before clipping (a 0-dim tensor on the device).
        """
        t, k, d = self.codebooks.shape
        rows = (ids + torch.arange(t, device=ids.device) * k).reshape(-1)
        rows, order = torch.sort(rows)
        grads = token_grads.reshape(-1, d)[order].float()
        # Segment ids of equal rows in sorted order; per-code gradient = sum over its segment.
        starts = torch.ones_like(rows, dtype=torch.bool)
        starts[1:] = rows[1:] != rows[:-1]
        segment = torch.cumsum(starts, 0) - 1
        per_code = torch.zeros_like(grads).index_add_(0, segment, grads)
        norm = torch.linalg.vector_norm(per_code)
        scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        g = per_code[segment] * scale

        self.steps += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1 ** self.steps
        bias2_sqrt = (1 - beta2 ** self.steps) ** 0.5
        params = self.codebooks.view(-1, d)
        m_all, v_all = self.exp_avg.view(-1, d), self.exp_avg_sq.view(-1, d)
        m = m_all[rows].mul_(beta1).add_(g, alpha=1 - beta1)
        v = v_all[rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        update = (m / bias1) / (v.sqrt() / bias2_sqrt + self.eps)
        p = params[rows].add_(update, alpha=-self.lr)
        # Duplicated rows carry identical values, so whichever write lands last is the same.
        m_all[rows], v_all[rows], params[rows] = m, v, p
        return norm

    @torch.no_grad()
    def forget(self, positions: torch.Tensor, codes: torch.Tensor) -> None:
        """Zero the moments of codes that were moved (reset): their history belongs to another place."""
        self.exp_avg[positions, codes] = 0
        self.exp_avg_sq[positions, codes] = 0

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.steps = int(state["steps"])
