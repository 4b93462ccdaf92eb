"""A refused command answers before torch, zarr, dask or diffusers load (pipeline/preflight.py):
every command, for each kind of refusal - a missing input, a bad preset or option value, an
impossible combination of options, an output that conflicts - in a fresh interpreter, checked
by the modules it has imported, not by a clock."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.stages.fit import fit

HEAVY = ("torch", "zarr", "dask", "diffusers")
# Runs each command line of argv[1] (JSON) with the CLI in this one interpreter, in order, and prints
# per command its exit status, its stderr and the heavy modules imported by then.
CHILD = f"""
import contextlib, io, json, sys
from revq_pipe.cli import app
results = []
for args in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            app(args)
            code = 0
        except SystemExit as exit:
            code = exit.code
    results.append([code, stderr.getvalue(), [m for m in {HEAVY!r} if m in sys.modules]])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory, photo_folder):
    """A latent store, a run fitted on it and its token store; a folder of someone's notes, a file."""
    root = tmp_path_factory.mktemp("preflight")
    latents = np.random.default_rng(0).normal(size=(32, 16, 4, 4)).astype(np.float32)
    store = write_latent_store(str(root / "latents.zarr"), latents).url
    np.save(root / "latents.npy", latents)
    fit(store, str(root / "run"), FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=16, device="cpu"),
        progress=False)
    export_tokens(str(root / "run"), store, str(root / "tokens.zarr"), device="cpu", progress=False)
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("mine")
    (root / "a-file").write_text("not a folder")
    return {"tmp": str(root), "store": store, "run": str(root / "run"), "tokens": str(root / "tokens.zarr"),
            "notes": str(root / "notes"), "file": str(root / "a-file"), "npy": str(root / "latents.npy"),
            "photos": str(photo_folder)}


# (command line, what its one error line says), by command and kind of refusal
REFUSALS = [
    # encode
    ("encode {tmp}/trian --out {tmp}/s.zarr", "source not found: {tmp}/trian"),
    ("encode {photos} --out {tmp}/s.zarr --vae {tmp}/no-vae", "VAE directory not found"),
    ("encode {photos} --out {tmp}/s.zarr --dtype float64", "--dtype must be one of float16, float32"),
    ("encode {photos} --out {tmp}/s.zarr --decode-on gpu", "--decode-on must be one of workers, device, not 'gpu'"),
    ("encode {photos} --out {tmp}/s.zarr --device tpu", "unknown device 'tpu'"),
    ("encode {photos} --out {tmp}/s.zarr --cluster local:0", "--cluster local:0: a local cluster needs at least one"),
    ("encode {photos} --out {photos}/s.zarr", "is inside SOURCE"),
    ("encode {photos} --out {notes}", "--out {notes} exists and is not a Zarr store"),
    # import-latents
    ("import-latents {tmp}/missing.npy --out {tmp}/i.zarr", "latent file not found"),
    ("import-latents {file} --out {tmp}/i.zarr", "unknown latent file type"),
    ("import-latents {npy} --out {tmp}/i.zarr --dtype int8", "--dtype must be one of float16, float32, not 'int8'"),
    ("import-latents {npy} --out {store}", "{store} already exists: pass --overwrite to replace it"),
    # stats
    ("stats {tmp}/missing.zarr", "no Zarr store at {tmp}/missing.zarr"),
    # fit
    ("fit {store} --out {tmp}/r --preset nope", "unknown preset 'nope'"),
    ("fit {tmp}/missing.zarr --out {tmp}/r", "no Zarr store at {tmp}/missing.zarr"),
    ("fit {store} --out {tmp}/r --val {tmp}/missing.zarr", "no Zarr store at {tmp}/missing.zarr"),
    ("fit {store} --out {tmp}/r --device gpu", "unknown device 'gpu'"),
    ("fit {store} --out {run} --resume --overwrite", "--resume continues the run in --out, --overwrite starts it over"),
    ("fit {store} --out {run}", "{run} already holds a run: pass --resume to continue it"),
    ("fit {store} --out {file}", "--out {file} is a file, not a run directory"),
    # export-tokens
    ("export-tokens {tmp}/no-run {store} --out {tmp}/t.zarr", "run directory not found"),
    ("export-tokens {run} {tmp}/missing.zarr --out {tmp}/t.zarr", "no Zarr store at"),
    ("export-tokens {run} {store} --out {tmp}/t.zarr --format csv", "unknown --format csv"),
    ("export-tokens {run} {store} --out {tmp}/t.zarr --device tpu", "unknown device 'tpu'"),
    ("export-tokens {run} {store} --out {tmp}/t --format wds --cluster local:1", "--cluster writes a token store"),
    ("export-tokens {run} {store} --out {store}", "--out must not be the latent store itself"),
    ("export-tokens {run} {store} --out {notes}", "--out {notes} exists and is not a Zarr store"),
    ("export-tokens {run} {store} --out {file} --format wds", "{file} exists and is not a folder"),
    # decode
    ("decode {run} {tmp}/missing.zarr --out {tmp}/d.zarr", "no Zarr store at"),
    ("decode {run} {tokens} --out memory://decoded --images", "decoded images are written to a local folder"),
    ("decode {run} {tokens} --out {tokens}", "--out must not be the token store itself"),
    # eval
    ("eval {run} {store} --latent-only --images {photos}", "--latent-only skips the image metrics"),
    ("eval {run} {store} --images {tmp}/missing", "source not found"),
    ("eval {tmp}/no-run {store}", "run directory not found"),
    # import-checkpoint
    ("import-checkpoint {tmp}/ckpt.pth --config {file} --preprocessor {file} --out {tmp}/p", "file not found"),
    ("import-checkpoint {file} --config {file} --preprocessor {file} --out {notes}", "already exists and is not empty"),
    # demo
    ("demo --out {notes}", "is not empty and was not made by `revq-pipe demo`"),
    ("demo --out {file}", "is a file, not a folder"),
    # the bench commands
    ("bench search --shape 8,64,nope,8", "--shape must be one of"),
    ("bench encode --device tpu", "unknown device 'tpu'"),
    ("bench fit --preset nope", "unknown preset 'nope'"),
    ("bench fit --preset tiny --variants fused-nothing", "--variants takes default or step options"),
    ("bench quality {tmp}/missing.zarr {store}", "no Zarr store at"),
    ("bench quality {store} {store} --variants vit,nope", "unknown variant 'nope'"),
    ("bench quality {store} {store} --images {photos}", "PSNR needs both --images"),
    ("bench quality {store} {store} --out {notes}", "was not made by `revq-pipe bench quality`"),
]


def test_every_refused_command_answers_before_the_heavy_imports(made):
    command_lines = [line.format(**made).split() for line, _ in REFUSALS]
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(command_lines)], capture_output=True, text=True,
                           check=True)
    results = json.loads(child.stdout)
    for (line, said), (code, stderr, heavy) in zip(REFUSALS, results):
        command = line.format(**made)
        assert code == 2, (command, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and said.format(**made) in lines[0], (command, stderr)
        assert heavy == [], f"`revq-pipe {command}` imported {heavy} before refusing"


def test_the_stages_refuse_the_same_for_python_callers(made):
    """A Python caller meets each check first too, in the stage's own terms (parameters, not flags)."""
    with pytest.raises(UserError, match="`resume=True` continues the run in `out`"):
        fit(made["store"], made["run"], FitConfig.from_preset("tiny"), resume=True, overwrite=True)
    with pytest.raises(UserError, match="`cluster` writes a token store"):
        export_tokens(made["run"], made["store"], made["tmp"] + "/t", format="wds", cluster="local:1")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        export_tokens(made["run"], made["store"], made["tmp"] + "/t.zarr", device="gpu")


def test_diffusers_is_imported_only_where_a_vae_or_its_blocks_are_built():
    code = """
import importlib, sys
for stage in ("encode", "import_latents", "fit", "export_tokens", "decode", "evaluate", "import_checkpoint", "demo",
              "bench.search", "bench.encode", "bench.fit", "bench.quality", "bench.cluster"):
    importlib.import_module("revq_pipe.stages." + stage)
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.model.revq import ReVQ
seen = []
for rectifier in ("none", "mlp", "vit"):
    ReVQ(ReVQConfig(latent_shape=(16, 4, 4), tokens=64, codes=8, dim=4, rectifier=rectifier))
    seen.append("diffusers" in sys.modules)
print(seen)
"""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "[False, False, True]"  # the ViT rectifier is built from diffusers' blocks
