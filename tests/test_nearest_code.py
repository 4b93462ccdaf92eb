"""nearest_code against fp32 brute force: shapes, ties, magnitudes, dtypes, strides, counts, errors,
and the Triton kernels (through Triton's interpreter, in a child process) against the torch path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revq_pipe.kernels import NonFiniteError, nearest_code
from revq_pipe.kernels.nearest_code import implementation_for, nearest_code_screened_torch, nearest_code_torch

RUNNER = Path(__file__).with_name("interpreter_runner.py")


def brute_force(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: every squared distance in fp32 at once, first minimum per query."""
    diff = x.float()[:, :, None, :] - codebooks.float()[:, None, :, :]
    sq_dists, indices = (diff * diff).sum(-1).min(dim=-1)
    return indices, sq_dists


def per_group_bincount(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    return torch.stack([torch.bincount(row, minlength=num_codes) for row in indices])


def assert_matches_brute_force(x, codebooks, indices, sq_dists):
    ref_indices, ref_dists = brute_force(x, codebooks)
    assert indices.dtype == torch.int64 and sq_dists.dtype == torch.float32
    assert indices.shape == ref_indices.shape and sq_dists.shape == ref_dists.shape
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(sq_dists, ref_dists, rtol=1e-5, atol=0.0)


@pytest.fixture
def small_torch_blocks(monkeypatch):
    """Shrink the torch path's block bound so small inputs cross group, query and code blocks."""
    import sys as _sys

    module = _sys.modules["revq_pipe.kernels.nearest_code"]
    monkeypatch.setattr(module, "MAX_BLOCK_PAIRS", 96)
    monkeypatch.setattr(module, "CODE_BLOCK", 16)


@pytest.mark.parametrize("dim", [1, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("groups,queries,codes", [(1, 1, 1), (1, 1, 37), (3, 50, 1000), (2, 20, 4099)])
def test_matches_brute_force(dim, groups, queries, codes):
    gen = torch.Generator().manual_seed(dim * 1000 + codes)
    x = torch.randn(groups, queries, dim, generator=gen)
    codebooks = torch.randn(groups, codes, dim, generator=gen)
    assert_matches_brute_force(x, codebooks, *nearest_code(x, codebooks))


def test_blocked_path_crosses_every_block_boundary(small_torch_blocks):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 13, 4, generator=gen)
    codebooks = torch.randn(5, 53, 4, generator=gen)
    counts = torch.zeros(5, 53, dtype=torch.int64)
    indices, sq_dists = nearest_code(x, codebooks, counts=counts)
    assert_matches_brute_force(x, codebooks, indices, sq_dists)
    assert torch.equal(counts, per_group_bincount(indices, 53))


def test_duplicate_codes_resolve_to_lowest_index(small_torch_blocks):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 10, 4, generator=gen)
    # Codes 0..9 appear again at 10..19, 20..29 and 30..39, across code blocks of 16.
    codebooks = base.repeat(1, 4, 1)
    x = torch.cat([base[:, :5], torch.randn(2, 7, 4, generator=gen)], dim=1)
    indices, sq_dists = nearest_code(x, codebooks)
    assert (indices < 10).all()
    assert torch.equal(indices[:, :5], torch.arange(5).expand(2, 5))
    assert (sq_dists[:, :5] == 0).all()
    assert_matches_brute_force(x, codebooks, indices, sq_dists)


def test_all_equal_codebook_gives_code_zero(small_torch_blocks):
    codebooks = torch.full((3, 40, 8), 0.25)
    x = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(3))
    indices, sq_dists = nearest_code(x, codebooks)
    assert (indices == 0).all()
    assert_matches_brute_force(x, codebooks, indices, sq_dists)


@pytest.mark.parametrize("scale,offset", [(1e15, 0.0), (1e-15, 0.0), (1e-3, 1e3)])
def test_extreme_magnitudes(scale, offset):
    """Huge, tiny, and far-from-origin data (where |x|^2 - 2x.c + |c|^2 would cancel)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 40, 8, generator=gen) * scale + offset
    codebooks = torch.randn(2, 500, 8, generator=gen) * scale + offset
    assert_matches_brute_force(x, codebooks, *nearest_code(x, codebooks))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_compared_in_fp32(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 8, generator=gen).to(dtype)
    codebooks = torch.randn(2, 300, 8, generator=gen).to(dtype)
    indices, sq_dists = nearest_code(x, codebooks)
    assert_matches_brute_force(x, codebooks, indices, sq_dists)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 2, 20, generator=gen).permute(1, 0, 2)[:, ::2, ::2]  # (2, 5, 10)
    codebooks = torch.randn(2, 10, 200, generator=gen).transpose(1, 2)  # (2, 200, 10)
    assert not x.is_contiguous() and not codebooks.is_contiguous()
    counts = torch.zeros(200, 2, dtype=torch.int32).t()
    indices, sq_dists = nearest_code(x, codebooks, counts=counts)
    assert_matches_brute_force(x, codebooks, indices, sq_dists)
    assert torch.equal(counts.long(), per_group_bincount(indices, 200))


@pytest.mark.parametrize("count_dtype", [torch.int32, torch.int64])
def test_counts_accumulate_a_per_group_bincount(count_dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 200, 4, generator=gen)
    codebooks = torch.randn(3, 16, 4, generator=gen)
    counts = torch.randint(0, 5, (3, 16), generator=gen, dtype=count_dtype)
    before = counts.clone()
    indices, _ = nearest_code(x, codebooks, counts=counts)
    assert counts.dtype == count_dtype
    assert torch.equal((counts - before).long(), per_group_bincount(indices, 16))


def test_empty_query_sets():
    codebooks = torch.randn(2, 5, 3)
    indices, sq_dists = nearest_code(torch.empty(2, 0, 3), codebooks)
    assert indices.shape == (2, 0) and sq_dists.shape == (2, 0)


@pytest.mark.parametrize(
    "make_inputs,message",
    [
        (lambda: (torch.randn(2, 3, 4).index_put_((torch.tensor(1),), torch.tensor(float("nan"))), torch.randn(2, 5, 4)), "x contains NaN or inf"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 4).index_put_((torch.tensor(0),), torch.tensor(float("inf")))), "codebooks contains NaN or inf"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(3, 5, 4)), "same G and d"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 3)), "same G and d"),
        (lambda: (torch.randn(3, 4), torch.randn(2, 5, 4)), "x must have 3 dimensions"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 0, 4)), "at least one code"),
        (lambda: (torch.randn(2, 3, 4).double(), torch.randn(2, 5, 4)), "x must be float32"),
    ],
)
def test_bad_inputs_raise_value_error(make_inputs, message):
    x, codebooks = make_inputs()
    with pytest.raises(ValueError, match=message):
        nearest_code(x, codebooks)


def test_bad_counts_raise_value_error():
    x, codebooks = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="counts must be int32 or int64"):
        nearest_code(x, codebooks, counts=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"counts must have shape \(G, K\)"):
        nearest_code(x, codebooks, counts=torch.zeros(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("poisoned,value", [("x", float("nan")), ("codebooks", float("inf")), ("codebooks", float("-inf"))])
def test_non_finite_inputs_raise_their_own_error_type(poisoned, value):
    """A caller can catch NaN/inf by type (a training stop), apart from wrong shapes (a bug)."""
    tensors = {"x": torch.randn(2, 3, 4), "codebooks": torch.randn(2, 5, 4)}
    tensors[poisoned][1, 2, 3] = value
    with pytest.raises(NonFiniteError) as caught:
        nearest_code(tensors["x"], tensors["codebooks"])
    assert str(caught.value) == f"{poisoned} contains NaN or inf"
    assert isinstance(caught.value, ValueError)  # callers catching ValueError still catch it


def test_invalid_shapes_are_not_reported_as_non_finite():
    with pytest.raises(ValueError) as caught:
        nearest_code(torch.full((2, 3, 4), float("nan")), torch.randn(3, 5, 4))
    assert not isinstance(caught.value, NonFiniteError)
    assert "same G and d" in str(caught.value)


@pytest.mark.parametrize("offset,duplicates", [(0.0, False), (0.0, True), (300.0, False)])
def test_screened_cpu_path_equals_the_direct_path_bit_for_bit(small_torch_blocks, offset, duplicates):
    """The matmul screen settles most queries and sends the rest (duplicate codes, cancellation far
    from the origin) back to the direct search: indices and distances are the direct path's."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 37, 8, generator=gen) + offset
    codebooks = torch.randn(4, 70, 8, generator=gen) + offset
    if duplicates:
        codebooks[:, 40] = codebooks[:, 9]
        x[:, :5] = codebooks[:, 9:10]
    screened = nearest_code_screened_torch(x, codebooks)
    direct = nearest_code_torch(x, codebooks)
    assert torch.equal(screened[0], direct[0]) and torch.equal(screened[1], direct[1])


def test_screen_is_skipped_when_matmuls_may_run_in_reduced_precision(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    x, codebooks = torch.randn(2, 9, 4, generator=gen), torch.randn(2, 33, 4, generator=gen)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    monkeypatch.setattr(torch, "baddbmm", None)  # the screen's product must not run at all
    indices, sq_dists = nearest_code(x, codebooks)
    assert_matches_brute_force(x, codebooks, indices, sq_dists)


def test_cpu_runs_the_torch_path_unless_interpreting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert implementation_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert implementation_for(torch.zeros(1)) == "triton"


# --- the Triton kernels through the interpreter --------------------------------------------


def _interpreter_cases() -> list[dict]:
    """Small cases (the interpreter is slow) that cross query blocks (16), code blocks (32) and
    K splits (target_programs above the grid), with ties, strides, low precision and counts."""
    gen = torch.Generator().manual_seed(8)

    def case(x, codebooks, counts=None, target_programs=1):
        return {"x": x, "codebooks": codebooks, "counts": counts, "target_programs": target_programs}

    duplicated = torch.randn(2, 20, 4, generator=gen).repeat(1, 4, 1)
    return [
        case(torch.randn(1, 1, 1, generator=gen), torch.randn(1, 1, 1, generator=gen)),
        case(torch.randn(2, 5, 3, generator=gen), torch.randn(2, 37, 3, generator=gen)),
        case(torch.randn(2, 17, 4, generator=gen), torch.randn(2, 260, 4, generator=gen), target_programs=100),
        case(torch.randn(1, 20, 8, generator=gen), torch.randn(1, 260, 8, generator=gen),
             counts=torch.zeros(1, 260, dtype=torch.int32), target_programs=50),
        case(torch.randn(1, 3, 64, generator=gen), torch.randn(1, 40, 64, generator=gen)),
        case(torch.randn(1, 6, 16, generator=gen), torch.randn(1, 90, 16, generator=gen)),
        case(torch.randn(2, 5, 12, generator=gen), torch.randn(2, 40, 12, generator=gen)),
        case(torch.randn(1, 5, 6, generator=gen), torch.randn(1, 45, 6, generator=gen)),
        case(torch.randn(16, 2, 12, generator=gen).permute(1, 0, 2)[:, ::2, ::2].to(torch.bfloat16),
             torch.randn(2, 6, 130, generator=gen).transpose(1, 2).to(torch.float16)),
        case(torch.cat([duplicated[:, :6], torch.randn(2, 6, 4, generator=gen)], dim=1), duplicated,
             counts=torch.randint(0, 3, (2, 80), generator=gen), target_programs=8),
        case(torch.randn(2, 7, 8, generator=gen), torch.full((2, 100, 8), -0.5), target_programs=6),
        # The fp32 expanded score ranks these two codes the wrong way round (found by search);
        # each is its slot's best, so the screen's exact re-scoring must choose code 1.
        case(torch.tensor([[[106.32305908203125]]]), torch.tensor([[[106.32154846191406], [106.32207489013672]]])),
        # Far from the origin the screen's expanded score cannot tell codes apart: every query is
        # flagged and only the exact re-run gets it right.
        case(torch.randn(1, 11, 8, generator=gen) * 1e-3 + 1e3, torch.randn(1, 150, 8, generator=gen) * 1e-3 + 1e3),
    ]


@pytest.fixture(scope="module")
def interpreted_runs(tmp_path_factory):
    """Run every interpreter case in one child process started with TRITON_INTERPRET=1."""
    pytest.importorskip("triton",
                        reason="triton is not installed: pip install -e '.[test]' brings it where triton has wheels (Linux)")
    cases = _interpreter_cases()
    folder = tmp_path_factory.mktemp("interpreter")
    cases_path, results_path = folder / "cases.pt", folder / "results.pt"
    torch.save(cases, cases_path)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(cases_path), str(results_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return cases, torch.load(results_path)


@pytest.mark.slow  # a child process runs the kernels through Triton's interpreter
@pytest.mark.parametrize("method", ["screen", "exact"])
@pytest.mark.parametrize("case_index", range(len(_interpreter_cases())))
def test_triton_kernel_matches_torch_path_and_brute_force(interpreted_runs, case_index, method):
    cases, results = interpreted_runs
    case, result = cases[case_index], results[case_index][method]
    x, codebooks = case["x"], case["codebooks"]
    torch_indices, torch_dists = nearest_code_torch(x, codebooks)
    assert torch.equal(result["indices"], torch_indices)
    torch.testing.assert_close(result["sq_dists"], torch_dists, rtol=1e-6, atol=0.0)
    assert_matches_brute_force(x, codebooks, result["indices"], result["sq_dists"])
    if case["counts"] is not None:
        added = result["counts"].long() - case["counts"].long()
        assert torch.equal(added, per_group_bincount(result["indices"], codebooks.shape[1]))


@pytest.mark.slow  # a child process runs the kernels through Triton's interpreter
@pytest.mark.parametrize("case_index", range(len(_interpreter_cases())))
def test_public_api_runs_the_kernel_when_interpreting(interpreted_runs, case_index):
    """With TRITON_INTERPRET=1 the public API itself runs the kernel on CPU tensors."""
    cases, results = interpreted_runs
    assert results[case_index]["implementation"] == "triton"
    torch_indices, _ = nearest_code_torch(cases[case_index]["x"], cases[case_index]["codebooks"])
    assert torch.equal(results[case_index]["public_indices"], torch_indices)


def test_finite_check_can_be_turned_off_for_training_loops():
    x, codebooks = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        nearest_code(x, codebooks)
    indices, _ = nearest_code(x, codebooks, check_finite=False)  # no sync, no error: the caller checks losses
    assert indices.shape == (2, 4)
