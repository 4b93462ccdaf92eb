"""On a CUDA GPU only (scripts/gpu_check.sh runs these on a lent machine; CI has none): the compiled
Triton kernels against the torch code they replace, the training step's options against the
default step, no host synchronisation inside a step, and the captured step against the eager one."""

import copy

import pytest
import torch
import torch.nn.functional as F

from revq_pipe.kernels import NonFiniteError, nearest_code
from revq_pipe.kernels.nearest_code import nearest_code_torch
from revq_pipe.kernels.quantize import quantize
from revq_pipe.kernels.triton_search import nearest_code_triton
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.train.config import TrainConfig
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.train.codebook_optim import SparseAdamW, quantize_with_gradients
from revq_pipe.pipeline.train.step_graph import WARMUP_STEPS
from revq_pipe.pipeline.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on a lent machine)")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("method", ["exact", "screen"])
@pytest.mark.parametrize("groups,queries,codes,dim", [(3, 50, 1000, 3), (8, 256, 4099, 4), (4, 128, 20000, 8)])
def test_the_compiled_search_equals_the_torch_path(method, groups, queries, codes, dim):
    gen = torch.Generator(device=CUDA).manual_seed(codes)
    x = torch.randn(groups, queries, dim, generator=gen, device=CUDA)
    codebooks = torch.randn(groups, codes, dim, generator=gen, device=CUDA)
    counts = torch.zeros(groups, codes, dtype=torch.int32, device=CUDA)
    indices, dists = nearest_code_triton(x, codebooks, counts=counts, method=method, check_finite=True)
    expected, expected_dists = nearest_code_torch(x.cpu(), codebooks.cpu())
    assert torch.equal(indices.cpu(), expected)
    torch.testing.assert_close(dists.cpu(), expected_dists, rtol=1e-6, atol=0)
    assert torch.equal(counts.sum(dim=1).cpu(), torch.full((groups,), queries))


@pytest.mark.parametrize("poisoned", ["x", "codebooks"])
def test_the_compiled_search_flags_nan_and_inf(poisoned):
    tensors = {"x": torch.randn(4, 100, 8, device=CUDA), "codebooks": torch.randn(4, 5000, 8, device=CUDA)}
    tensors[poisoned][3, -1, 7] = float("inf")
    with pytest.raises(NonFiniteError, match=f"{poisoned} contains NaN or inf"):
        nearest_code(tensors["x"], tensors["codebooks"])
    nearest_code(tensors["x"], tensors["codebooks"], check_finite=False)  # no check, no error


def test_fused_quantize_equals_the_unfused_quantizer():
    gen = torch.Generator(device=CUDA).manual_seed(0)
    tokens = torch.randn(256, 512, 4, generator=gen, device=CUDA)
    codebooks = torch.randn(512, 1024, 4, generator=gen, device=CUDA)
    result = quantize(tokens.transpose(0, 1), codebooks, shares=2)
    ids = nearest_code(tokens.transpose(0, 1), codebooks)[0]
    quantized, loss, token_grads = quantize_with_gradients(codebooks, ids.t(), tokens, shares=2)
    assert torch.equal(result.indices, ids)
    assert torch.equal(result.quantized.transpose(0, 1), quantized)
    torch.testing.assert_close(result.token_grads.transpose(0, 1), token_grads, rtol=0, atol=0)
    torch.testing.assert_close(result.loss, F.mse_loss(quantized, tokens), rtol=1e-5, atol=0)


def test_sparse_adamw_kernels_follow_the_torch_update():
    gen = torch.Generator(device=CUDA).manual_seed(1)
    start = torch.randn(64, 512, 8, generator=gen, device=CUDA)
    plain, fused = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = (SparseAdamW(plain, lr=0.01), SparseAdamW(fused, lr=0.01, fused=True))
    assert optimizers[1].kernel
    for step in range(30):
        chosen = 512 if step % 10 == 0 else 64
        ids = torch.randint(0, chosen, (128, 64), generator=gen, device=CUDA)
        grads = torch.randn(128, 64, 8, generator=gen, device=CUDA) * (1.0 if step == 5 else 1e-3)
        for optimizer in optimizers:
            optimizer.apply(ids, grads)
    for optimizer in optimizers:
        optimizer.flush()
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(optimizers[1].exp_avg, optimizers[0].exp_avg, rtol=1e-4, atol=1e-9)
    assert torch.equal(optimizers[1].last_step, optimizers[0].last_step) and optimizers[1].steps == 30


def small_run(options: tuple[str, ...]):
    """A paper-shaped model (DC-AE latents (32, 8, 8), d=8) at a small width, and its trainer."""
    torch.manual_seed(0)
    model = ReVQ(ReVQConfig(latent_shape=(32, 8, 8), tokens=256, codes=4096, dim=8, rectifier_width=128,
                            rectifier_layers=2)).to(CUDA)
    with torch.no_grad():
        model.codebooks.copy_(torch.randn_like(model.codebooks))
    train = TrainConfig(epochs=2, batch_size=64, codebook_update="sparse", step_options=options)
    return model, train


def batches(count: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=CUDA).manual_seed(2)
    return [torch.randn(64, 32, 8, 8, generator=gen, device=CUDA) for _ in range(count)]


VARIANTS = [("fused-quantize",), ("fused-adamw",), ("fused-quantize", "fused-adamw"), ("channels-last",),
            ("fused-quantize", "screen-search"), ("fused-quantize", "fused-adamw", "cuda-graph")]


@pytest.fixture(scope="module")
def trained():
    """Two epochs of 6 steps with the given step options, each run once per module (compiling the
    rectifier dominates): the codebooks, the losses, the state and the trainer."""
    data, runs = batches(6), {}

    def run(options: tuple[str, ...]):
        if options not in runs:
            model, train = small_run(options)
            trainer = Trainer(model, train)
            losses = []
            for epoch in range(2):
                trainer.set_epoch(epoch)
                losses += [trainer.step(z) for z in data]
                trainer.check(last=True)
                trainer.end_epoch(epoch)
            runs[options] = {"codebooks": model.codebooks.detach().clone(), "losses": torch.stack(losses),
                             "state": copy.deepcopy(model.state_dict()), "trainer": trainer, "steps": 2 * len(data)}
        return runs[options]

    return run


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "+".join(o))
def test_step_options_train_as_the_default_step(trained, options):
    """Codebooks within float32 rounding of the default step's (their path has no bf16), the
    rectifier's losses within bf16 noise."""
    default, variant = trained(()), trained(options)
    torch.testing.assert_close(variant["codebooks"], default["codebooks"], rtol=0, atol=1e-5)
    torch.testing.assert_close(variant["losses"], default["losses"], rtol=2e-2, atol=1e-4)


def test_the_captured_step_replays_what_the_eager_step_computes(trained):
    """The same kernels captured and replayed: codebooks as the eager step leaves them, across an
    epoch change (which captures again with the new learning rates)."""
    eager, captured = trained(("fused-quantize", "fused-adamw")), trained(("fused-quantize", "fused-adamw", "cuda-graph"))
    assert captured["trainer"].captured.graph is not None and captured["trainer"].captured.calls == captured["steps"]
    torch.testing.assert_close(captured["codebooks"], eager["codebooks"], rtol=0, atol=1e-6)
    for key, value in eager["state"].items():
        torch.testing.assert_close(captured["state"][key], value, rtol=1e-2, atol=1e-3, msg=key)


@pytest.mark.parametrize("options", [(), ("fused-quantize", "fused-adamw"),
                                     ("fused-quantize", "fused-adamw", "cuda-graph")], ids=lambda o: "+".join(o) or "default")
def test_no_step_synchronises_with_the_host(options):
    """After the warm-up (compilation, autotuning, capture), steps between two checks make no
    synchronising CUDA call: torch raises on any under set_sync_debug_mode("error")."""
    model, train = small_run(options)
    trainer = Trainer(model, train)
    trainer.set_epoch(0)
    data = batches(WARMUP_STEPS + 8)
    for z in data[:WARMUP_STEPS + 2]:
        trainer.step(z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for z in data[WARMUP_STEPS + 2:]:
            trainer.step(z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.check(last=True) is not None
