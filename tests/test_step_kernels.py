"""The training step's Triton kernels (fused quantize, sparse AdamW, the search's NaN/inf flags),
run through Triton's interpreter in a child process, against the torch code they replace; and the
step they make, which must read nothing back from the device between the trainer's checks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from revq_pipe.kernels.nearest_code import nearest_code_torch
from revq_pipe.pipeline.train.codebook_optim import quantize_with_gradients

RUNNER = Path(__file__).with_name("step_kernels_runner.py")

pytestmark = pytest.mark.slow  # one child process runs every kernel through Triton's interpreter


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    results = tmp_path_factory.mktemp("step-kernels") / "results.pt"
    done = subprocess.run([sys.executable, str(RUNNER), str(results)], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(results)


def test_sparse_adamw_kernels_follow_the_torch_update_step_by_step(interpreted):
    """Same rows, moments and last steps after every step (momentum tails, clipping, a changed rate)
    and after flush; float32 rounding apart (the kernels take beta powers in float64)."""
    for run in interpreted["sparse_adamw"]:
        assert run["kernel"]
        for step in run["steps"]:
            torch_norm, kernel_norm = step["norms"]
            assert kernel_norm == pytest.approx(torch_norm, rel=1e-6)
            _assert_states_close(*step["states"])
        _assert_states_close(*run["flushed"])
        assert run["step_counts"] == [12, 12]


def _assert_states_close(torch_state: dict, kernel_state: dict) -> None:
    assert torch.equal(kernel_state["last_step"], torch_state["last_step"])
    torch.testing.assert_close(kernel_state["codebooks"], torch_state["codebooks"], rtol=0, atol=2e-6)
    torch.testing.assert_close(kernel_state["exp_avg"], torch_state["exp_avg"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(kernel_state["exp_avg_sq"], torch_state["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_fused_quantize_gives_the_unfused_codes_gradients_loss_and_counts(interpreted):
    for run in interpreted["quantize"]:
        tokens, codebooks = run["tokens"], run["codebooks"]
        ids = nearest_code_torch(tokens.transpose(0, 1), codebooks)[0]
        quantized, loss, token_grads = quantize_with_gradients(codebooks, ids.t(), tokens, shares=run["shares"])
        assert torch.equal(run["indices"], ids)
        assert torch.equal(run["quantized"].transpose(0, 1), quantized)
        assert run["quantized"].transpose(0, 1).is_contiguous()  # the (B, T, d) layout the rectifier reads
        assert torch.equal(run["token_grads"].transpose(0, 1), token_grads)
        torch.testing.assert_close(run["loss"], F.mse_loss(quantized, tokens), rtol=1e-6, atol=0)
        added = run["counts"] - run["counts_before"]
        assert torch.equal(added.long(), torch.stack([torch.bincount(row, minlength=codebooks.shape[1]) for row in ids]))


@pytest.mark.parametrize("method", ["exact", "screen"])
def test_the_kernels_flag_nan_and_inf_naming_the_input(interpreted, method):
    errors = {(run["poisoned"], str(run["value"]), run["check"]): run["error"] for run in interpreted["finite"]
              if run["method"] == method}
    assert errors[("x", "nan", True)] == "x contains NaN or inf"
    assert errors[("codebooks", "inf", True)] == errors[("codebooks", "-inf", True)] == "codebooks contains NaN or inf"
    assert errors[("both", "nan", True)] == "x contains NaN or inf"  # x first, as the CPU check says it
    assert errors[("none", "0.0", True)] is None and errors[("x", "nan", False)] is None
    # Finite codes whose sums overflow are only suspect: the exact check clears them.
    assert errors[("codebooks", "3e+38", True)] is None


def test_step_options_train_as_the_default_step(interpreted):
    runs = interpreted["trainer"]
    default = runs.pop("default")
    for name, run in runs.items():
        for key, value in default["state"].items():
            torch.testing.assert_close(run["state"][key], value, rtol=0, atol=1e-5, msg=f"{name}: {key}")
        torch.testing.assert_close(run["losses"], default["losses"], rtol=1e-5, atol=1e-7)


def test_no_step_reads_the_device_back_in_the_projects_code(interpreted):
    """With the checks every 25 steps (CUDA's setting), a step runs no operator that waits for the
    device from revq-pipe's code; the only ones left are torch's own AdamW's on the CPU, which keeps
    its step count on the host there (on CUDA it is fused and keeps it on the device).
    (`.tolist()` of a CPU tensor runs no operator, so this check cannot see it.)"""
    for name, run in interpreted["trainer"].items():
        ours = [call for call in run["syncs"] if not call["torch_optim"]]
        assert not ours, f"{name}: {ours[:3]}"
