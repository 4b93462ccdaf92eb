"""CI guard for the GPU path, without a GPU: every configuration the search kernels launch with on
CUDA is compiled to cubin for sm_80 (A100) and sm_90 (H100) by Triton's own compiler and the
ptxas in its wheel, and the cubin's function is read back with the wheel's cuobjdump. A kernel
that stops compiling for a GPU then fails here, not for its first user.

The configurations: the autotuner's tiles that `_configs_for_dim` keeps for the code dims the
presets use (d = 4 and 8) and for a padded one (d = 3), each search kernel's variants
(ONLY_FLAGGED), the finalize kernel with and without counts (int32 in training, int64 in eval),
and half-precision inputs once. Arguments are typed as launches pass them, without the
specialisations Triton adds for particular values (1, multiples of 16).

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

from revq_pipe.kernels import triton_search  # noqa: E402
from revq_pipe.kernels.search_kernels import INTERPRETED, exact_search_kernel, finalize_kernel, screen_kernel  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 is set: Triton makes the kernels interpreter functions, "
                                           "which do not compile"),
]

ARCHS = (80, 90)
DIMS = (3, 4, 8)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def search_launches():
    """(kernel, signature, constants, num_warps, label) for every search-kernel launch configuration."""
    for dim in DIMS:
        vec, row = triton_search._row_layout(dim)
        layout = {"D": dim, "ROW": row, "VEC": vec, "CHUNKS": triton.next_power_of_2(row // vec)}
        for config in triton_search._configs_for_dim(triton_search._cuda_configs(), {"D": dim}):
            constants = {**layout, **config.kwargs}
            tile = f"d={dim} BLOCK_M={config.kwargs['BLOCK_M']} BLOCK_K={config.kwargs['BLOCK_K']} warps={config.num_warps}"
            yield screen_kernel, search_signature("fp32", flags=True), constants, config.num_warps, f"screen {tile}"
            yield (exact_search_kernel, search_signature("fp32", flags=True), {**constants, "ONLY_FLAGGED": True},
                   config.num_warps, f"exact flagged {tile}")
            # The one-pass exact search launches with flags=None, a constexpr.
            yield (exact_search_kernel, search_signature("fp32", flags=False),
                   {**constants, "flags_ptr": None, "ONLY_FLAGGED": False}, config.num_warps, f"exact all {tile}")
    config = triton_search._configs_for_dim(triton_search._cuda_configs(), {"D": 8})[0]
    for dtype in ("bf16", "fp16"):
        constants = {"D": 8, "ROW": 8, "VEC": 4, "CHUNKS": 2, **config.kwargs}
        yield screen_kernel, search_signature(dtype, flags=True), constants, config.num_warps, f"screen d=8 {dtype}"


def search_signature(dtype: str, *, flags: bool) -> dict[str, str]:
    names = ["D", "ROW", "VEC", "CHUNKS", "BLOCK_M", "BLOCK_K"]
    return {"x_ptr": f"*{dtype}", "codes_ptr": f"*{dtype}", "keys_ptr": "*i64",
            "flags_ptr": "*i8" if flags else "constexpr", "num_queries": "i32", "num_codes": "i32",
            "stride_xg": "i32", "stride_xm": "i32", "stride_xd": "i32", **{name: "constexpr" for name in names}}


def finalize_launches():
    base = {"keys_ptr": "*i64", "indices_ptr": "*i64", "dists_ptr": "*fp32", "total": "i32", "num_queries": "i32",
            "stride_ng": "i32", "stride_nk": "i32", "HAS_COUNTS": "constexpr", "BLOCK": "constexpr"}
    block = {"BLOCK": triton_search.FINALIZE_BLOCK}
    for counts in ("i32", "i64"):
        yield (finalize_kernel, {**base, "counts_ptr": f"*{counts}"}, {**block, "HAS_COUNTS": True}, 4,
               f"finalize counts {counts}")
    yield (finalize_kernel, {**base, "counts_ptr": "constexpr"}, {**block, "counts_ptr": None, "HAS_COUNTS": False}, 4,
           "finalize no counts")


LAUNCHES = [*search_launches(), *finalize_launches()]


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
    back from there while nothing of it changes (ptxas for two targets costs ~45 CPU-seconds).
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


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm_{arch}")
def test_every_kernel_configuration_compiles_for_the_gpu(arch, kernel_cache, tmp_path):
    for kernel, signature, constants, num_warps, label in LAUNCHES:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        cubin = tmp_path / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        assert f"Function {kernel.__name__}:" in usage and "REG:" in usage, f"sm_{arch} {label}: {usage}"
    assert any(kernel_cache.rglob("*.cubin")), f"no cubin in {kernel_cache}: Triton's cache is elsewhere"
