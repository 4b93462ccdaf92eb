"""Run the training step's Triton kernels under Triton's interpreter (a child process of
test_step_kernels.py, started with TRITON_INTERPRET=1) beside the torch code they replace.

Usage: python step_kernels_runner.py RESULTS_OUT
RESULTS_OUT receives a dict of scenarios, each holding what the kernels and the torch path computed
on the same inputs; the test process compares them.
"""

import copy
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that read a device value back to the host: on CUDA each one waits for the GPU.
SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.unique",
               "aten._unique2", "aten.masked_select")


def sparse_adamw_runs() -> list[dict]:
    """SparseAdamW unfused and with its kernels on the same codebooks and gradients: duplicates,
    codes left unchosen longer than the window, clipping at some steps; then flush."""
    from revq_pipe.pipeline.train.codebook_optim import SparseAdamW

    runs = []
    for dim in (5, 8):
        gen = torch.Generator().manual_seed(dim)
        tokens, codes, batch = 3, 40, 6
        start = torch.randn(tokens, codes, dim, generator=gen)
        plain, fused = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        optimizers = (SparseAdamW(plain, lr=0.05, window=4), SparseAdamW(fused, lr=0.05, window=4, fused=True))
        steps = []
        for step in range(12):
            chosen = codes if step % 4 == 0 else 5  # most steps choose among the first 5 codes only
            ids = torch.randint(0, chosen, (batch, tokens), generator=gen)
            grads = torch.randn(batch, tokens, dim, generator=gen) * (3.0 if step in (2, 7) else 0.05)
            if step == 6:
                optimizers[0].lr = optimizers[1].lr = 0.02  # a new epoch's rate
            norms = [float(opt.apply(ids, grads)) for opt in optimizers]
            steps.append({"norms": norms, "states": [_state(opt) for opt in optimizers]})
        for opt in optimizers:
            opt.flush()
        runs.append({"kernel": optimizers[1].kernel, "steps": steps,
                     "flushed": [_state(opt) for opt in optimizers], "step_counts": [opt.steps for opt in optimizers]})
    return runs


def _state(optimizer) -> dict:
    return {"codebooks": optimizer.codebooks.detach().clone(), "exp_avg": optimizer.exp_avg.clone(),
            "exp_avg_sq": optimizer.exp_avg_sq.clone(), "last_step": optimizer.last_step.clone()}


def quantize_runs() -> list[dict]:
    """kernels.quantize on (B, T, d) tokens seen as (T, B, d), with counts, at d = 3 (padded rows),
    4 and 8, and one global batch of 3 shares."""
    from revq_pipe.kernels.quantize import quantize

    runs = []
    for batch, tokens, codes, dim, shares in ((6, 3, 50, 3, 1), (20, 2, 70, 8, 1), (5, 4, 33, 4, 3)):
        gen = torch.Generator().manual_seed(codes)
        x = torch.randn(batch, tokens, dim, generator=gen)
        codebooks = torch.randn(tokens, codes, dim, generator=gen)
        counts = torch.randint(0, 3, (tokens, codes), generator=gen, dtype=torch.int32)
        before = counts.clone()
        result = quantize(x.transpose(0, 1), codebooks, counts=counts, shares=shares)
        runs.append({"tokens": x, "codebooks": codebooks, "shares": shares, "counts_before": before,
                     "counts": counts, **result._asdict()})
    return runs


def finite_check_runs() -> list[dict]:
    """NaN or inf that the search kernels flag as they read (both methods), and finite numbers
    whose sums overflow (flagged as suspect, cleared by the exact check)."""
    from revq_pipe.kernels import NonFiniteError
    from revq_pipe.kernels.triton_search import nearest_code_triton

    runs = []
    for method in ("exact", "screen"):
        for name, value, check in (("x", float("nan"), True), ("codebooks", float("inf"), True),
                                   ("codebooks", float("-inf"), True), ("both", float("nan"), True),
                                   ("none", 0.0, True), ("x", float("nan"), False), ("codebooks", 3e38, True)):
            gen = torch.Generator().manual_seed(len(runs))
            x, codebooks = torch.randn(2, 20, 4, generator=gen), torch.randn(2, 70, 4, generator=gen)
            if name in ("x", "both"):
                x[1, 17, 2] = value
            if name in ("codebooks", "both"):
                codebooks[1, 65, 2:] = value  # two numbers of one code: their sum overflows at 3e38
            try:
                nearest_code_triton(x, codebooks, method=method, check_finite=check)
                error = None
            except NonFiniteError as err:
                error = str(err)
            runs.append({"method": method, "poisoned": name, "value": value, "check": check, "error": error})
    return runs


class SyncSpy(TorchDispatchMode):
    """Records each syncing operator with the innermost revq_pipe and torch.optim frames above it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.split(".default")[0] in SYNCING_OPS or any(name.startswith(op + ".") for op in SYNCING_OPS):
            frames = traceback.extract_stack()
            ours = [f"{f.filename.split('revq_pipe/')[-1]}:{f.lineno} {f.name}" for f in frames if "revq_pipe" in f.filename]
            self.calls.append({"op": name, "revq_pipe": ours[-1] if ours else None,
                               "torch_optim": any("/torch/optim/" in f.filename for f in frames)})
        return func(*args, **(kwargs or {}))


def trainer_runs() -> dict:
    """A small model trained for two epochs of two steps by the default step and by the kernels' step options;
    and the syncing operators each step's code runs (as CUDA would run it: sync_every 25)."""
    from revq_pipe.pipeline.model.config import ReVQConfig
    from revq_pipe.pipeline.train.config import TrainConfig
    from revq_pipe.pipeline.model.revq import ReVQ
    from revq_pipe.pipeline.train.trainer import Trainer

    torch.manual_seed(0)
    start = ReVQ(ReVQConfig(latent_shape=(2, 4, 4), tokens=8, codes=24, dim=4, rectifier="vit",
                            rectifier_width=32, rectifier_layers=1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start.codebooks.copy_(torch.randn(start.codebooks.shape, generator=gen))
    batches = [torch.randn(16, 2, 4, 4, generator=gen) for _ in range(2)]
    results = {}
    for options in ((), ("fused-quantize",), ("fused-adamw",), ("fused-quantize", "fused-adamw"),
                    ("fused-quantize", "screen-search")):
        model = copy.deepcopy(start)
        trainer = Trainer(model, TrainConfig(epochs=2, batch_size=16, codebook_update="sparse", step_options=options),
                          sync_every=25)
        spy, losses = SyncSpy(), []
        for epoch in range(2):
            trainer.set_epoch(epoch)
            for z in batches:
                with spy:
                    losses.append(trainer.step(z))
            trainer.check(last=True)
            trainer.end_epoch(epoch)
        results["+".join(options) or "default"] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                                                   "losses": torch.stack(losses), "syncs": spy.calls}
    return results


def main(results_path: str) -> None:
    from revq_pipe.kernels.jit import INTERPRETED

    if not INTERPRETED:
        raise SystemExit("triton was not imported under TRITON_INTERPRET=1")
    torch.save({"sparse_adamw": sparse_adamw_runs(), "quantize": quantize_runs(), "finite": finite_check_runs(),
                "trainer": trainer_runs()}, results_path)


if __name__ == "__main__":
    main(sys.argv[1])
