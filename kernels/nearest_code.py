"""Batched grouped nearest-code search: the public API, its input checks, and the CPU torch path.

Every group ``g`` has its own codebook; query ``x[g, m]`` is compared with the ``K`` codes of
``codebooks[g]`` only. The answer is the exact fp32 argmin of the squared L2 distance, ties to
the lowest code index, as fp32 brute force gives it.

Formula. The distance that decides is summed directly, ``sum_j (x_j - c_j)^2``, in fp32, one
dimension after the other. The expanded form ``|x|^2 - 2 x.c + |c|^2`` is cheaper (a matrix
product) but cancels: when queries and codes sit far from the origin compared with their spread
(latents are only standardised per dimension, codes drift in training), the small distance is the
difference of two large numbers and fp32 loses it, which changes argmins. The direct sum has no
cancellation: each term is a non-negative square, so every distance carries a relative error of at
most ~d ulp. The Triton path does use the expanded score, but only to screen: with a proven bound
on its rounding it keeps the codes that could be the argmin, re-scores them with the direct sum,
and re-runs the direct search for any query it cannot settle that way (search_kernels.py).
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COUNT_DTYPES = (torch.int32, torch.int64)

# The torch path never materialises more than this many query-code distances at once: each block
# holds two fp32 buffers of this size (the running sum and one dimension's squared differences),
# i.e. at most 8 MiB, whatever G, M and K are.
MAX_BLOCK_PAIRS = 1 << 20
# Codes per block on the torch path; queries and groups fill the rest of the block.
CODE_BLOCK = 4096


class NonFiniteError(ValueError):
    """The queries or the codebooks hold NaN or inf: no nearest code is meaningful.

    A ValueError like the other input errors, but its own type, so that a training loop can tell
    diverged numbers (a reason to stop and keep the last good checkpoint) from a programming error.
    """


def check_search_inputs(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    counts: torch.Tensor | None = None,
    *,
    check_finite: bool = True,
) -> None:
    """Raise ValueError with the offending tensor's name unless the inputs form a valid search
    (NonFiniteError, a ValueError, for NaN or inf)."""
    for name, tensor in (("x", x), ("codebooks", codebooks)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions, got shape {tuple(tensor.shape)}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    groups, _, dim = x.shape
    if codebooks.shape[0] != groups or codebooks.shape[2] != dim:
        raise ValueError(
            f"x {tuple(x.shape)} is (G, M, d) and codebooks {tuple(codebooks.shape)} must be (G, K, d) "
            "with the same G and d"
        )
    if dim < 1:
        raise ValueError("the vector dimension d must be at least 1")
    num_codes = codebooks.shape[1]
    if num_codes < 1:
        raise ValueError("codebooks must hold at least one code per group")
    if codebooks.device != x.device:
        raise ValueError(f"x is on {x.device} but codebooks is on {codebooks.device}")
    if counts is not None:
        if tuple(counts.shape) != (groups, num_codes):
            raise ValueError(f"counts must have shape (G, K) = {(groups, num_codes)}, got {tuple(counts.shape)}")
        if counts.dtype not in COUNT_DTYPES:
            raise ValueError(f"counts must be int32 or int64, got {counts.dtype}")
        if counts.device != x.device:
            raise ValueError(f"counts is on {counts.device} but x is on {x.device}")
    if check_finite:
        check_finite_inputs(x, codebooks)


def check_finite_inputs(x: torch.Tensor, codebooks: torch.Tensor) -> None:
    """Raise NonFiniteError naming x or codebooks (x first) if it holds NaN or inf.

    NaN or inf would make every comparison meaningless and the returned codes arbitrary. One
    aminmax per tensor (NaN propagates through it; +-inf lands in it), which reads each tensor
    once without a temporary the size of the input, and one device sync for both.
    """
    tensors = [(name, t) for name, t in (("x", x), ("codebooks", codebooks)) if t.numel()]
    extremes = torch.stack([v.float() for _, t in tensors for v in torch.aminmax(t.detach())])
    finite = torch.isfinite(extremes).view(-1, 2).all(dim=1).tolist()
    for (name, _), ok in zip(tensors, finite):
        if not ok:
            raise NonFiniteError(f"{name} contains NaN or inf")


def nearest_code_torch(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped nearest-code search with plain torch ops, in bounded memory (no input checks).

    Works on any device; it is the CPU path of `nearest_code`. Memory bound: at most
    ``MAX_BLOCK_PAIRS`` (2**20) distances are held at once, in two fp32 buffers (8 MiB), plus
    fp32 copies of one block's queries and codes. Distances are summed over d in order, in fp32.
    """
    groups, num_queries, dim = x.shape
    num_codes = codebooks.shape[1]
    best_dist = torch.full((groups, num_queries), float("inf"), dtype=torch.float32, device=x.device)
    best_index = torch.zeros((groups, num_queries), dtype=torch.int64, device=x.device)
    if groups == 0 or num_queries == 0:
        return best_index, best_dist

    code_block = min(num_codes, CODE_BLOCK)
    query_block = min(num_queries, max(1, MAX_BLOCK_PAIRS // code_block))
    group_block = min(groups, max(1, MAX_BLOCK_PAIRS // (code_block * query_block)))
    for g0 in range(0, groups, group_block):
        g1 = min(g0 + group_block, groups)
        for k0 in range(0, num_codes, code_block):
            k1 = min(k0 + code_block, num_codes)
            # (g, d, k) so that one dimension of all codes is a contiguous row.
            codes_t = codebooks[g0:g1, k0:k1].to(torch.float32).transpose(1, 2).contiguous()
            for m0 in range(0, num_queries, query_block):
                m1 = min(m0 + query_block, num_queries)
                queries_t = x[g0:g1, m0:m1].to(torch.float32).transpose(1, 2).contiguous()
                dist = None
                for j in range(dim):
                    term = queries_t[:, j, :, None] - codes_t[:, j, None, :]
                    term.mul_(term)
                    dist = term if dist is None else dist.add_(term)
                # min over a dimension returns the first minimal index: ties go to the lowest code.
                block_min, block_arg = dist.min(dim=2)
                best = best_dist[g0:g1, m0:m1]
                # Strict <: an earlier block keeps ties, so the lowest index wins overall.
                improved = block_min < best
                best.copy_(torch.where(improved, block_min, best))
                chosen = best_index[g0:g1, m0:m1]
                chosen.copy_(torch.where(improved, block_arg + k0, chosen))
    if counts is not None:
        counts.scatter_add_(1, best_index, torch.ones_like(best_index, dtype=counts.dtype))
    return best_index, best_dist


def nearest_code_screened_torch(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped nearest-code search screened by a matrix product: the CPU path of `nearest_code`.

    The direct sum of `nearest_code_torch` costs three elementwise passes per dimension over every
    query-code pair; a BLAS product does the work of all d dimensions at once. So, block by
    block: the expanded score ``|c|^2 - 2 x.c`` by `torch.baddbmm`, keeping per query the lowest
    score, its code and the second-lowest score. The score's rounding has the bound the Triton
    screen uses (search_kernels.py), which holds for any summation order, so the lowest-score code
    is the exact fp32 argmin whenever the second-lowest score lies beyond the bound: that code's
    distance is then summed directly, exactly as `nearest_code_torch` sums it. Queries the screen
    cannot settle (near ties, duplicate codes, cancellation far from the origin, overflow) are
    searched again by `nearest_code_torch`. Same memory bound: one block of ``MAX_BLOCK_PAIRS``
    scores at a time. Falls back to the direct path when fp32 matmuls may run in reduced precision
    (`torch.set_float32_matmul_precision` other than "highest"), where the bound does not hold.
    """
    groups, num_queries, dim = x.shape
    num_codes = codebooks.shape[1]
    if num_codes < 2 or groups * num_queries == 0 or torch.get_float32_matmul_precision() != "highest":
        return nearest_code_torch(x, codebooks, counts=counts)
    queries = x.to(torch.float32)
    codes = codebooks.to(torch.float32)
    code_sqnorms = (codes * codes).sum(dim=2)
    best = torch.full((groups, num_queries), float("inf"), dtype=torch.float32, device=x.device)
    second = torch.full_like(best, float("inf"))
    best_index = torch.zeros((groups, num_queries), dtype=torch.int64, device=x.device)

    code_block = max(2, min(num_codes, CODE_BLOCK))
    query_block = min(num_queries, max(1, MAX_BLOCK_PAIRS // code_block))
    group_block = min(groups, max(1, MAX_BLOCK_PAIRS // (code_block * query_block)))
    for g0 in range(0, groups, group_block):
        g1 = min(g0 + group_block, groups)
        for k0 in range(0, num_codes, code_block):
            # A last block of one code would leave topk(2) short: it joins the previous block.
            k1 = num_codes if num_codes - (k0 + code_block) < 2 else k0 + code_block
            block_codes_t = codes[g0:g1, k0:k1].transpose(1, 2)
            for m0 in range(0, num_queries, query_block):
                m1 = min(m0 + query_block, num_queries)
                scores = torch.baddbmm(code_sqnorms[g0:g1, None, k0:k1], queries[g0:g1, m0:m1], block_codes_t,
                                       alpha=-2.0)
                low2, low2_index = scores.topk(2, dim=2, largest=False, sorted=True)
                block_best, block_second = low2[..., 0], low2[..., 1]
                run_best, run_second = best[g0:g1, m0:m1], second[g0:g1, m0:m1]
                # Second-lowest of the union of two sorted pairs, from the old running best.
                run_second.copy_(torch.minimum(torch.maximum(run_best, block_best),
                                               torch.minimum(run_second, block_second)))
                closer = block_best < run_best
                chosen = best_index[g0:g1, m0:m1]
                chosen.copy_(torch.where(closer, low2_index[..., 0] + k0, chosen))
                run_best.copy_(torch.minimum(run_best, block_best))
            if k1 == num_codes:
                break

    unit_roundoff = 2.0**-24
    x_sqnorms = (queries * queries).sum(dim=2)
    largest_code_sqnorm = code_sqnorms.amax(dim=1, keepdim=True)
    error = 2.5 * (dim + 2) * unit_roundoff * (largest_code_sqnorm + torch.sqrt(x_sqnorms * largest_code_sqnorm))
    nearest_bound = (x_sqnorms + best + error).clamp_min(0.0)
    threshold = best + 2.0 * error + 2.2 * (dim + 3) * unit_roundoff * nearest_bound
    # NaN or inf bounds (overflow) compare False: those queries are not settled.
    settled = second > threshold

    chosen_codes = torch.gather(codes, 1, best_index[..., None].expand(-1, -1, dim))
    sq_dists = None
    for j in range(dim):  # the direct sum, in the order and arithmetic of nearest_code_torch
        term = queries[..., j] - chosen_codes[..., j]
        term.mul_(term)
        sq_dists = term if sq_dists is None else sq_dists.add_(term)
    for group in torch.nonzero(~settled.all(dim=1)).flatten().tolist():
        rows = torch.nonzero(~settled[group]).flatten()
        exact_index, exact_dist = nearest_code_torch(queries[group:group + 1, rows], codes[group:group + 1])
        best_index[group, rows] = exact_index[0]
        sq_dists[group, rows] = exact_dist[0]
    if counts is not None:
        counts.scatter_add_(1, best_index, torch.ones_like(best_index, dtype=counts.dtype))
    return best_index, sq_dists


def uses_interpreter(x: torch.Tensor) -> bool:
    """True when CPU tensors should run the Triton kernel through Triton's interpreter."""
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def implementation_for(x: torch.Tensor) -> str:
    """Which implementation `nearest_code` runs for tensors like ``x``: "triton" or "torch"."""
    if x.device.type == "cuda" or uses_interpreter(x):
        return "triton"
    return "torch"


def nearest_code(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every query in its own group's codebook.

    Args:
        x: (G, M, d) queries, float32/bfloat16/float16, any strides.
        codebooks: (G, K, d) codes, same device; compared in fp32.
        counts: optional (G, K) int32/int64 tensor; ``counts[g, k]`` is increased by the number of
            queries of group g whose nearest code is k (equal to a per-group torch.bincount).
            On CUDA this is fused into the search's final reduction.
        check_finite: refuse NaN/inf in x and codebooks (on the CPU one reduction per tensor; on
            CUDA the search kernel flags them as it reads the inputs, then one device sync). A
            training loop that checks its losses for non-finite values anyway can turn it off to
            keep the GPU running ahead of the host.

    Returns:
        indices (G, M) int64 and sq_dists (G, M) float32: the argmin (lowest index among equal
        distances) and its squared L2 distance.

    Raises:
        NonFiniteError: NaN or inf in x or codebooks (when checked); a subclass of ValueError.
        ValueError: on wrong shapes, dtypes or devices.

    Dispatch: CUDA tensors run the Triton kernels (`nearest_code_triton`); CPU tensors run
    `nearest_code_screened_torch`, or the Triton kernels through Triton's interpreter when
    TRITON_INTERPRET=1 was set before triton was imported (slow; for tests).
    """
    on_triton = implementation_for(x) == "triton"
    # The Triton search checks for NaN/inf while it reads the inputs: no pass of its own.
    check_search_inputs(x, codebooks, counts, check_finite=check_finite and not on_triton)
    if on_triton:
        from revq_pipe.kernels.triton_search import nearest_code_triton

        return nearest_code_triton(x, codebooks, counts=counts, check_finite=check_finite)
    return nearest_code_screened_torch(x, codebooks, counts=counts)
