"""Triton kernels for the exact grouped nearest-code search, and their launcher.

Two kernels per call:

1. ``search``: one program takes BLOCK_M queries of one group and streams a contiguous range of
   that group's codes (its split of K) BLOCK_K at a time. Each query-code pair gets the direct
   fp32 distance ``sum_j (x_j - c_j)^2`` (see nearest_code.py for why not the expanded form),
   one dimension after the other, from columns of x and of the code block. Every (query, slot)
   element of the BLOCK_M x BLOCK_K tile keeps its own running (min, argmin) in registers, so
   a pair costs 2d FP32 instructions plus a compare and two selects, with no cross-thread
   traffic in the loop. At the end the tile is reduced per query (min distance, then the lowest
   index at that distance) and merged into a global per-query key with one 64-bit atomic min:
   the key is ``float_bits(dist) << 32 | index``; non-negative floats order like their bit
   patterns, so the smallest key is the smallest distance and, among equal distances, the
   lowest index. That makes the merge of K-splits exact, order-independent and free of a
   partial buffer, and lets autotuning re-run the kernel safely (min is idempotent).
2. ``finalize``: unpacks the keys into indices and distances and, when asked, adds the
   histogram of chosen codes to ``counts`` with atomics in the same pass.

Tails need no masks in the hot loop: out-of-range queries and codes are clamped to the last valid
one, so they are exact duplicates; a duplicate code ties with the original and loses on index,
and duplicate queries are not stored.

K is split across programs when G * ceil(M / BLOCK_M) alone would not fill the GPU (paper
shape 256T_NC=262144 at bs 128: 256 groups x 1 query block); each program derives its range of
codes from the number of splits in the grid.

On CUDA the kernels are compiled by Triton and the block shape is autotuned per (d, M, K). Under
Triton's interpreter (how CI tests them, on CPU tensors) they run with one fixed small config.
Triton decides interpreter or compiler when it is first imported: TRITON_INTERPRET=1 must be in
the environment then, because triton.language's own helpers (tl.min, tl.cdiv, ...) are built at
that moment. This module follows that decision (`INTERPRETED`) rather than re-reading the
variable, so its kernels always match the helpers they call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# The widest vector the kernel accepts: each dimension is an unrolled step of the loop.
MAX_DIM = 64
# Grid axes 1 (splits) and 2 (groups) are limited to 65535 on CUDA.
MAX_GROUPS = 65535
# A split covers at least this many code blocks, so the per-program setup and the final
# per-query reduction stay small next to the streaming loop.
MIN_BLOCKS_PER_SPLIT = 4
# Programs wanted per streaming multiprocessor before K is split further: several waves so
# that the last, partial wave costs little.
PROGRAMS_PER_SM = 8
FINALIZE_BLOCK = 1024
# Interpreter config: small blocks so that tests with small shapes cross several of them.
INTERPRETER_BLOCK_M = 16
INTERPRETER_BLOCK_K = 32

_NO_KEY = torch.iinfo(torch.int64).max

# True when triton was imported with TRITON_INTERPRET=1: its language helpers are interpreted, so
# ours must be too (an interpreted kernel cannot call compiled helpers, nor the reverse).
INTERPRETED = isinstance(tl.cdiv, InterpretedFunction)
_jit = InterpretedFunction if INTERPRETED else JITFunction


def _search_kernel(
    x_ptr,
    codes_ptr,
    keys_ptr,
    num_queries,
    num_codes,
    stride_xg,
    stride_xm,
    stride_xd,
    D: tl.constexpr,
    ROW: tl.constexpr,
    VEC: tl.constexpr,
    CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (query blocks, K splits, groups): merge each query's best code of one split into keys.

    codes_ptr is a contiguous (G, K, ROW) codebook whose first D columns are the codes (ROW is
    D rounded up to the vector width VEC): a block of codes is one contiguous (BLOCK_K, ROW)
    tile, loaded with VEC-wide vector loads (each thread's code row at once), one block ahead.
    """
    query_block = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2).to(tl.int64)  # int64: group * K * D can pass 2**31 elements
    # Same formula as the host's split count, so the splits tile [0, K) with no empty one.
    codes_per_split = tl.cdiv(tl.cdiv(num_codes, tl.num_programs(1)), BLOCK_K) * BLOCK_K
    first_code = split * codes_per_split
    last_code = tl.minimum(first_code + codes_per_split, num_codes) - 1

    offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query_rows = x_ptr + group * stride_xg + tl.minimum(offs_m, num_queries - 1) * stride_xm
    code_base = codes_ptr + group * num_codes * ROW
    # A block of codes is held as (CHUNKS, BLOCK_K, VEC): VEC floats are one vector load, and
    # Triton spreads the lanes along the middle (code) axis, so each thread holds its whole
    # code row and no value crosses threads. CHUNKS is ROW / VEC rounded up to a power of two.
    chunk = tl.arange(0, CHUNKS)[:, None, None]
    lane = tl.arange(0, VEC)[None, None, :]
    row_offsets = chunk * VEC + lane
    row_valid = row_offsets < ROW  # whole vectors: keeps the loads VEC wide
    block = tl.arange(0, BLOCK_K)

    best_dist = tl.full((BLOCK_M, BLOCK_K), float("inf"), tl.float32)
    best_code = tl.zeros((BLOCK_M, BLOCK_K), tl.int32)
    offs_k = tl.minimum(first_code + block, last_code)
    codes = tl.load(code_base + offs_k[None, :, None] * ROW + row_offsets, mask=row_valid, other=0.0)
    for k0 in range(first_code, last_code + 1, BLOCK_K):
        # Prefetch the next block (clamped: the last iteration re-reads valid codes, unused)
        # so its memory latency overlaps this block's arithmetic.
        next_offs_k = tl.minimum(k0 + BLOCK_K + block, last_code)
        next_codes = tl.load(code_base + next_offs_k[None, :, None] * ROW + row_offsets, mask=row_valid, other=0.0)
        dist = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for j in tl.static_range(D):
            # The query column is loop-invariant: the compiler keeps it in registers.
            x_j = tl.load(query_rows + j * stride_xd).to(tl.float32)
            # Column j of the codes: with a constant j and the row in one thread this is a
            # register pick (-0.0 is the additive identity the compiler may drop).
            picked = tl.where(row_offsets == j, codes.to(tl.float32), -0.0)
            c_j = tl.sum(tl.sum(picked, axis=2), axis=0)
            diff = x_j[:, None] - c_j[None, :]
            dist += diff * diff
        # Strict <: a slot sees its codes in increasing order, so it keeps the lowest on ties.
        closer = dist < best_dist
        best_dist = tl.where(closer, dist, best_dist)
        best_code = tl.where(closer, offs_k[None, :], best_code)
        offs_k = next_offs_k
        codes = next_codes

    row_dist = tl.min(best_dist, axis=1)
    row_code = tl.min(tl.where(best_dist == row_dist[:, None], best_code, 2147483647), axis=1)
    key = (row_dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | row_code.to(tl.int64)
    tl.atomic_min(keys_ptr + group * num_queries + offs_m, key, mask=offs_m < num_queries)


def _finalize_kernel(
    keys_ptr,
    indices_ptr,
    dists_ptr,
    counts_ptr,
    total,
    num_queries,
    stride_ng,
    stride_nk,
    HAS_COUNTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Unpack keys into (index, distance); add each chosen code to counts[group, index]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    key = tl.load(keys_ptr + offs, mask=valid, other=0)
    code = key.to(tl.int32).to(tl.int64)  # the low 32 bits
    dist = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    tl.store(indices_ptr + offs, code, mask=valid)
    tl.store(dists_ptr + offs, dist, mask=valid)
    if HAS_COUNTS:
        group = offs // num_queries
        one = tl.full((BLOCK,), 1, counts_ptr.dtype.element_ty)
        tl.atomic_add(counts_ptr + group * stride_ng + code * stride_nk, one, mask=valid)


def _cuda_configs() -> list[triton.Config]:
    """Tile shapes for the GPU: BLOCK_M = query rows per thread, BLOCK_K = 32 lanes x warps.

    Triton's default layout for the (BLOCK_M, BLOCK_K) tile puts the 32 lanes of a warp, then
    the warps, along K, so with BLOCK_K = 32 * num_warps each thread owns one code column and
    all BLOCK_M query rows: its rows' x columns stay in registers for the whole stream
    (BLOCK_M * d registers), every code it loads serves BLOCK_M pairs, and the (min, argmin)
    state is 2 registers per row. Warps along M as well would need each code in two warps,
    which Triton does through shared memory and barriers (seen in sm_90 builds): avoided.
    """
    return [
        triton.Config({"BLOCK_M": rows, "BLOCK_K": 32 * warps}, num_warps=warps)
        for rows in (2, 4, 8, 16, 32)
        for warps in (4, 8)
    ]


def _rows_per_thread(config: triton.Config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_K"] // (32 * config.num_warps)


def _configs_for_dim(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles whose register-resident query columns (rows * d registers) lie between half
    and all of min(128, 32 d): no spills (checked in sm_90 builds for d = 1..64), and as many
    pairs per loaded code value as that allows."""
    dim = {**named_args, **kwargs}["D"]
    most = min(128, 32 * dim)
    return [c for c in configs if most // 2 <= _rows_per_thread(c) * dim <= most]


_search = _jit(_search_kernel)
if not INTERPRETED:
    # Autotuning times configs on the device; the interpreter gets one fixed config instead.
    _search = triton.autotune(
        configs=_cuda_configs(),
        key=["D", "num_queries", "num_codes"],
        prune_configs_by={"early_config_prune": _configs_for_dim},
    )(_search)
_finalize = _jit(_finalize_kernel)


def _code_rows(codebooks: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """The codebook as the kernel reads it, and the matching layout constants.

    Rows are read VEC floats at a time (4 for d >= 3) with aligned vector loads, so each code row
    must start on a VEC boundary: for d not a multiple of VEC (3, 5, 6, 7, ...) the codes are
    copied once into zero-padded rows of ROW floats; the padding is never read into a distance.
    Strided codebooks are made contiguous.
    """
    dim = codebooks.shape[2]
    vec = 4 if dim >= 3 else dim
    row = -(-dim // vec) * vec
    if row != dim:
        codebooks = torch.nn.functional.pad(codebooks, (0, row - dim))
    layout = {"D": dim, "ROW": row, "VEC": vec, "CHUNKS": triton.next_power_of_2(row // vec)}
    return codebooks.contiguous(), layout


def split_count(num_codes: int, block_k: int, base_programs: int, target_programs: int) -> int:
    """How many programs share one query block's K range: enough to reach target_programs.

    Each split gets a whole number of BLOCK_K blocks (at least MIN_BLOCKS_PER_SPLIT unless K is
    smaller), and the count is recomputed from that size so that no split is empty; the kernel
    derives the same size from the grid.
    """
    wanted = max(1, -(-target_programs // base_programs))
    wanted = min(wanted, max(1, num_codes // (block_k * MIN_BLOCKS_PER_SPLIT)))
    codes_per_split = -(-(-(-num_codes // wanted)) // block_k) * block_k
    return -(-num_codes // codes_per_split)


def nearest_code_triton(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
    target_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped nearest-code search with the Triton kernels (inputs already checked).

    CUDA tensors run the compiled, autotuned kernels; CPU tensors need the process to have
    imported triton under TRITON_INTERPRET=1 and run the same kernels through the interpreter
    (slow: for tests). ``target_programs`` sets how many programs the grid
    should reach before K is split (default: PROGRAMS_PER_SM per multiprocessor on CUDA, 1 on
    the interpreter); tests raise it to exercise the split-K merge on small shapes.
    Returns (indices (G, M) int64, sq_dists (G, M) float32), like `nearest_code`.
    """
    groups, num_queries, dim = x.shape
    num_codes = codebooks.shape[1]
    if dim > MAX_DIM:
        raise ValueError(f"the Triton search supports d up to {MAX_DIM}, got d={dim}")
    if groups > MAX_GROUPS:
        raise ValueError(f"the Triton search supports up to {MAX_GROUPS} groups, got {groups}")
    if num_codes >= 2**31:
        raise ValueError(f"the Triton search indexes codes with int32, got K={num_codes}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "the Triton search runs on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported in this process"
        )
    indices = torch.empty((groups, num_queries), dtype=torch.int64, device=x.device)
    dists = torch.empty((groups, num_queries), dtype=torch.float32, device=x.device)
    if groups * num_queries == 0:
        return indices, dists

    if target_programs is None:
        target_programs = (
            1 if INTERPRETED else PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
        )

    def search_grid(meta: dict) -> tuple[int, int, int]:
        query_blocks = triton.cdiv(num_queries, meta["BLOCK_M"])
        splits = split_count(num_codes, meta["BLOCK_K"], query_blocks * groups, target_programs)
        return query_blocks, splits, groups

    keys = torch.full((groups, num_queries), _NO_KEY, dtype=torch.int64, device=x.device)
    codebooks, layout = _code_rows(codebooks)
    search_args = (x, codebooks, keys, num_queries, num_codes, *x.stride())
    if INTERPRETED:
        block_config = {"BLOCK_M": INTERPRETER_BLOCK_M, "BLOCK_K": INTERPRETER_BLOCK_K}
        _search[search_grid(block_config)](*search_args, **layout, **block_config)
    else:
        _search[search_grid](*search_args, **layout)

    total = groups * num_queries
    count_strides = counts.stride() if counts is not None else (0, 0)
    _finalize[(triton.cdiv(total, FINALIZE_BLOCK),)](
        keys, indices, dists, counts, total, num_queries, *count_strides,
        HAS_COUNTS=counts is not None, BLOCK=FINALIZE_BLOCK,
    )
    return indices, dists


def autotuned_config() -> str | None:
    """The tile autotuning chose for the latest CUDA search, for reports (None if none ran)."""
    config = getattr(_search, "best_config", None)
    if config is None:
        return None
    return f"BLOCK_M={config.kwargs['BLOCK_M']}, BLOCK_K={config.kwargs['BLOCK_K']}, num_warps={config.num_warps}"
