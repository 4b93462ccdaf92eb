"""The ReVQ model's parts: splitters, quantizer, reset, lazy AdamW, rectifiers, configs, save/load, loader."""

import json

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock
from safetensors.torch import load_file

from revq_pipe.pipeline.train.codebook_optim import SparseAdamW
from revq_pipe.pipeline.model.config import ReVQConfig, resolve_model_config
from revq_pipe.pipeline.train.config import TrainConfig, resolve_train_config
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.model.rectifier import RECTIFIER_KINDS, RECTIFIERS
from revq_pipe.pipeline.model.revq import GroupedQuantizer, ReVQ, TokenSplitter, usage_stats
from revq_pipe.pipeline.storage.store import write_latent_store




def hand_made_latent(c, h, w):
    return torch.arange(c * h * w, dtype=torch.float32).reshape(1, c, h, w)


def test_channel_split_cuts_the_channel_major_flattening_into_consecutive_tokens():
    z = hand_made_latent(2, 2, 4)  # values 0..15; channel 0 holds 0..7, channel 1 holds 8..15
    tokens = TokenSplitter((2, 2, 4), tokens=4, split="channel").split(z)
    assert tokens.shape == (1, 4, 4)
    assert tokens[0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # each token lies inside one channel's map: token t covers channel t // (H*W/d)
    for t in range(4):
        assert set(tokens[0, t].tolist()) <= set(z[0, t // 2].flatten().tolist())


def test_spatial_split_takes_all_channels_at_one_position():
    z = hand_made_latent(3, 2, 2)
    tokens = TokenSplitter((3, 2, 2), tokens=4, split="spatial").split(z)
    assert tokens.shape == (1, 4, 3)
    for t, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert tokens[0, t].tolist() == z[0, :, i, j].tolist()


@pytest.mark.parametrize("split", ["channel", "spatial"])
@pytest.mark.parametrize("shape,tokens", [((4, 2, 2), 8), ((4, 2, 2), 2), ((3, 4, 4), 48), ((8, 4, 4), 32)])
def test_split_then_merge_is_the_identity(split, shape, tokens):
    splitter = TokenSplitter(shape, tokens, split)
    z = torch.randn(5, *shape)
    assert torch.equal(splitter.merge(splitter.split(z)), z)


def small_model(rectifier="vit", split="channel", codes=16, shape=(8, 4, 4)):
    torch.manual_seed(0)
    model = ReVQ(resolve_model_config("tiny", shape, codes=codes, rectifier=rectifier, split=split, vae="test-vae",
                                      image_size=32))
    model.preprocessor.set_stats(torch.randn(np.prod(shape)), torch.rand(np.prod(shape)) + 0.5)
    return model.eval()


def test_tokenize_picks_the_nearest_code_of_each_position_and_forward_is_detokenize_of_tokenize():
    model = small_model()
    z = torch.randn(6, 8, 4, 4)
    ids = model.tokenize(z)
    assert ids.shape == (6, 32) and ids.dtype == torch.int64
    tokens = model.splitter.split(model.preprocessor.normalize(z))  # (B, T, d)
    dists = ((tokens[:, :, None, :] - model.codebooks[None]) ** 2).sum(-1)  # (B, T, K)
    assert torch.equal(ids, dists.argmin(-1))
    with torch.no_grad():
        assert torch.equal(model(z), model.detokenize(ids))
        expected = model.preprocessor.denormalize(model.rectifier(model.splitter.merge(
            torch.stack([model.codebooks[t, ids[:, t]] for t in range(32)], dim=1))))
        assert torch.allclose(model.detokenize(ids), expected)


def test_bad_inputs_are_user_errors():
    model = small_model()
    with pytest.raises(UserError, match="do not match"):
        model.tokenize(torch.randn(2, 8, 4, 5))
    with pytest.raises(UserError, match=r"\[0, 16\)"):
        model.detokenize(torch.full((2, 32), 16))


@pytest.mark.parametrize("rectifier", RECTIFIERS)
def test_save_pretrained_round_trips_through_config_json_and_safetensors(tmp_path, rectifier):
    model = small_model(rectifier=rectifier, split="spatial")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vae"] == "test-vae" and config["image_size"] == 32 and config["rectifier"] == rectifier
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())
    loaded = ReVQ.from_pretrained(tmp_path, device="cpu")
    assert loaded.config == model.config and not loaded.training
    z = torch.randn(4, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(z), model(z))


def test_from_pretrained_of_a_missing_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        ReVQ.from_pretrained(tmp_path)


def test_the_vit_rectifier_is_built_from_diffusers_efficientvit_blocks():
    model = small_model(rectifier="vit")
    blocks = [m for m in model.rectifier.modules() if isinstance(m, EfficientViTBlock)]
    assert len(blocks) == model.config.rectifier_layers == 2
    x = torch.randn(3, 8, 4, 4)
    assert model.rectifier(x).shape == x.shape


def test_presets_fix_d_and_k_and_t_follows_from_the_latent_shape():
    config = resolve_model_config("512T_NC=16384", (32, 8, 8))
    assert (config.tokens, config.codes, config.dim, config.rectifier_width, config.rectifier_layers) == (512, 16384, 4, 512, 3)
    config = resolve_model_config("256T_NC=262144", (32, 8, 8))
    assert (config.tokens, config.codes, config.dim) == (256, 262144, 8)
    assert resolve_model_config("tiny", (32, 8, 8), tokens=128).dim == 16
    assert resolve_train_config("256T_NC=262144").batch_size == 128
    assert ReVQConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("kwargs,message", [
    (dict(preset="tiny", latent_shape=(3, 3, 3)), "does not divide"),
    (dict(preset="tiny", latent_shape=(8, 4, 4), tokens=33), "does not divide"),
    (dict(preset="nope", latent_shape=(8, 4, 4)), "unknown preset"),
    (dict(preset="tiny", latent_shape=(8, 4, 4), split="diagonal"), "unknown split"),
    (dict(preset="tiny", latent_shape=(8, 4, 4), rectifier="gan"), "unknown rectifier"),
])
def test_impossible_model_configs_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        resolve_model_config(kwargs.pop("preset"), kwargs.pop("latent_shape"), **kwargs)


def test_train_config_decays_both_learning_rates_to_five_percent_over_the_run():
    train = TrainConfig(epochs=10)
    assert train.lr_at(0) == pytest.approx(0.01)
    assert train.lr_at(10) == pytest.approx(0.0005)
    with pytest.raises(UserError):
        TrainConfig(lr=-1.0)


def test_usage_stats_count_codes_chosen_at_least_once_and_perplexity():
    counts = torch.tensor([[5, 5, 0, 0], [1, 1, 1, 1]], dtype=torch.int32)
    stats = usage_stats(counts)
    assert stats["usage_mean_pct"] == pytest.approx(75.0)
    assert stats["usage_min_pct"] == pytest.approx(50.0)
    assert stats["perplexity"] == pytest.approx(3.0)  # (2 + 4) / 2


def test_reset_moves_only_dead_codes_onto_the_most_used_ones_and_at_most_the_ratio():
    quantizer = GroupedQuantizer(tokens=2, codes=10, dim=3)
    before = quantizer.codebooks.detach().clone()
    counts = torch.tensor([[9, 0, 0, 0, 0, 0, 0, 3, 1, 0],  # 6 dead, ratio 0.2 -> 2 move
                           [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])  # nothing dead -> nothing moves
    positions, codes = quantizer.reset_unused(counts, ratio=0.2, noise=0.1, generator=torch.Generator().manual_seed(0))
    after = quantizer.codebooks.detach()
    assert positions.tolist() == [0, 0]
    moved = set(codes.tolist())
    assert len(moved) == 2 and moved <= {1, 2, 3, 4, 5, 6, 9}
    untouched = [k for k in range(10) if k not in moved]
    assert torch.equal(after[0, untouched], before[0, untouched]) and torch.equal(after[1], before[1])
    # the most used code (0), then the second (7), each plus noise of scale 0.1
    sources = before[0, [0, 7]]
    for code in codes.tolist():
        assert min((after[0, code] - s).norm() for s in sources) < 0.6


def dense_and_sparse_codebooks(t=3, k=5, d=2):
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(t, k, d))
    sparse = torch.nn.Parameter(dense.detach().clone())
    return dense, sparse, torch.optim.AdamW([dense], lr=0.05, weight_decay=0.0), SparseAdamW(sparse, lr=0.05)


def dense_step(dense, adamw, ids, x):
    positions = torch.arange(dense.shape[0])
    torch.nn.functional.mse_loss(dense[positions, ids], x).backward()
    norm = torch.nn.utils.clip_grad_norm_([dense], 1.0)
    adamw.step()
    adamw.zero_grad()
    return norm


def sparse_step(sparse, opt, ids, x):
    with torch.no_grad():
        q = sparse[torch.arange(sparse.shape[0]), ids]
    return opt.apply(ids, (q - x) * (2.0 / x.numel()))


def test_sparse_adamw_is_dense_adamw_when_every_code_gets_gradient_every_step():
    dense, sparse, adamw, opt = dense_and_sparse_codebooks()
    for step in range(6):
        ids = torch.arange(10)[:, None].expand(10, 3) % 5  # every code of every position, with duplicates
        x = torch.randn(10, 3, 2) * (10 if step == 2 else 1)  # one step large enough to be clipped
        norm = dense_step(dense, adamw, ids, x)
        assert sparse_step(sparse, opt, ids, x).item() == pytest.approx(norm.item(), rel=1e-5)
        assert torch.allclose(sparse, dense, atol=1e-6)


def test_sparse_adamw_touches_only_chosen_codes_and_its_flush_lands_where_dense_adamw_is():
    # Gradients given directly (not from the codes' positions), so both optimizers see the same ones.
    dense, sparse, adamw, opt = dense_and_sparse_codebooks()
    generator = torch.Generator().manual_seed(1)
    positions = torch.arange(3)
    for epoch, lr in enumerate([0.05, 0.02]):
        opt.lr = adamw.param_groups[0]["lr"] = lr
        for step in range(15):
            # few codes per step: some chosen often, some rarely, code 4 never
            ids = torch.randint(0, 4 if step % 4 else 2, (2, 3), generator=generator)
            token_grads = torch.randn(2, 3, 2, generator=generator) * 0.3
            dense.grad = torch.zeros_like(dense).index_put_((positions.expand(2, 3), ids), token_grads, accumulate=True)
            torch.nn.utils.clip_grad_norm_([dense], 1.0)
            adamw.step()
            chosen = torch.zeros(3, 5, dtype=torch.bool)
            chosen[positions, ids] = True
            before, m_before = sparse.detach().clone(), opt.exp_avg.clone()
            opt.apply(ids, token_grads)
            assert torch.equal(sparse[~chosen], before[~chosen])
            assert torch.equal(opt.exp_avg[~chosen], m_before[~chosen])
        opt.flush()
        state = adamw.state[dense]
        assert torch.allclose(sparse, dense, atol=1e-6, rtol=1e-5)
        assert torch.allclose(opt.exp_avg, state["exp_avg"], atol=1e-9, rtol=1e-5)
        assert torch.allclose(opt.exp_avg_sq, state["exp_avg_sq"], atol=1e-12, rtol=1e-5)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("loader") / "store")
    latents = np.arange(50 * 2 * 2 * 2, dtype=np.float32).reshape(50, 2, 2, 2)
    write_latent_store(url, latents.astype(np.float16), chunk_size=8)
    from revq_pipe.pipeline.storage.store import LatentStore

    return LatentStore.open(url)


@pytest.mark.parametrize("resident", [True, False])
def test_loader_visits_every_latent_once_per_epoch_in_a_seeded_order(small_store, resident, monkeypatch):
    monkeypatch.setattr("revq_pipe.pipeline.train.loader.STREAM_BLOCK_BYTES", 64)  # several blocks of 2 chunks
    loader = LatentLoader(small_store, 6, torch.device("cpu"), seed=3, drop_last=False, resident=resident)
    assert loader.resident is resident and len(loader) == 9

    def ids(epoch):
        batches = list(loader.epoch(epoch))
        assert all(b.dtype == torch.float32 for b in batches) and [len(b) for b in batches] == [6] * 8 + [2]
        return (torch.cat(batches)[:, 0, 0, 0] / 8).long().tolist()

    first = ids(0)
    assert sorted(first) == list(range(50))
    assert ids(0) == first and ids(1) != first
    dropped = LatentLoader(small_store, 6, torch.device("cpu"), seed=3, resident=resident)
    assert len(dropped) == 8 and sum(len(b) for b in dropped.epoch(0)) == 48
    picks = np.array([7, 2, 40])
    assert (loader.rows(picks)[:, 0, 0, 0] / 8).long().tolist() == [7, 2, 40]


@pytest.mark.parametrize("rectifier", RECTIFIERS)
def test_the_residual_rectifier_is_exactly_the_identity_at_initialisation(rectifier):
    model = small_model(rectifier=rectifier)
    assert model.config.rectifier_form == "residual"
    x = torch.randn(3, 8, 4, 4) * 5
    with torch.no_grad():
        assert torch.equal(model.rectifier(x), x)


@pytest.mark.parametrize("rectifier", [kind for kind in RECTIFIERS if kind != "none"])
def test_the_paper_form_is_not_the_identity_and_the_form_is_recorded(tmp_path, rectifier):
    torch.manual_seed(0)
    config = resolve_model_config("tiny", (8, 4, 4), rectifier=rectifier, rectifier_form="paper")
    model = ReVQ(config).eval()
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        assert (model.rectifier(x) - x).abs().max() > 1e-2
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rectifier_form"] == "paper"
    assert ReVQ.from_pretrained(tmp_path).config.rectifier_form == "paper"


def test_the_config_takes_exactly_the_registry_s_rectifier_kinds():
    assert RECTIFIERS == tuple(RECTIFIER_KINDS) == ("vit", "cnn", "mlp", "none")
    for kind in RECTIFIERS:
        assert resolve_model_config("tiny", (8, 4, 4), rectifier=kind).rectifier == kind
    with pytest.raises(UserError, match="unknown rectifier 'gan': use one of vit, cnn, mlp, none"):
        resolve_model_config("tiny", (8, 4, 4), rectifier="gan")


def test_a_run_saved_before_rectifier_forms_existed_loads_as_the_paper_form():
    values = resolve_model_config("tiny", (8, 4, 4)).to_dict()
    del values["rectifier_form"]
    assert ReVQConfig.from_dict(values).rectifier_form == "paper"


def test_rectifier_width_and_layers_default_to_the_preset_and_can_be_set():
    config = resolve_model_config("tiny", (8, 4, 4))
    assert (config.rectifier_width, config.rectifier_layers) == (64, 2)
    config = resolve_model_config("tiny", (8, 4, 4), rectifier="cnn", rectifier_width=32, rectifier_layers=3)
    model = ReVQ(config)
    assert len(model.rectifier.blocks) == 3 and model.rectifier.conv_in.out_channels == 32
    with pytest.raises(UserError, match="unknown rectifier form"):
        resolve_model_config("tiny", (8, 4, 4), rectifier_form="skip")
