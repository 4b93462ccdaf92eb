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

import torch
import triton

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
FINALIZE_BLOCK = 1024
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


def _fits_registers(rows: int, dim: int) -> bool:
    """Per-thread registers of the screen kernel (the larger of the two): x (rows * d), best,
    second, index and score (4 * rows), two code rows in flight (2 * ROW), ~24 for addresses;
    checked against sm_90 builds for d = 1..64 (no spills inside the limit of 255)."""
    return rows * (dim + 4) + 2 * _row_layout(dim)[1] + 24 <= 255


def _configs_for_dim(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The tiles with the most rows per thread that fit the registers, and half that many
    (more warps per multiprocessor to hide memory latency), each with 4 and 8 warps: at most
    4 configs to time."""
    dim = {**named_args, **kwargs}["D"]
    fitting = [c for c in configs if _fits_registers(_rows_per_thread(c), dim)]
    most = max(_rows_per_thread(c) for c in fitting)
    return [c for c in fitting if _rows_per_thread(c) * 2 >= most]


def _autotuned(kernel, key: list[str]):
    """The kernel autotuned over the fitting tiles on CUDA, once per value of ``key``; as is
    under the interpreter, which gets one fixed config (autotuning times configs on a device)."""
    if INTERPRETED:
        return kernel
    return triton.autotune(
        configs=_cuda_configs(),
        key=key,
        prune_configs_by={"early_config_prune": _configs_for_dim},
    )(kernel)


_screen = _autotuned(screen_kernel, ["D", "num_queries", "num_codes"])
# The full exact search and its flagged-only re-run are timed apart: their costs differ wholly.
_exact = _autotuned(exact_search_kernel, ["D", "num_queries", "num_codes", "ONLY_FLAGGED"])


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped nearest-code search with the Triton kernels (inputs already checked).

    CUDA tensors run the compiled, autotuned kernels; CPU tensors need the process to have
    imported triton under TRITON_INTERPRET=1 and run the same kernels through the interpreter
    (slow: for tests). ``method`` is "exact" (the direct formula on every pair) or "screen" (two
    passes, see the module doc); both return the same answer. ``target_programs`` sets how
    many programs the grid should reach before K is split (default: PROGRAMS_PER_SM per
    multiprocessor on CUDA, 1 under the interpreter); tests raise it to exercise the split-K
    merge on small shapes. Returns (indices (G, M) int64, sq_dists (G, M) float32).
    """
    groups, num_queries, dim = x.shape
    num_codes = codebooks.shape[1]
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
        if INTERPRETED:
            blocks = {"BLOCK_M": INTERPRETER_BLOCK_M, "BLOCK_K": INTERPRETER_BLOCK_K}
            kernel[grid(blocks)](*args, **constants, **blocks)
        else:
            kernel[grid](*args, **constants)

    keys = torch.full((groups, num_queries), _NO_KEY, dtype=torch.int64, device=x.device)
    codebooks, layout = _code_rows(codebooks)
    if method == "screen":
        flags = torch.zeros((groups, num_queries), dtype=torch.int8, device=x.device)
        args = (x, codebooks, keys, flags, num_queries, num_codes, *x.stride())
        launch(_screen, *args, **layout)
        launch(_exact, *args, **layout, ONLY_FLAGGED=True)
    else:
        launch(_exact, x, codebooks, keys, None, num_queries, num_codes, *x.stride(), **layout, ONLY_FLAGGED=False)

    total = groups * num_queries
    count_strides = counts.stride() if counts is not None else (0, 0)
    finalize_kernel[(triton.cdiv(total, FINALIZE_BLOCK),)](
        keys, indices, dists, counts, total, num_queries, *count_strides,
        HAS_COUNTS=counts is not None, BLOCK=FINALIZE_BLOCK,
    )
    return indices, dists


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
