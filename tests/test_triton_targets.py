"""CI guard for the GPU path, without a GPU: every configuration the Triton kernels launch with on
CUDA is compiled to cubin for sm_80 (A100) and sm_90 (H100) by Triton's own compiler and the
ptxas in its wheel, and the cubin's function is read back with the wheel's cuobjdump. A kernel
that stops compiling for a GPU then fails here, not for its first user.

The configurations: the autotuner's tiles that `_pruner` keeps for the code dims the presets use
(d = 4 and 8) and for a padded one (d = 3), each search kernel's variants
(ONLY_FLAGGED, CHECK_FINITE), the finalize kernel with and without counts (int32 in training,
int64 in eval) and with the training step's codes and gradients (QUANTIZE), half-precision inputs
once, and the sparse AdamW kernels at d = 4 and 8. bench search's candidate tiles
(`candidate_configs`) are compiled for sm_90, the GPU they are swept on. Arguments are typed as
launches pass them, without the specialisations Triton adds for particular values (1, multiples
of 16).

The cubins are compiled once per content of kernels/ (and of this file, and per Triton build) on a
machine, and read back from Triton's cache in ~/.cache/revq-pipe-tests while that content stays.
"""

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

triton = pytest.importorskip(
    "triton", reason="triton is not installed: pip install -e '.[test]' brings it where triton has wheels (Linux)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from revq_pipe.kernels import sparse_adamw, triton_search  # noqa: E402
from revq_pipe.kernels.search_kernels import INTERPRETED, exact_search_kernel, finalize_kernel, screen_kernel  # noqa: E402
from revq_pipe.kernels.sparse_adamw import segment_sums_kernel, sparse_adamw_kernel  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 is set: Triton makes the kernels interpreter functions, "
                                           "which do not compile"),
]

ARCHS = (80, 90)
DIMS = (3, 4, 8)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def search_layout(dim: int) -> dict[str, int]:
    vec, row = triton_search._row_layout(dim)
    return {"D": dim, "ROW": row, "VEC": vec, "CHUNKS": triton.next_power_of_2(row // vec)}


def exact_launch(config, dim: int, label: str, *, dtype: str = "fp32", flagged: bool = False, check_finite: bool = False):
    """The exact kernel as nearest_code_triton launches it: the flagged re-run gets flags and no
    suspect buffer; the one-pass search flags=None and, when it checks, the suspect buffer."""
    constants = {**search_layout(dim), **config.kwargs, "ONLY_FLAGGED": flagged}
    return _search_launch(exact_search_kernel, config, constants, dim, label, dtype, flagged, check_finite)


def screen_launch(config, dim: int, label: str, *, dtype: str = "fp32", check_finite: bool = False):
    return _search_launch(screen_kernel, config, {**search_layout(dim), **config.kwargs}, dim, label, dtype, True,
                          check_finite)


def _search_launch(kernel, config, constants, dim, label, dtype, flags, check_finite):
    constants = {**constants, "CHECK_FINITE": check_finite}
    if not flags:
        constants["flags_ptr"] = None
    if not check_finite:
        constants["suspect_ptr"] = None
    signature = search_signature(dtype, flags=flags, suspect=check_finite, constants=constants)
    tile = f"d={dim} BLOCK_M={config.kwargs['BLOCK_M']} BLOCK_K={config.kwargs['BLOCK_K']} warps={config.num_warps}"
    return kernel, signature, constants, config.num_warps, f"{label} {tile}"


def search_launches():
    """(kernel, signature, constants, num_warps, label) for every search-kernel launch configuration."""
    for dim in DIMS:
        for config in autotuned_configs("screen_kernel", dim):
            yield screen_launch(config, dim, "screen")
            yield screen_launch(config, dim, "screen checked", check_finite=True)
        for config in autotuned_configs("exact_search_kernel", dim):
            yield exact_launch(config, dim, "exact flagged", flagged=True)
            yield exact_launch(config, dim, "exact all")
            yield exact_launch(config, dim, "exact all checked", check_finite=True)
    for dtype in ("bf16", "fp16"):
        yield screen_launch(autotuned_configs("screen_kernel", 8)[0], 8, f"screen checked {dtype}", dtype=dtype,
                            check_finite=True)
        yield exact_launch(autotuned_configs("exact_search_kernel", 8)[0], 8, f"exact checked {dtype}", dtype=dtype,
                           check_finite=True)


def autotuned_configs(kernel: str, dim: int):
    """The tiles autotuning times for `kernel` at code dim `dim`."""
    return triton_search._pruner(kernel)(triton_search._cuda_configs(), {"D": dim})


def search_signature(dtype: str, *, flags: bool, suspect: bool, constants: dict) -> dict[str, str]:
    """The search kernels' argument types (each name in `constants` is a constexpr)."""
    return {"x_ptr": f"*{dtype}", "codes_ptr": f"*{dtype}", "keys_ptr": "*i64", "flags_ptr": "*i8" if flags else "",
            "suspect_ptr": "*i32" if suspect else "", "num_queries": "i32", "num_codes": "i32", "stride_xg": "i32",
            "stride_xm": "i32", "stride_xd": "i32", **{name: "constexpr" for name in constants}}


def finalize_launches():
    base = {"keys_ptr": "*i64", "indices_ptr": "*i64", "dists_ptr": "*fp32", "x_ptr": "*fp32", "codes_ptr": "*fp32",
            "total": "i32", "num_queries": "i32", "num_codes": "i32", "stride_ng": "i32", "stride_nk": "i32",
            **{f"stride_{a}{b}": "i32" for a in "xq" for b in ("g", "m", "d")}, "grad_scale": "fp32",
            **{name: "constexpr" for name in ("HAS_COUNTS", "QUANTIZE", "D", "ROW", "D_BLOCK", "BLOCK")}}
    no_outputs = {"quantized_ptr": "constexpr", "grads_ptr": "constexpr"}
    block = {"BLOCK": triton_search.FINALIZE_BLOCK, "D": 4, "ROW": 4, "D_BLOCK": 4, "QUANTIZE": False,
             "quantized_ptr": None, "grads_ptr": None}
    for counts in ("i32", "i64"):
        yield (finalize_kernel, {**base, **no_outputs, "counts_ptr": f"*{counts}"}, {**block, "HAS_COUNTS": True}, 4,
               f"finalize counts {counts}")
    yield (finalize_kernel, {**base, **no_outputs, "counts_ptr": "constexpr"},
           {**block, "counts_ptr": None, "HAS_COUNTS": False}, 4, "finalize no counts")
    for dim in (4, 8):
        outputs = {"quantized_ptr": "*fp32", "grads_ptr": "*fp32", "counts_ptr": "*i32"}
        constants = {"BLOCK": triton_search.FINALIZE_QUANTIZE_BLOCK, "D": dim, "ROW": dim, "D_BLOCK": dim, "QUANTIZE": True,
                     "HAS_COUNTS": True}
        yield finalize_kernel, {**base, **outputs}, constants, 4, f"finalize quantize d={dim}"


def sparse_adamw_launches():
    for dim in (4, 8):
        layout = {"D": dim, "D_BLOCK": dim, "BLOCK": sparse_adamw.BLOCK}
        yield (segment_sums_kernel, {"sorted_rows_ptr": "*i64", "order_ptr": "*i64", "grads_ptr": "*fp32",
                                     "sums_ptr": "*fp32", "partials_ptr": "*fp32", "num_rows": "i32", "stride_gn": "i32",
                                     "stride_gd": "i32", "D": "constexpr", "D_BLOCK": "constexpr", "BLOCK": "constexpr"},
               layout, 4, f"segment sums d={dim}")
        pointers = ("sorted_rows_ptr", "sums_ptr", "partials_ptr", "params_ptr", "exp_avg_ptr", "exp_avg_sq_ptr",
                    "last_step_ptr", "step_ptr", "lr_ptr", "log_betas_ptr", "norm_ptr")
        types = ("*i64", "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "*i64", "*i64", "*fp32", "*fp64", "*fp32")
        floats = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "max_grad_norm")
        constants = {**layout, "WINDOW": 100, "PARTIALS_BLOCK": sparse_adamw.PARTIALS_BLOCK}
        signature = {**dict(zip(pointers, types)), "num_partials": "i32", "num_rows": "i32",
                     **{name: "fp32" for name in floats}, **{name: "constexpr" for name in constants}}
        yield sparse_adamw_kernel, signature, constants, 4, f"sparse adamw d={dim}"


def candidate_launches():
    """bench search --candidates: every candidate tile of both methods' kernels, as the sweep launches
    them (the screen method's flagged re-run takes the screen's tile)."""
    for dim in (4, 8):
        for config in triton_search.candidate_configs(dim, "exact_search_kernel"):
            kernel, signature, constants, warps, label = exact_launch(config, dim, "candidate exact")
            yield kernel, signature, constants, warps, f"{label} stages={config.num_stages}", config.num_stages
        for config in triton_search.candidate_configs(dim, "screen_kernel"):
            for kernel, signature, constants, warps, label in (screen_launch(config, dim, "candidate screen"),
                                                                exact_launch(config, dim, "candidate flagged", flagged=True)):
                yield kernel, signature, constants, warps, f"{label} stages={config.num_stages}", config.num_stages


LAUNCHES = [*search_launches(), *finalize_launches(), *sparse_adamw_launches()]


CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "revq-pipe-tests" / "triton-targets"
STALE_AFTER_S = 7 * 24 * 3600


def compile_inputs_key() -> str:
    """A digest of what the cubins are made from: kernels/'s files, this file's launch list and the
    Triton build (its version; Triton's own cache keys add its compiler's and ptxas's hashes)."""
    digest = hashlib.sha256(f"triton {triton.__version__}".encode())
    for path in [*sorted(Path(triton_search.__file__).parent.glob("*.py")), Path(__file__)]:
        digest.update(f"{path.name} {path.stat().st_size}\n".encode() + path.read_bytes())
    return digest.hexdigest()[:20]


@pytest.fixture(scope="module")
def kernel_cache():
    """Triton's own cache, in a folder named after `compile_inputs_key`: every kernel is compiled
    for real the first time kernels/ (or this test, or Triton) is seen on this machine, and read
    back from there while nothing of it changes (compiling them all cost 131 CPU-seconds on the
    2-core dev box, mostly Triton's own passes, ptxas about a fifth; reading them back under 1).
    Folders unused for a week are removed."""
    folder = CACHE_ROOT / compile_inputs_key()
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)
    for other in CACHE_ROOT.iterdir():
        if other != folder and time.time() - other.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(other, ignore_errors=True)
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        del os.environ["TRITON_CACHE_DIR"]
    else:
        os.environ["TRITON_CACHE_DIR"] = saved


def compile_and_read_back(kernel, signature, constants, num_warps, label, arch, folder, num_stages=3) -> str:
    """Compile one launch for sm_`arch` and return cuobjdump's resource usage of its cubin."""
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = folder / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    assert f"Function {kernel.__name__}:" in usage and "REG:" in usage, f"sm_{arch} {label}: {usage}"
    return usage


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm_{arch}")
def test_every_kernel_configuration_compiles_for_the_gpu(arch, kernel_cache, tmp_path):
    spilling = []
    for launch in LAUNCHES:
        usage = compile_and_read_back(*launch, arch, tmp_path)
        if "STACK:0 " not in usage and is_hot(launch[4]):
            spilling.append(f"{launch[4]}: {usage.split('REG:')[1].split()[:2]}")
    assert any(kernel_cache.rglob("*.cubin")), f"no cubin in {kernel_cache}: Triton's cache is elsewhere"
    assert not spilling, f"sm_{arch} launches that spill registers to local memory: {spilling}"


def is_hot(label: str) -> bool:
    """Launches that run at every training step at the presets' d (4 and 8): registers spilled there
    cost every step, so the autotuner's tiles must not spill (checked with Triton 3.6 and 3.9; the
    flagged re-run, rare work, may)."""
    searches = label.startswith(tuple(f"{kind} d={dim} " for kind in ("screen", "screen checked", "exact all",
                                                                       "exact all checked") for dim in (4, 8)))
    return searches or label.startswith(("finalize", "segment sums", "sparse adamw"))


def test_every_search_candidate_compiles_for_sm_90(kernel_cache, tmp_path):
    for *launch, num_stages in candidate_launches():
        compile_and_read_back(*launch, 90, tmp_path, num_stages=num_stages)
