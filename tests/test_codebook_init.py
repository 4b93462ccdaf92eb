"""Codebook initialisation: k-means per position agrees with scikit-learn's Lloyd, and fit uses it."""

import logging
import re

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from revq_pipe.pipeline.train.codebook_init import kmeans_plan, lloyd_, sample_rows
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit


def test_lloyd_per_position_lands_where_scikit_learns_lloyd_does_from_the_same_start():
    rng = np.random.default_rng(0)
    positions, samples, codes, dim = 3, 400, 6, 2
    centres = rng.normal(scale=4, size=(positions, codes, dim))
    x = centres[:, rng.integers(0, codes, samples)] + rng.normal(size=(positions, samples, dim))
    x = x.astype(np.float32)
    start = x[:, :codes].copy()  # distinct samples, as the random init takes them
    codebooks = torch.from_numpy(start.copy())
    history = lloyd_(codebooks, torch.from_numpy(x), iterations=30)
    for t in range(positions):
        reference = KMeans(codes, init=start[t].astype(np.float64), n_init=1, max_iter=30, algorithm="lloyd",
                           tol=0).fit(x[t].astype(np.float64))
        ours = codebooks[t].numpy()
        # the same centroids (k-means keeps no order of its own: both start from the same codes)
        np.testing.assert_allclose(ours, reference.cluster_centers_, atol=1e-4)
    assert history[-1] < history[0] and all(b <= a + 1e-6 for a, b in zip(history, history[1:]))


def test_a_code_no_sample_chooses_stays_where_it_is():
    x = torch.tensor([[[0.0], [0.1], [0.2]]])  # one position, three samples near 0
    codebooks = torch.tensor([[[0.0], [10.0]]])  # code 1 is nobody's nearest
    lloyd_(codebooks, x, iterations=2)
    assert codebooks[0, 1, 0].item() == 10.0 and codebooks[0, 0, 0].item() == pytest.approx(0.1)


def test_k_means_keeps_within_its_budget_of_searches_cutting_iterations_first():
    # (sample, iterations): (iterations + 1) x sample searches, at most budget x n
    assert kmeans_plan(n=2048, codes=128, iterations=10, budget=4) == (2048, 3)  # the demo's store
    assert kmeans_plan(n=6000, codes=1024, iterations=10, budget=4) == (6000, 3)  # issue 19's 6,000 latents
    assert kmeans_plan(n=2048, codes=128, iterations=10, budget=11) == (2048, 10)
    assert kmeans_plan(n=10**7, codes=8, iterations=10, budget=4) == (8 * 16, 10)  # 16 per code are enough
    assert kmeans_plan(n=10**8, codes=1 << 14, iterations=10, budget=4) == (1 << 16, 10)  # 64k latents at most
    assert kmeans_plan(n=1000, codes=8, iterations=10, budget=1) == (128, 6)
    assert kmeans_plan(n=1000, codes=64, iterations=10, budget=1) == (500, 1)  # the sample gives way last
    assert kmeans_plan(n=100, codes=64, iterations=10, budget=1) == (50, 1)  # no more than K: skipped
    np.testing.assert_array_equal(sample_rows(1000, 200, seed=3)[:8], sample_rows(1000, 8, seed=3))


def test_fit_with_kmeans_init_starts_closer_to_the_data_than_the_random_init(tmp_path, caplog):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, 8, 4, 4))
    latents = (centres[rng.integers(0, 16, 512)] + 0.3 * rng.normal(size=(512, 8, 4, 4))).astype(np.float32)
    store = str(tmp_path / "store")
    write_latent_store(store, latents, chunk_size=128)
    first_losses = {}
    caplog.set_level(logging.INFO, logger="revq_pipe")
    for init in ("random", "kmeans"):
        config = FitConfig.from_preset("tiny", epochs=1, batch_size=64, codes=8, device="cpu", codebook_init=init,
                                       rectifier="none")
        result = fit(store, str(tmp_path / init), config)
        assert result.train_config.codebook_init == init
        first_losses[init] = result.history[0]["codebook_loss"]
    assert first_losses["kmeans"] < first_losses["random"]
    # 16 latents for each of the 8 codes, 10 iterations and a last search: 1,408 searched, within 4 x 512
    line = next(message for message in caplog.messages if "k-means init" in message)
    assert "k-means init: 10 iterations on 128 latents (16.0 per code; 1,408 searched, budget 4 x 512)" in line
    before, after = (float(v) for v in re.search(r"quantizer MSE on them (\S+) -> (\S+),", line).groups())
    assert after < before


def test_k_means_that_its_budget_leaves_nothing_to_refine_is_skipped_saying_why(tmp_path, caplog):
    latents = np.random.default_rng(0).normal(size=(512, 8, 4, 4)).astype(np.float32)
    store = write_latent_store(str(tmp_path / "store"), latents).url
    caplog.set_level(logging.INFO, logger="revq_pipe")
    config = FitConfig.from_preset("tiny", epochs=1, codes=64, device="cpu", rectifier="none", kmeans_budget=0.2)
    result = fit(store, str(tmp_path / "run"), config)
    assert result.train_config.codebook_init == "kmeans"
    assert ("k-means init skipped: one iteration within the searches of its budget 0.2 x 512 latents leaves a "
            "sample of 51, no more than the 64 codes") in caplog.text
