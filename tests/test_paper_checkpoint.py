"""import-checkpoint: a checkpoint laid out as the ReVQ paper's code saves it (its module and
parameter names and shapes, built here from the same diffusers blocks) becomes a run dir whose
export-tokens and decode equal the paper's own quantize-then-decode, computed here independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock
from diffusers.models.normalization import RMSNorm
from torch import nn
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore

SHAPE, TOKENS, GROUPS, CODES, WIDTH, LAYERS = (8, 4, 4), 32, 8, 16, 32, 2  # d = 128 / 32 = 4
DIM = 4
VAE = "someone/dc-ae-small"
# The layout of the released configs (configs/512T_NC=16384.yaml), at a small size.
YAML = f"""workspace: /path/to/workspace
name: small-paper-model
log_path: ${{workspace}}/outputs/${{name}}
seed: 42
model:
  vae_path: ${{workspace}}/ckpt/dc_ae
  log_path: ${{log_path}}
  input_data_size: [{SHAPE[0]}, {SHAPE[1]}, {SHAPE[2]}]
  quantizer:
    TYPE: vq
    num_code: {CODES}
    num_group: {GROUPS}
    tokens_per_data: {TOKENS}
  decoder:
    TYPE: dc_ae
    in_channels: {SHAPE[0]}
    latent_channels: {SHAPE[0]}
    attention_head_dim: 8
    block_type: [EfficientViTBlock]
    block_out_channels: [{WIDTH}]
    layers_per_block: [{LAYERS}]
    qkv_multiscales: [[5]]
    norm_type: rms_norm
    act_fn: silu
    upsample_block_type: interpolate
train:
  num_epochs: 100
  lr: 0.01
"""


class PaperDecoder(nn.Module):
    """The released decoder's parameters under its names: conv_in, up_blocks.0.<i>, norm_out, conv_out."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(SHAPE[0], WIDTH, 3, 1, 1)
        self.up_blocks = nn.ModuleList([nn.Sequential(*[
            EfficientViTBlock(WIDTH, attention_head_dim=8, qkv_multiscales=(5,), norm_type="rms_norm")
            for _ in range(LAYERS)])])
        self.norm_out = RMSNorm(WIDTH, 1e-5, elementwise_affine=True, bias=True)
        self.conv_out = nn.Conv2d(WIDTH, SHAPE[0], 3, 1, 1)

    def forward(self, x):  # DC-AE's channel-repeat shortcut around conv_in, no global residual
        h = self.conv_in(x) + x.repeat_interleave(WIDTH // SHAPE[0], dim=1)
        h = self.up_blocks[0](h)
        h = self.norm_out(h.movedim(1, -1)).movedim(-1, 1)
        return self.conv_out(torch.relu(h))


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(0)
    decoder = PaperDecoder().eval()
    with torch.no_grad():
        for param in decoder.norm_out.parameters():  # trained-looking, not the init's ones and zeros
            param.add_(0.1 * torch.randn_like(param))
    embeddings = torch.randn(GROUPS, CODES, DIM)
    quantizer = {"index_offset": torch.arange(GROUPS) * CODES, "count": torch.ones(GROUPS, CODES),
                 "embeddings": embeddings}
    torch.save({"quantizer": quantizer, "decoder": decoder.state_dict(),
                "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 99}}, root / "ckpt.pth")
    mean, std = torch.randn(128), torch.rand(128) + 0.5
    torch.save({"mean": mean, "std": std}, root / "preprocessor.pth")
    (root / "small.yaml").write_text(YAML)
    return {"root": root, "decoder": decoder, "embeddings": embeddings, "mean": mean, "std": std}


def paper_tokens_and_reconstruction(files, z):
    """What the released code computes: normalise, view as (B * T/G, G, d), nearest code of each
    group (cdist), look up, back to (B, C, H, W), decode, un-normalise."""
    b = len(z)
    zn = (z.flatten(1) - files["mean"]) / files["std"]
    x = zn.view(-1, GROUPS, DIM).permute(1, 0, 2)  # (G, B*T/G, d)
    ids = torch.stack([torch.cdist(x[g], files["embeddings"][g]).argmin(-1) for g in range(GROUPS)])
    ids = ids.permute(1, 0).reshape(b, TOKENS)
    groups = torch.arange(TOKENS) % GROUPS
    quantized = files["embeddings"][groups, ids].reshape(b, *SHAPE)
    with torch.no_grad():
        out = files["decoder"](quantized)
    return ids, (out.flatten(1) * files["std"] + files["mean"]).view(b, *SHAPE)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_converted_checkpoint_exports_and_decodes_as_the_paper_computes(paper_files, tmp_path):
    root = paper_files["root"]
    result = cli("import-checkpoint", root / "ckpt.pth", "--config", root / "small.yaml", "--preprocessor",
                 root / "preprocessor.pth", "--out", tmp_path / "run", "--vae", VAE, "--image-size", 16)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["tokens"], config["codes"], config["dim"], config["rectifier_form"]) == (TOKENS, CODES, DIM, "paper")
    assert config["vae"] == VAE and config["rectifier_width"] == WIDTH and config["rectifier_layers"] == LAYERS

    z = torch.randn(24, *SHAPE) * paper_files["std"].view(SHAPE) + paper_files["mean"].view(SHAPE)
    store = write_latent_store(str(tmp_path / "latents.zarr"), z.numpy(), attrs={"vae": VAE, "image_size": 16},
                               chunk_size=8)
    for args in (["export-tokens", tmp_path / "run", store.url, "--out", tmp_path / "tokens.zarr"],
                 ["decode", tmp_path / "run", tmp_path / "tokens.zarr", "--out", tmp_path / "decoded.zarr"]):
        result = cli(*args, "--device", "cpu")
        assert result.exit_code == 0, result.output

    ids, reconstruction = paper_tokens_and_reconstruction(paper_files, z)
    np.testing.assert_array_equal(TokenStore.open(str(tmp_path / "tokens.zarr")).tokens[:], ids.numpy())
    decoded = LatentStore.open(str(tmp_path / "decoded.zarr")).latents[:]
    np.testing.assert_allclose(decoded, reconstruction.numpy(), rtol=1e-4, atol=1e-4)


def test_paper_checkpoint_mismatches_are_one_line_errors(paper_files, tmp_path):
    root = paper_files["root"]
    (tmp_path / "big.yaml").write_text(YAML.replace(f"num_code: {CODES}", "num_code: 64"))
    (tmp_path / "mlp.yaml").write_text(YAML.replace("TYPE: dc_ae", "TYPE: mlp"))
    torch.save({"decoder": {}}, tmp_path / "nothing.pth")
    for ckpt, config, reason in ((root / "ckpt.pth", tmp_path / "big.yaml", "do not match the config"),
                                 (root / "ckpt.pth", tmp_path / "mlp.yaml", "unsupported paper decoder mlp"),
                                 (tmp_path / "nothing.pth", root / "small.yaml", "not a ReVQ paper checkpoint")):
        result = cli("import-checkpoint", ckpt, "--config", config, "--preprocessor", root / "preprocessor.pth",
                     "--out", tmp_path / "run")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and reason in lines[0], result.output


def test_a_yaml_that_is_not_a_paper_config_names_what_it_lacks(paper_files, tmp_path):
    root = paper_files["root"]
    cases = {  # the yaml, and what the one line must say
        "train: {num_epochs: 100}\n": "it has no model (a paper config holds model.input_data_size",
        YAML.replace("  quantizer:\n", "  quantizer_old:\n"): "it has no model.quantizer ",
        YAML.replace("    num_code:", "    codes:"): "it has no model.quantizer.num_code ",
        YAML.replace(f"num_code: {CODES}", "num_code: many"): "model.quantizer.num_code is 'many'",
        YAML.replace("  input_data_size:", "  input_data_size: 7\n  old_size:"): "model.input_data_size is 7",
    }
    for number, (text, reason) in enumerate(cases.items()):
        (tmp_path / f"{number}.yaml").write_text(text)
        result = cli("import-checkpoint", root / "ckpt.pth", "--config", tmp_path / f"{number}.yaml",
                     "--preprocessor", root / "preprocessor.pth", "--out", tmp_path / "run")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and reason in lines[0], (text, result.output)
        assert "'" not in lines[0].split("paper config:")[1].split(" is ")[0]  # no `no model.'model'`
        assert not (tmp_path / "run").exists()
