"""The Triton kernels of the grouped nearest-code search (launched by triton_search.py).

Layout shared by both search kernels: a program takes BLOCK_M queries of one group and streams
a contiguous range of that group's codes (its split of K), BLOCK_K codes at a time, loading the
next block while it computes on this one. Triton's default layout puts the lanes and warps of
the (BLOCK_M, BLOCK_K) tile along K, so each thread owns one code slot and all BLOCK_M query
rows: the rows' x stay in registers, each loaded code serves BLOCK_M pairs, and every
(row, slot) element keeps its running minimum in registers with no cross-thread traffic in the
loop. Codes arrive as (CHUNKS, BLOCK_K, VEC) tiles of VEC-float vector loads, one whole code
row per thread. Tails need no masks in the loop: out-of-range queries and codes are clamped to
the last valid one, so they are exact duplicates (a duplicate code ties and loses on index;
duplicate queries are not stored).

Results merge through one 64-bit atomic min per query on ``float_bits(dist) << 32 | index``:
non-negative floats order like their bit patterns, so the smallest key is the smallest distance
and, among equal distances, the lowest index. K-splits merge exactly in any order, with no
partial buffer, and autotuning may re-run a kernel (min is idempotent).

- `exact_search_kernel`: the direct fp32 distance ``sum_j (x_j - c_j)^2``, in order over j
  (why not the expanded form: nearest_code.py). About 2d+3.5 instructions per pair on sm_90.
  With CHECK_FINITE both search kernels also watch their inputs for NaN and inf as they read
  them (see `_flag_suspect`), which spares the public API a separate pass over the codebooks.
- `screen_kernel`: the expanded score ``|c|^2 - 2 x.c`` (d FMAs per pair; it differs from the
  distance by |x|^2, the same for every code of a query), tracking per slot the best score, its
  code and the second-best score: about d+5.5 instructions per pair. Its rounding is bounded
  (below), so at the end each query knows which codes could be the exact fp32 argmin: the
  slots' best codes whose score is within the bound of the minimum are re-scored with the exact
  direct formula and merged. If any slot's second-best score is also within the bound (near
  ties, duplicate codes, overflow), the query is flagged and `exact_search_kernel` re-runs it
  in full (ONLY_FLAGGED); programs whose queries are not flagged skip their loop.
- `finalize_kernel`: unpacks keys into indices and distances and adds the chosen codes to
  ``counts`` with atomics, in the same pass; for a training step it also writes the chosen
  code vectors and the codebook loss's gradient per token (QUANTIZE), so the step needs no
  separate gather, subtraction and loss passes (the loss is the sum of the distances).

Error bound of the screen (u = 2**-24, C = the largest |c|^2 in the program's split, d terms):
|c|^2 by an FMA chain is within d u |c|^2, and the score's FMA chain adds at most
d u (|c|^2 + 2 |x| |c|), so |score - true score| <= E = 2.5 (d + 2) u (C + |x| sqrt(C)) (slack
covers one more rounding per product for machines without FMA, like the interpreter, and E's
own rounding). The exact direct fp32 distance is within (d + 3) u of the real one, so a code
can be the fp32 argmin only if its score is within 2E + 2.2 (d + 3) u (|x|^2 + min score + E)
of the minimum score.
"""

import triton.language as tl

from revq_pipe.kernels.jit import INTERPRETED, jit as _jit

__all__ = ["INTERPRETED", "exact_search_kernel", "finalize_kernel", "screen_kernel"]

UNIT_ROUNDOFF = tl.constexpr(2.0**-24)  # fp32 unit roundoff u


@_jit
def _split_range(num_codes, BLOCK_K: tl.constexpr):
    """First and last code of this program's split; same formula as the host's split count."""
    codes_per_split = tl.cdiv(tl.cdiv(num_codes, tl.num_programs(1)), BLOCK_K) * BLOCK_K
    first_code = tl.program_id(1) * codes_per_split
    last_code = tl.minimum(first_code + codes_per_split, num_codes) - 1
    return first_code, last_code


@_jit
def _code_tile(code_base, offs_k, ROW: tl.constexpr, VEC: tl.constexpr, CHUNKS: tl.constexpr):
    """Codes offs_k as a (CHUNKS, BLOCK_K, VEC) fp32 tile and each element's column index."""
    row_offsets = tl.arange(0, CHUNKS)[:, None, None] * VEC + tl.arange(0, VEC)[None, None, :]
    # Whole vectors are masked (ROW is a multiple of VEC), which keeps the loads VEC wide.
    codes = tl.load(code_base + offs_k[None, :, None] * ROW + row_offsets, mask=row_offsets < ROW, other=0.0)
    return codes.to(tl.float32), row_offsets


@_jit
def _column(codes, row_offsets, j: tl.constexpr):
    """Column j of a code tile: with the row in one thread and j constant, a register pick
    (-0.0 is the additive identity, so the compiler drops the sums)."""
    return tl.sum(tl.sum(tl.where(row_offsets == j, codes, -0.0), axis=2), axis=0)


@_jit
def _merge_keys(keys_ptr, offs, valid, dist, code):
    """atomic_min of the packed (distance, index) keys of rows where valid."""
    key = (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | code.to(tl.int64)
    tl.atomic_min(keys_ptr + offs, key, mask=valid)


@_jit
def exact_search_kernel(
    x_ptr,
    codes_ptr,
    keys_ptr,
    flags_ptr,
    suspect_ptr,
    num_queries,
    num_codes,
    stride_xg,
    stride_xm,
    stride_xd,
    D: tl.constexpr,
    ROW: tl.constexpr,
    VEC: tl.constexpr,
    CHUNKS: tl.constexpr,
    ONLY_FLAGGED: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (query blocks, K splits, groups): merge each query's exact best code of one split.
    With CHECK_FINITE, suspect_ptr[0] (queries) and [1] (codes) are set as `_flag_suspect` says."""
    group = tl.program_id(2).to(tl.int64)  # int64: group * K * ROW can pass 2**31 elements
    first_code, last_code = _split_range(num_codes, BLOCK_K)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < num_queries
    key_offs = group * num_queries + offs_m
    if ONLY_FLAGGED:
        # Re-run only blocks with a query the screen could not settle: others stream nothing.
        flagged = tl.load(flags_ptr + key_offs, mask=row_valid, other=0)
        row_valid = row_valid & (flagged != 0)
        last_code = tl.where(tl.max(flagged, axis=0) != 0, last_code, first_code - 1)
    query_rows = x_ptr + group * stride_xg + tl.minimum(offs_m, num_queries - 1).to(tl.int64) * stride_xm
    code_base = codes_ptr + group * num_codes * ROW
    block = tl.arange(0, BLOCK_K)

    best_dist = tl.full((BLOCK_M, BLOCK_K), float("inf"), tl.float32)
    best_code = tl.zeros((BLOCK_M, BLOCK_K), tl.int32)
    offs_k = tl.minimum(first_code + block, last_code)
    codes, row_offsets = _code_tile(code_base, offs_k, ROW, VEC, CHUNKS)
    code_total = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(first_code, last_code + 1, BLOCK_K):
        # Prefetch the next block (clamped: the last iteration re-reads valid codes, unused).
        next_offs_k = tl.minimum(k0 + BLOCK_K + block, last_code)
        next_codes, _ = _code_tile(code_base, next_offs_k, ROW, VEC, CHUNKS)
        if CHECK_FINITE:  # ROW adds per code, shared by the BLOCK_M pairs it makes
            code_total += tl.sum(tl.sum(codes, axis=2), axis=0)
        dist = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for j in tl.static_range(D):
            # Loop-invariant: the compiler keeps the query column in registers.
            x_j = tl.load(query_rows + j * stride_xd).to(tl.float32)
            diff = x_j[:, None] - _column(codes, row_offsets, j)[None, :]
            dist += diff * diff
        # Strict <: a slot sees its codes in increasing order, so it keeps the lowest on ties.
        closer = dist < best_dist
        best_dist = tl.where(closer, dist, best_dist)
        best_code = tl.where(closer, offs_k[None, :], best_code)
        offs_k = next_offs_k
        codes = next_codes

    row_dist = tl.min(best_dist, axis=1)
    row_code = tl.min(tl.where(best_dist == row_dist[:, None], best_code, 2147483647), axis=1)
    _merge_keys(keys_ptr, key_offs, row_valid, row_dist, row_code)
    if CHECK_FINITE:
        query_total = tl.zeros((BLOCK_M,), tl.float32)
        for j in tl.static_range(D):
            query_total += tl.load(query_rows + j * stride_xd).to(tl.float32)
        _flag_suspect(suspect_ptr, query_total)
        _flag_suspect(suspect_ptr + 1, code_total)


@_jit
def _flag_suspect(flag_ptr, totals):
    """Set *flag_ptr to 1 if any of `totals` is NaN or infinite.

    A total (a sum of numbers, or of their squares) is NaN or infinite whenever one of its numbers
    is NaN or infinite, and also when finite numbers overflow float32 on the way (magnitudes near
    1e38, or 1e19 squared): a flag says "suspect", and the host then checks the inputs exactly.
    One add per number read, where a check of each number would cost two (c - c, and its sum)."""
    found = tl.max(tl.where(tl.abs(totals) < float("inf"), 0, 1), axis=0)
    tl.store(flag_ptr, found.to(tl.int32), mask=found != 0)


@_jit
def screen_kernel(
    x_ptr,
    codes_ptr,
    keys_ptr,
    flags_ptr,
    suspect_ptr,
    num_queries,
    num_codes,
    stride_xg,
    stride_xm,
    stride_xd,
    D: tl.constexpr,
    ROW: tl.constexpr,
    VEC: tl.constexpr,
    CHUNKS: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (query blocks, K splits, groups): expanded-score screen with exact re-scoring of the
    candidates; flags the queries whose candidates it cannot narrow to slot bests. With
    CHECK_FINITE, suspect_ptr[0] and [1] as in the exact kernel, from the squared norms it computes
    anyway (one add per code)."""
    group = tl.program_id(2).to(tl.int64)
    first_code, last_code = _split_range(num_codes, BLOCK_K)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < num_queries
    key_offs = group * num_queries + offs_m
    query_rows = x_ptr + group * stride_xg + tl.minimum(offs_m, num_queries - 1).to(tl.int64) * stride_xm
    code_base = codes_ptr + group * num_codes * ROW
    block = tl.arange(0, BLOCK_K)

    best = tl.full((BLOCK_M, BLOCK_K), float("inf"), tl.float32)
    second = tl.full((BLOCK_M, BLOCK_K), float("inf"), tl.float32)
    best_code = tl.zeros((BLOCK_M, BLOCK_K), tl.int32)
    largest_sqnorm = tl.zeros((BLOCK_K,), tl.float32)
    sqnorm_total = tl.zeros((BLOCK_K,), tl.float32)
    offs_k = tl.minimum(first_code + block, last_code)
    codes, row_offsets = _code_tile(code_base, offs_k, ROW, VEC, CHUNKS)
    for k0 in range(first_code, last_code + 1, BLOCK_K):
        next_offs_k = tl.minimum(k0 + BLOCK_K + block, last_code)
        next_codes, _ = _code_tile(code_base, next_offs_k, ROW, VEC, CHUNKS)
        # |c|^2 per code: d FMAs per code, shared by the BLOCK_M rows.
        sqnorm = tl.zeros((BLOCK_K,), tl.float32)
        for j in tl.static_range(D):
            c_j = _column(codes, row_offsets, j)
            sqnorm += c_j * c_j
        largest_sqnorm = tl.maximum(largest_sqnorm, sqnorm)
        if CHECK_FINITE:
            sqnorm_total += sqnorm
        score = tl.broadcast_to(sqnorm[None, :], (BLOCK_M, BLOCK_K))
        for j in tl.static_range(D):
            # -2 x_j is loop-invariant: kept in registers.
            minus_2x_j = -2.0 * tl.load(query_rows + j * stride_xd).to(tl.float32)
            score += minus_2x_j[:, None] * _column(codes, row_offsets, j)[None, :]
        closer = score < best
        second = tl.minimum(second, tl.maximum(score, best))
        best = tl.minimum(best, score)
        best_code = tl.where(closer, offs_k[None, :], best_code)
        offs_k = next_offs_k
        codes = next_codes

    # Candidates: slot bests within the rounding bound of the row's minimum score.
    x_sqnorm = tl.zeros((BLOCK_M,), tl.float32)
    for j in tl.static_range(D):
        x_j = tl.load(query_rows + j * stride_xd).to(tl.float32)
        x_sqnorm += x_j * x_j
    if CHECK_FINITE:
        _flag_suspect(suspect_ptr, x_sqnorm)
        _flag_suspect(suspect_ptr + 1, sqnorm_total)
    threshold = _screen_threshold(best, largest_sqnorm, x_sqnorm, D)
    candidate = best <= threshold[:, None]
    # Written as "not (second > threshold)" so that NaN or inf bounds (overflow) flag the row.
    unsettled = tl.max(tl.where(second > threshold[:, None], 0, 1), axis=1)
    tl.store(flags_ptr + key_offs, unsettled.to(tl.int8), mask=row_valid & (unsettled != 0))

    _merge_rescored(keys_ptr, key_offs, row_valid, query_rows, stride_xd, code_base, best_code, candidate, D, ROW)


@_jit
def _screen_threshold(best, largest_sqnorm, x_sqnorm, D: tl.constexpr):
    """Per row, the largest score a code can have and still be the exact fp32 argmin (module doc)."""
    row_min = tl.min(best, axis=1)
    c_max = tl.max(largest_sqnorm, axis=0)
    error = 2.5 * (D + 2) * UNIT_ROUNDOFF * (c_max + tl.sqrt(x_sqnorm * c_max))
    nearest_bound = tl.maximum(x_sqnorm + row_min + error, 0.0)  # >= the distance of the best score's code
    return row_min + 2.0 * error + 2.2 * (D + 3) * UNIT_ROUNDOFF * nearest_bound


@_jit
def _merge_rescored(keys_ptr, key_offs, row_valid, query_rows, stride_xd, code_base, best_code, candidate,
                    D: tl.constexpr, ROW: tl.constexpr):
    """The exact direct distance of each candidate code, then per row (min, lowest index) merged."""
    exact = tl.zeros(best_code.shape, tl.float32)
    for j in tl.static_range(D):
        x_j = tl.load(query_rows + j * stride_xd).to(tl.float32)
        c_j = tl.load(code_base + best_code * ROW + j, mask=candidate, other=0.0).to(tl.float32)
        diff = x_j[:, None] - c_j
        exact += diff * diff
    exact = tl.where(candidate, exact, float("inf"))
    row_dist = tl.min(exact, axis=1)
    row_code = tl.min(tl.where(candidate & (exact == row_dist[:, None]), best_code, 2147483647), axis=1)
    has_candidate = tl.max(candidate.to(tl.int32), axis=1) != 0
    _merge_keys(keys_ptr, key_offs, row_valid & has_candidate, row_dist, row_code)


@_jit
def finalize_kernel(
    keys_ptr,
    indices_ptr,
    dists_ptr,
    counts_ptr,
    x_ptr,
    codes_ptr,
    quantized_ptr,
    grads_ptr,
    total,
    num_queries,
    num_codes,
    stride_ng,
    stride_nk,
    stride_xg,
    stride_xm,
    stride_xd,
    stride_qg,
    stride_qm,
    stride_qd,
    grad_scale,
    HAS_COUNTS: tl.constexpr,
    QUANTIZE: tl.constexpr,
    D: tl.constexpr,
    ROW: tl.constexpr,
    D_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Unpack keys into (index, distance); add each chosen code to counts[group, index]; with
    QUANTIZE, also write each query's chosen code (quantized) and the codebook loss's gradient
    with respect to it, grad_scale * (code - query), in the same pass (quantized and grads share
    their strides)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    key = tl.load(keys_ptr + offs, mask=valid, other=0)
    code = key.to(tl.int32).to(tl.int64)  # the low 32 bits
    dist = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    tl.store(indices_ptr + offs, code, mask=valid)
    tl.store(dists_ptr + offs, dist, mask=valid)
    group = offs // num_queries
    if HAS_COUNTS:
        one = tl.full((BLOCK,), 1, counts_ptr.dtype.element_ty)
        tl.atomic_add(counts_ptr + group * stride_ng + code * stride_nk, one, mask=valid)
    if QUANTIZE:
        query = offs - group * num_queries
        j = tl.arange(0, D_BLOCK)[None, :]
        element = valid[:, None] & (j < D)
        chosen = tl.load(codes_ptr + (group * num_codes + code)[:, None] * ROW + j, mask=element, other=0.0)
        x = tl.load(x_ptr + group[:, None] * stride_xg + query[:, None] * stride_xm + j * stride_xd,
                    mask=element, other=0.0)
        out = group[:, None] * stride_qg + query[:, None] * stride_qm + j * stride_qd
        tl.store(quantized_ptr + out, chosen, mask=element)
        tl.store(grads_ptr + out, (chosen.to(tl.float32) - x.to(tl.float32)) * grad_scale, mask=element)
