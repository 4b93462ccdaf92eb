"""Launching the Triton nearest-code search: tiles, K splits, autotuning, the two-pass method.

The kernels and their method are described in search_kernels.py. Per call (method "exact", the
default): the exact kernel scores every pair with the direct fp32 distance in one pass; finalize
unpacks the answers and adds `counts`. Method "screen" streams every code once with the cheaper
expanded score (~d+5.5 instructions per pair instead of ~2d+3.5), settles almost every query,
and re-runs the query blocks holding a flagged query (near ties, duplicate codes, overflow) with
the exact kernel. On one H100 (2026-11-24) the exact method was the faster at every d measured
(4, 8, 16, 32: by 7% to 34%), so it is the default; `bench search` times both.

K is split across programs when G * ceil(M / BLOCK_M) alone would not fill the GPU (several
waves per multiprocessor); each program derives its range of codes from the number of splits in
the grid. On CUDA the block shape is autotuned per (d, M, K) among the tiles that fit the
registers; under Triton's interpreter (how CI tests the kernels, on CPU tensors) one fixed small
config runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.runtime.autotuner import Autotuner

from revq_pipe.kernels.nearest_code import check_finite_inputs
from revq_pipe.kernels.search_kernels import (
    INTERPRETED,
    exact_search_kernel,
    finalize_kernel,
    screen_kernel,
)

METHODS = ("screen", "exact")
# The widest vector the kernels accept: each dimension is an unrolled step of the loop.
MAX_DIM = 64
# Grid axes 1 (splits) and 2 (groups) are limited to 65535 on CUDA.
MAX_GROUPS = 65535
# A split covers at least this many code blocks, so the per-program setup and the final
# per-query reduction stay small next to the streaming loop.
MIN_BLOCKS_PER_SPLIT = 4
# Programs wanted per streaming multiprocessor before K is split further: several waves so
# that the last, partial wave costs little.
PROGRAMS_PER_SM = 8
# bench search --candidates: the programs per multiprocessor it tries with the best tile (more
# programs: K split into more, shorter ranges).
CANDIDATE_PROGRAMS_PER_SM = (4, 8, 16, 32)
FINALIZE_BLOCK = 1024
# With QUANTIZE each query also moves d numbers in and two d-vectors out: 1,024 queries per program
# spilled registers at d = 8 on sm_90 (568 bytes of stack); 256 need 96 registers.
FINALIZE_QUANTIZE_BLOCK = 256
# Interpreter config: small blocks so that tests with small shapes cross several of them.
INTERPRETER_BLOCK_M = 16
INTERPRETER_BLOCK_K = 32

_NO_KEY = torch.iinfo(torch.int64).max


def _cuda_configs() -> list[triton.Config]:
    """Tile shapes for the GPU: BLOCK_M = query rows per thread, BLOCK_K = 32 lanes x warps.

    Triton's default layout for the (BLOCK_M, BLOCK_K) tile puts the 32 lanes of a warp, then
    the warps, along K, so with BLOCK_K = 32 * num_warps each thread owns one code slot and all
    BLOCK_M query rows. Warps along M as well would need each code in two warps, which Triton
    does through shared memory and barriers (seen in sm_90 builds): avoided.
    """
    return [
        triton.Config({"BLOCK_M": rows, "BLOCK_K": 32 * warps}, num_warps=warps)
        for rows in (1, 2, 4, 8, 16, 32)
        for warps in (4, 8)
    ]


def _rows_per_thread(config: triton.Config) -> int:
    """Query rows each thread holds: the tile's elements over the CTA's threads."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_K"] // (32 * config.num_warps)


def _row_layout(dim: int) -> tuple[int, int]:
    """(VEC, ROW): floats per vector load (4 for d >= 3) and d rounded up to a multiple of it."""
    vec = 4 if dim >= 3 else dim
    return vec, -(-dim // vec) * vec


# Registers per thread of each kernel: per query row it holds, and for the codes in flight and
# addresses (2 ROW + 24). Fitted on sm_90 builds (4 warps, BLOCK_K 128, d = 4..32, 2..16 rows,
# Triton 3.9, checked with 3.6): the exact kernel keeps x, the best distance and its code per row
# (about 2d + 5 registers), the screen also the second-best score and the score (about 3d + 8).
# At d = 4 and 8 the tiles within 255 built without spilling; the next larger did spill (exact
# d=8 16 rows: 176 bytes of stack; screen d=8 16 rows: 2,000 bytes with 3.9, 504 with 3.6), which
# the previous estimate (d + 4 per row for both) let autotuning choose at d = 8.
ROW_REGISTERS = {"exact_search_kernel": (2, 5), "screen_kernel": (3, 8)}


def _fits_registers(rows: int, dim: int, kernel: str) -> bool:
    """Whether `rows` query rows per thread of `kernel` fit the 255 registers of a thread."""
    per_dim, extra = ROW_REGISTERS[kernel]
    return rows * (per_dim * dim + extra) + 2 * _row_layout(dim)[1] + 24 <= 255


def _most_rows(dim: int, kernel: str) -> int:
    """The most rows per thread (a power of two, at most 32) that fit the registers, at least 1."""
    rows = 1
    while rows < 32 and _fits_registers(rows * 2, dim, kernel):
        rows *= 2
    return rows


def _pruner(kernel: str):
    """Autotuning's pruning for `kernel`: the tiles with the most rows per thread that fit the
    registers, and half that many (more warps per multiprocessor to hide memory latency), each
    with 4 and 8 warps: at most 4 configs to time."""

    def configs_for_dim(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        most = _most_rows({**named_args, **kwargs}["D"], kernel)
        return [c for c in configs if most // 2 <= _rows_per_thread(c) <= most]

    return configs_for_dim


def candidate_configs(dim: int, kernel: str = "exact_search_kernel") -> list[triton.Config]:
    """Tiles for bench search's sweep (`--candidates`), wider than autotuning's: half the most rows
    per thread that fit the registers, the most, and twice that (to see what spilling costs), each
    with 4 or 8 warps and one or three software-pipelining stages (one code per thread)."""
    most = _most_rows(dim, kernel)
    return [triton.Config({"BLOCK_M": rows, "BLOCK_K": 32 * warps}, num_warps=warps, num_stages=stages)
            for rows in sorted({max(most // 2, 1), most, most * 2}) for warps in (4, 8) for stages in (1, 3)]


def _autotuned(kernel, key: list[str]):
    """The kernel autotuned over the fitting tiles on CUDA, once per value of ``key``; as is
    under the interpreter, which gets one fixed config (autotuning times configs on a device)."""
    if INTERPRETED:
        return kernel
    return triton.autotune(
        configs=_cuda_configs(),
        key=key,
        prune_configs_by={"early_config_prune": _pruner(kernel.__name__)},
    )(kernel)


_screen = _autotuned(screen_kernel, ["D", "num_queries", "num_codes", "CHECK_FINITE"])
# The full exact search, its NaN/inf-checking form and its flagged-only re-run are timed apart:
# their costs and registers differ.
_exact = _autotuned(exact_search_kernel, ["D", "num_queries", "num_codes", "ONLY_FLAGGED", "CHECK_FINITE"])


def _code_rows(codebooks: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """The codebook as the kernel reads it, and the matching layout constants.

    Rows are read VEC floats at a time (4 for d >= 3) with aligned vector loads, so each code row
    must start on a VEC boundary: for d not a multiple of VEC (3, 5, 6, 7, ...) the codes are
    copied once into zero-padded rows of ROW floats; the padding is never read into a distance.
    Strided codebooks are made contiguous.
    """
    dim = codebooks.shape[2]
    vec, row = _row_layout(dim)
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
    method: str = "exact",
    target_programs: int | None = None,
    check_finite: bool = False,
    quantize: QuantizeOutputs | None = None,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped nearest-code search with the Triton kernels (inputs already checked).

    CUDA tensors run the compiled, autotuned kernels; CPU tensors need the process to have
    imported triton under TRITON_INTERPRET=1 and run the same kernels through the interpreter
    (slow: for tests). ``method`` is "exact" (the direct formula on every pair) or "screen" (two
    passes, see the module doc); both return the same answer. ``target_programs`` sets how
    many programs the grid should reach before K is split (default: PROGRAMS_PER_SM per
    multiprocessor on CUDA, 1 under the interpreter); tests raise it to exercise the split-K
    merge on small shapes. ``check_finite`` raises NonFiniteError for NaN or inf in x or the
    codebooks: the kernels flag them as they read (search_kernels._flag_suspect), and only a flag
    sends the host to the exact check, at the price of one device sync after the search.
    ``quantize`` also writes each query's chosen code and the codebook loss's gradient (see
    `QuantizeOutputs`), in the pass that unpacks the answers. ``config`` runs the method's kernels
    with that one tile instead of the autotuned choice (bench search's candidate sweep).
    Returns (indices (G, M) int64, sq_dists (G, M) float32).
    """
    groups, num_queries, dim = x.shape
    num_codes = codebooks.shape[1]
    _check_supported(x, groups, num_codes, dim, method)
    indices = torch.empty((groups, num_queries), dtype=torch.int64, device=x.device)
    dists = torch.empty((groups, num_queries), dtype=torch.float32, device=x.device)
    if groups * num_queries == 0:
        return indices, dists
    if target_programs is None:
        target_programs = (
            1 if INTERPRETED else PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
        )

    def grid(meta: dict) -> tuple[int, int, int]:
        query_blocks = triton.cdiv(num_queries, meta["BLOCK_M"])
        splits = split_count(num_codes, meta["BLOCK_K"], query_blocks * groups, target_programs)
        return query_blocks, splits, groups

    def launch(kernel, *args, **constants) -> None:
        if config is not None:  # the kernel itself, not its autotuner; the interpreter has no warps or stages
            tuning = {} if INTERPRETED else {"num_warps": config.num_warps, "num_stages": config.num_stages}
            raw = kernel.fn if isinstance(kernel, Autotuner) else kernel
            raw[grid(config.kwargs)](*args, **constants, **config.kwargs, **tuning)
        elif INTERPRETED:
            blocks = {"BLOCK_M": INTERPRETER_BLOCK_M, "BLOCK_K": INTERPRETER_BLOCK_K}
            kernel[grid(blocks)](*args, **constants, **blocks)
        else:
            kernel[grid](*args, **constants)

    keys = torch.full((groups, num_queries), _NO_KEY, dtype=torch.int64, device=x.device)
    codebooks, layout = _code_rows(codebooks)
    suspect = torch.zeros(2, dtype=torch.int32, device=x.device) if check_finite else None
    if method == "screen":
        flags = torch.zeros((groups, num_queries), dtype=torch.int8, device=x.device)
        launch(_screen, x, codebooks, keys, flags, suspect, num_queries, num_codes, *x.stride(), **layout,
               CHECK_FINITE=check_finite)
        launch(_exact, x, codebooks, keys, flags, None, num_queries, num_codes, *x.stride(), **layout,
               ONLY_FLAGGED=True, CHECK_FINITE=False)
    else:
        launch(_exact, x, codebooks, keys, None, suspect, num_queries, num_codes, *x.stride(), **layout,
               ONLY_FLAGGED=False, CHECK_FINITE=check_finite)
    _finalize(keys, indices, dists, counts, x, codebooks, layout, quantize)
    if suspect is not None and bool(suspect.any()):  # one sync; the exact check only when flagged
        check_finite_inputs(x, codebooks)
    return indices, dists


@dataclass
class QuantizeOutputs:
    """Where the finalize pass writes, per query (g, m): ``quantized[g, m]``, the chosen code (the
    codebooks' dtype), and ``token_grads[g, m] = grad_scale * (code - x[g, m])`` in float32, the
    gradient of a mean squared error whose numel is 2 / grad_scale. Both (G, M, d), one layout."""

    quantized: torch.Tensor
    token_grads: torch.Tensor
    grad_scale: float


def _check_supported(x: torch.Tensor, groups: int, num_codes: int, dim: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dim > MAX_DIM:
        raise ValueError(f"the Triton search supports d up to {MAX_DIM}, got d={dim}")
    if groups > MAX_GROUPS:
        raise ValueError(f"the Triton search supports up to {MAX_GROUPS} groups, got {groups}")
    if num_codes * _row_layout(dim)[1] >= 2**31:
        raise ValueError(f"the Triton search offsets codes within a group with int32: K*d={num_codes * dim} is too many")
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "the Triton search runs on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported in this process"
        )


def _finalize(keys: torch.Tensor, indices: torch.Tensor, dists: torch.Tensor, counts: torch.Tensor | None,
              x: torch.Tensor, codebooks: torch.Tensor, layout: dict[str, int], quantize: QuantizeOutputs | None) -> None:
    """One pass over the answers: indices, distances, counts and, when asked, codes and gradients."""
    groups, num_queries, dim = x.shape
    total = groups * num_queries
    count_strides = counts.stride() if counts is not None else (0, 0)
    if quantize is not None:
        if quantize.quantized.stride() != quantize.token_grads.stride():
            raise ValueError("quantized and token_grads must share their strides")
        outputs, out_strides, scale = (quantize.quantized, quantize.token_grads), quantize.quantized.stride(), quantize.grad_scale
    else:
        outputs, out_strides, scale = (None, None), (0, 0, 0), 0.0
    block = FINALIZE_BLOCK if quantize is None else FINALIZE_QUANTIZE_BLOCK
    finalize_kernel[(triton.cdiv(total, block),)](
        keys, indices, dists, counts, x, codebooks, *outputs, total, num_queries, codebooks.shape[1],
        *count_strides, *x.stride(), *out_strides, scale,
        HAS_COUNTS=counts is not None, QUANTIZE=quantize is not None, D=dim, ROW=layout["ROW"],
        D_BLOCK=triton.next_power_of_2(dim), BLOCK=block,
    )


def autotuned_config() -> str | None:
    """The tiles autotuning chose for the latest CUDA search, for reports (None if none ran)."""
    chosen = []
    for name, kernel in (("screen", _screen), ("exact", _exact)):
        config = getattr(kernel, "best_config", None)
        if config is not None:
            chosen.append(
                f"{name}: BLOCK_M={config.kwargs['BLOCK_M']}, BLOCK_K={config.kwargs['BLOCK_K']}, "
                f"num_warps={config.num_warps}"
            )
    return "; ".join(chosen) or None
