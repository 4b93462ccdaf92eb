"""Step options on the CPU (their Triton kernels: test_step_kernels.py; on CUDA: test_cuda_step.py),
the quantize call's torch path, bench fit's variants and profiles, and the profiler summary."""

import copy

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.kernels.nearest_code import nearest_code_torch
from revq_pipe.kernels.quantize import quantize
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.reporting.profiling import profile_calls
from revq_pipe.pipeline.train.codebook_optim import quantize_with_gradients
from revq_pipe.pipeline.train.config import FitConfig, TrainConfig
from revq_pipe.pipeline.train.distributed import DataParallelGroup
from revq_pipe.pipeline.train.trainer import Trainer
from revq_pipe.pipeline.reporting.bench_options import PROJECT, parse_variants


@pytest.mark.parametrize("options,message", [
    (("fused-everything",), "unknown step option fused-everything"),
    (("cuda-graph",), "cuda-graph needs fused-adamw"),
    (("screen-search",), "add fused-quantize"),
])
def test_impossible_step_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(codebook_update="sparse", step_options=options)


def test_fused_adamw_belongs_to_the_sparse_update():
    with pytest.raises(UserError, match="`codebook_update=sparse`"):
        TrainConfig(codebook_update="dense", step_options=("fused-adamw",))
    assert TrainConfig.from_dict({"step_options": ["fused-adamw"], "codebook_update": "sparse"}).step_options == ("fused-adamw",)


def test_step_options_come_from_the_command_line_joined_by_plus():
    train = FitConfig.from_preset("tiny", device="cpu", step_options="fused-quantize+fused-adamw",
                                  codebook_update="sparse").resolve(4096, (16, 8, 8), device=torch.device("cpu")).train
    assert train.step_options == ("fused-quantize", "fused-adamw")
    result = CliRunner().invoke(app, ["fit", "--help"], terminal_width=200)
    assert "--step-options OPTION+..." in result.stdout


def test_the_quantize_call_on_the_cpu_is_the_unfused_quantizer():
    gen = torch.Generator().manual_seed(0)
    tokens, codebooks = torch.randn(9, 5, 4, generator=gen), torch.randn(5, 30, 4, generator=gen)
    counts = torch.zeros(5, 30, dtype=torch.int64)
    result = quantize(tokens.transpose(0, 1), codebooks, counts=counts, shares=2)
    ids = nearest_code_torch(tokens.transpose(0, 1), codebooks)[0]
    quantized, loss, token_grads = quantize_with_gradients(codebooks, ids.t(), tokens, shares=2)
    assert torch.equal(result.indices, ids) and torch.equal(counts.sum(dim=1), torch.full((5,), 9))
    assert torch.equal(result.quantized.transpose(0, 1), quantized)
    assert torch.equal(result.token_grads.transpose(0, 1), token_grads)
    torch.testing.assert_close(result.loss, F.mse_loss(quantized, tokens), rtol=1e-6, atol=0)


def small_model() -> ReVQ:
    torch.manual_seed(0)
    return ReVQ(ReVQConfig(latent_shape=(8, 4, 4), tokens=32, codes=24, dim=4, rectifier="vit", rectifier_width=32,
                           rectifier_layers=1))


def train_two_epochs(model: ReVQ, options: tuple[str, ...]) -> tuple[Trainer, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 8, 4, 4, generator=gen) for _ in range(3)]
    trainer = Trainer(model, TrainConfig(epochs=2, batch_size=16, codebook_update="sparse", step_options=options))
    losses = []
    for epoch in range(2):
        trainer.set_epoch(epoch)
        losses += [trainer.step(z) for z in batches]
        trainer.end_epoch(epoch)
    return trainer, torch.stack(losses)


def test_step_options_on_the_cpu_train_as_the_default_step():
    """fused-quantize runs its torch path, channels-last the rectifier in that memory layout;
    fused-adamw and cuda-graph have nothing to run on a plain CPU and leave the step as it is."""
    start = small_model()
    default_model = copy.deepcopy(start)
    _, default_losses = train_two_epochs(default_model, ())
    for options in (("fused-quantize",), ("channels-last",), ("fused-adamw", "cuda-graph")):
        model = copy.deepcopy(start)
        trainer, losses = train_two_epochs(model, options)
        for key, value in default_model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6, msg=f"{options}: {key}")
        torch.testing.assert_close(losses, default_losses, rtol=1e-6, atol=1e-7)
        assert trainer.captured is None and not trainer.codebook_opt.kernel


def test_one_process_options_refuse_data_parallel_training():
    with pytest.raises(UserError, match="fused-quantize run on one process only"):
        Trainer(small_model(), TrainConfig(step_options=("fused-quantize",)), DataParallelGroup(rank=0, world_size=2))


def test_variants_start_with_the_default_step_and_refuse_unknown_options():
    assert parse_variants("fused-adamw,default") == [(PROJECT, ()), (f"{PROJECT}: fused-adamw", ("fused-adamw",))]
    assert parse_variants("fused-quantize+fused-adamw+cuda-graph")[1][1] == ("fused-quantize", "fused-adamw", "cuda-graph")
    for bad in ("fused-adamw+warp-drive", "", "default,+"):
        with pytest.raises(UserError, match="`variants`"):
            parse_variants(bad)


def test_bench_fit_times_variants_and_writes_profiles(tmp_path):
    done = CliRunner().invoke(app, ["bench", "fit", "--preset", "tiny", "--device", "cpu", "--steps", "1",
                                    "--batch-size", "2", "--variants", "fused-quantize+fused-adamw",
                                    "--profile", str(tmp_path), "--profile-steps", "1"])
    assert done.exit_code == 0, done.output
    assert f"{PROJECT}: fused-quantize+fused-adamw" in done.stdout and done.stdout.count("-> agree") == 2
    summaries = sorted(path.name for path in tmp_path.glob("*.txt"))
    assert summaries == ["tiny-reference_style.txt", "tiny-this_project.txt",
                         "tiny-this_project_fused-quantize+fused-adamw.txt"]
    assert (tmp_path / "tiny-this_project.json.gz").stat().st_size > 0
    assert "operators by self CPU time" in (tmp_path / "tiny-this_project.txt").read_text()


def test_profile_counts_read_backs_per_call_and_ranks_operators():
    a = torch.randn(64, 64)

    def step():
        product = a @ a
        product.sum().item()
        return bool(product[0, 0] > 0)

    profiled = profile_calls(step, 3, torch.device("cpu"))
    assert profiled.calls == 3 and profiled.read_backs == 6  # .item() and bool(): two per call
    assert "aten::mm" in [name for name, _, _ in profiled.top]
    assert profiled.launches == 0 and profiled.peak_gib is None
    report = profiled.report("a matmul")
    assert "2.00 read-backs" in report and "aten::mm" in report
