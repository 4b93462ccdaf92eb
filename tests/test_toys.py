"""The paper's 2-D toys, trained with fit's own Trainer step (rectifier off: quantization alone)."""

import pytest
import torch

from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.train.config import TrainConfig
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.train.trainer import Trainer




def points(n, generator):
    """2-D points whose coordinates differ in shape: x two tight modes, y one broad Gaussian (both ~unit std)."""
    x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) + 0.15 * torch.randn(n, generator=generator)
    y = torch.randn(n, generator=generator)
    return torch.stack([x, y], dim=1)


def train(model, batches, *, epochs, lr=0.01, reset=True):
    """Plain epochs of Trainer steps over the given batches (latents of the model's shape)."""
    trainer = Trainer(model, TrainConfig(epochs=epochs, batch_size=len(batches[0]), lr=lr, reset=reset))
    for epoch in range(epochs):
        trainer.set_epoch(epoch)
        for z in batches:
            trainer.step(z)
        usage = trainer.end_epoch(epoch)
    return usage


def quantization_mse(model, z):
    with torch.no_grad():
        tokens = model.splitter.split(z)
        return (model.quantizer.lookup(model.quantizer.search(tokens)) - tokens).square().mean().item()


def toy_model(shape, tokens, codes, init):
    torch.manual_seed(0)
    model = ReVQ(ReVQConfig(latent_shape=shape, tokens=tokens, codes=codes, dim=shape[0] // tokens, rectifier="none"))
    model.quantizer.init_from_tokens(model.splitter.split(init))
    return model


def test_two_tokens_per_point_with_a_codebook_each_beat_one_shared_codebook():
    generator = torch.Generator().manual_seed(0)
    train_points, test_points = points(4096, generator), points(2048, generator)
    k = 4
    # Multi-group: each coordinate is a token position with its own K codes.
    grouped = toy_model((2, 1, 1), tokens=2, codes=k, init=train_points[:k].view(k, 2, 1, 1))
    train(grouped, list(train_points.view(-1, 64, 2, 1, 1)), epochs=8)
    # Single group: both coordinates are tokens of one shared codebook of K codes.
    shared = toy_model((1, 1, 1), tokens=1, codes=k, init=train_points[:k // 2].reshape(k, 1, 1, 1))
    train(shared, list(train_points.reshape(-1, 128, 1, 1, 1)), epochs=8)

    grouped_mse = quantization_mse(grouped, test_points.view(-1, 2, 1, 1))
    shared_mse = quantization_mse(shared, test_points.reshape(-1, 1, 1, 1))
    assert grouped_mse < 0.8 * shared_mse  # measured: 0.068 vs 0.096
    # and the grouped codebook for x found both modes
    x_codes = grouped.codebooks[0, :, 0]
    assert (x_codes < 0).any() and (x_codes > 0).any()


@pytest.mark.parametrize("reset", [True, False])
def test_with_the_reset_all_codes_end_up_used(reset):
    generator = torch.Generator().manual_seed(1)
    data = points(2048, generator).view(-1, 2, 1, 1)
    # All 16 codes start in a tight bunch off to one side of the data: at first only a few are ever nearest.
    init = torch.tensor([3.0, 3.0]) + 0.05 * torch.randn(16, 2, generator=generator)
    model = toy_model((2, 1, 1), tokens=1, codes=16, init=init.view(16, 2, 1, 1))
    usage = train(model, list(data.view(-1, 64, 2, 1, 1)), epochs=12, lr=0.05, reset=reset)
    if reset:
        assert usage["usage_mean_pct"] == 100.0
    else:
        assert usage["usage_mean_pct"] < 50.0  # measured: 5 of 16 codes
