"""The quantizer's half of a training step in one call: nearest codes, their counts, the chosen
code vectors, the codebook loss and its gradient per token.

Unfused, a step runs the search, then gathers the chosen codes (a pass over B x T x d), computes
mse(quantized, tokens) (another) and the gradient 2 (quantized - tokens) / numel (a third). On
CUDA (and under Triton's interpreter) `quantize` does the last three inside the search's final
pass, which already holds each query's chosen code index: it writes the code vector and the
gradient as it unpacks the answer, and the loss is the sum of the search's squared distances
(the same direct fp32 distance, summed per token in another order: equal to the mse within
rounding). On the CPU the same quantities come from torch ops on the search's answer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from revq_pipe.kernels.nearest_code import check_search_inputs, implementation_for, nearest_code_screened_torch


class Quantized(NamedTuple):
    """`quantize`'s answer for queries x (G, M, d): indices (G, M) int64, quantized (G, M, d) (the
    chosen codes, in x's memory layout), loss (0-dim float32: mse(quantized, x) over this x) and
    token_grads (G, M, d) float32 (d loss / d quantized of the global batch's mean loss)."""

    indices: torch.Tensor
    quantized: torch.Tensor
    loss: torch.Tensor
    token_grads: torch.Tensor


@torch.no_grad()
def quantize(x: torch.Tensor, codebooks: torch.Tensor, *, counts: torch.Tensor | None = None, shares: int = 1,
             check_finite: bool = True, method: str = "exact") -> Quantized:
    """Nearest code of every query (as `nearest_code`, counts included), its code vector, the
    loss mse(quantized, x) and its gradient with respect to each chosen code, where x is one of
    `shares` equal parts of the global batch whose mean loss is trained (data parallel). `method`
    is the Triton search's ("exact" or "screen": the same answer; the CPU path has one)."""
    check_search_inputs(x, codebooks, counts, check_finite=check_finite and implementation_for(x) != "triton")
    codebooks = codebooks.detach()
    grad_scale = 2.0 / (x.numel() * shares)
    if implementation_for(x) == "triton":
        from revq_pipe.kernels.triton_search import QuantizeOutputs, nearest_code_triton

        # empty_like keeps x's strides: a transposed view of (B, T, d) tokens gets (B, T, d) buffers.
        outputs = QuantizeOutputs(torch.empty_like(x, dtype=codebooks.dtype), torch.empty_like(x, dtype=torch.float32),
                                  grad_scale)
        indices, sq_dists = nearest_code_triton(x, codebooks, counts=counts, check_finite=check_finite,
                                                quantize=outputs, method=method)
        quantized, token_grads = outputs.quantized, outputs.token_grads
    else:
        indices, sq_dists = nearest_code_screened_torch(x, codebooks, counts=counts)
        quantized = codebooks[torch.arange(codebooks.shape[0], device=x.device)[:, None], indices]
        token_grads = (quantized.float() - x.float()) * grad_scale
    return Quantized(indices, quantized, sq_dists.sum() / max(x.numel(), 1), token_grads)
