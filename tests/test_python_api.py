"""The Python API a Hugging Face / PyTorch user expects: `from revq_pipe import ReVQ`, ids that are
int64 and carry no autograd graph, and one call from images to tokens and back through the VAE
(`ReVQImageTokenizer`); the model's own module holds tensors, not images or files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from conftest import PHOTO_COUNT, TINY_IMAGE_SIZE
from revq_pipe import ReVQ, ReVQImageTokenizer
from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.stages.encode import encode
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

runner = CliRunner()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, photo_folder, tiny_dc_vae_dir):
    """Photos encoded by a tiny AutoencoderDC, a one-epoch tiny run, and its tokens and PNGs made by the CLI."""
    root = tmp_path_factory.mktemp("api")
    store, run, tokens, pngs = (str(root / name) for name in ("latents.zarr", "run", "tokens.zarr", "pngs"))
    encode(str(photo_folder), store, vae=str(tiny_dc_vae_dir), image_size=TINY_IMAGE_SIZE, device="cpu",
           dtype="float32", workers=0, progress=False)
    fit(store, run, FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=4, device="cpu"), progress=False)
    for args in (["export-tokens", run, store, "--out", tokens, "--device", "cpu"],
                 ["decode", run, tokens, "--out", pngs, "--images", "--device", "cpu"]):
        assert runner.invoke(app, args).exit_code == 0
    return {"store": store, "run": run, "tokens": tokens, "pngs": root / "pngs", "vae": str(tiny_dc_vae_dir),
            "images": photo_folder}


def test_tokenize_and_detokenize_give_int64_ids_and_no_autograd(tokenizer):
    model = ReVQ.from_pretrained(tokenizer["run"])
    assert model.codebooks.requires_grad  # a trainable model; its outputs still carry no graph
    z = torch.from_numpy(LatentStore.open(tokenizer["store"]).latents[:4])
    ids = model.tokenize(z)
    latents = model.detokenize(ids)
    assert ids.dtype == torch.int64 and not ids.requires_grad and not latents.requires_grad
    assert model(z).grad_fn is None
    # what uint16 ids would break: embedding lookups, cross-entropy targets, arithmetic
    embedding = torch.nn.Embedding(model.config.codes + 1, 3)
    assert embedding(ids + 1).shape == (4, model.config.tokens, 3)
    logits = torch.zeros(4 * model.config.tokens, model.config.codes)
    assert torch.isfinite(F.cross_entropy(logits, ids.flatten()))
    stored = torch.from_numpy(TokenStore.open(tokenizer["tokens"]).tokens[:4])
    assert stored.dtype == torch.uint16 and torch.equal(stored.long(), ids)  # compact on disk, .long() in use


def test_tokenize_images_from_paths_pil_and_tensors_matches_encode_then_export(tokenizer):
    images = ReVQImageTokenizer(ReVQ.from_pretrained(tokenizer["run"]))  # the VAE the run's training record names
    keys = [str(k) for k in TokenStore.open(tokenizer["tokens"]).keys[:]]
    paths = [tokenizer["images"] / key for key in keys]
    exported = torch.from_numpy(TokenStore.open(tokenizer["tokens"]).tokens[:]).long()

    from_paths = images.tokenize_images(paths)
    assert from_paths.dtype == torch.int64 and from_paths.shape == (PHOTO_COUNT, images.model.config.tokens)
    assert torch.equal(from_paths, exported)

    pil = [Image.open(path) for path in paths[:3]]
    assert torch.equal(images.tokenize_images(pil), exported[:3])
    as_tensor = torch.stack([torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) / 255.0
                             for image in pil])  # torchvision's ToTensor layout and range
    named_vae = ReVQImageTokenizer.from_pretrained(tokenizer["run"], vae=tokenizer["vae"])
    assert torch.equal(named_vae.tokenize_images(as_tensor), exported[:3])
    assert torch.equal(images.tokenize_images(str(paths[0])), exported[:1])


def test_a_list_may_mix_single_images_and_batches(tokenizer):
    images = ReVQImageTokenizer.from_pretrained(tokenizer["run"])
    keys = [str(k) for k in TokenStore.open(tokenizer["tokens"]).keys[:]]
    paths = [tokenizer["images"] / key for key in keys]
    exported = torch.from_numpy(TokenStore.open(tokenizer["tokens"]).tokens[:]).long()
    as_uint8 = [torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) for path in paths[:5]]
    mixed = [paths[0], Image.open(paths[1]), as_uint8[2], torch.stack(as_uint8[3:5])]  # path, PIL, (3, H, W), (2, 3, H, W)
    assert torch.equal(images.tokenize_images(mixed), exported[:5])


def test_detokenize_images_equals_decode_to_pngs(tokenizer):
    images_api = ReVQImageTokenizer.from_pretrained(tokenizer["run"])
    store = TokenStore.open(tokenizer["tokens"])
    images = images_api.detokenize_images(torch.from_numpy(store.tokens[:]).long())
    assert len(images) == PHOTO_COUNT and images[0].size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    for key, image in zip(store.keys[:], images):
        with Image.open(tokenizer["pngs"] / (str(key).rsplit(".", 1)[0] + ".png")) as png:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(png))
    array = images_api.detokenize_images(torch.from_numpy(store.tokens[:2]).long(), output_type="np")
    assert array.shape == (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3) and array.dtype == np.uint8


def test_image_api_bad_inputs_are_user_errors(tokenizer, tiny_kl_vae_dir):
    images = ReVQImageTokenizer.from_pretrained(tokenizer["run"])
    with pytest.raises(UserError, match="image not found"):
        images.tokenize_images(["nowhere.jpg"])
    with pytest.raises(UserError, match=r"\(3, H, W\)"):
        images.tokenize_images(torch.zeros(2, 5, 5))
    with pytest.raises(UserError, match="makes latents of shape"):
        ReVQImageTokenizer(images.model, vae=str(tiny_kl_vae_dir)).tokenize_images([Image.new("RGB", (40, 40))])
    with pytest.raises(UserError, match="output_type"):
        images.detokenize_images(torch.zeros(1, images.model.config.tokens, dtype=torch.int64), output_type="tensor")


def test_a_model_without_a_recorded_vae_asks_for_one(tokenizer):
    model = ReVQ.from_pretrained(tokenizer["run"])
    model.recorded_vae = None  # as a run trained on a local VAE folder, loaded from the hub, has it
    with pytest.raises(UserError, match="does not record its VAE"):
        ReVQImageTokenizer(model)


# What the model's module must not import: image and VAE code, file writers, the model card and
# the training record (they belong to the image tokenizer and to the hub mixin).
NOT_IN_THE_MODEL_MODULE = ("revq_pipe.pipeline.images", "revq_pipe.pipeline.atomic_files",
                           "revq_pipe.pipeline.model.model_card", "revq_pipe.pipeline.train.training_record")


def test_the_model_module_imports_no_image_vae_file_writing_or_model_card_code():
    import revq_pipe.pipeline.model.revq as module

    imported = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.ImportFrom):
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert "revq_pipe.pipeline.model.hub_mixin.ReVQHubMixin" in imported  # the hub half, as a base class
    assert not [name for name in imported if name.startswith(NOT_IN_THE_MODEL_MODULE)], sorted(imported)
    assert not [name for name in imported if name.split(".")[0] in ("PIL", "diffusers", "safetensors", "zarr")]
    # Nor through what it imports: no image or VAE code is loaded along with the model (diffusers
    # comes when a rectifier of its blocks is built, not with the module).
    code = ("import sys\nimport revq_pipe.pipeline.model.revq\n"
            "print([m for m in sys.modules if m.startswith(('revq_pipe.pipeline.images', 'PIL', 'diffusers'))])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
