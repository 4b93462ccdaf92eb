#!/usr/bin/env bash
# Download, here, the wheels a lent GPU machine lacks for revq-pipe, into .whl/ at the repository
# root (ignored by git); the device tool carries that folder (`carry: [".whl"]`) and
# scripts/gpu_check.sh installs it there with pip --no-index.
#
# The machine (Python 3.12, torch 2.11, triton 3.6, no network) has numpy, pillow, safetensors,
# huggingface_hub, fsspec, pyyaml, typer, rich, tqdm, scikit-image, scikit-learn, matplotlib,
# pyarrow, regex, requests, filelock, zipp, toolz, cloudpickle, click, packaging and
# typing_extensions already (the device library's KINDS.md lists them). Missing, with what they need
# and the machine lacks too: diffusers (importlib_metadata, lazy-importer), zarr (donfig,
# google-crc32c), numcodecs, dask (partd, locket), webdataset and braceexpand. distributed is left
# out: only `--cluster` imports it. Versions are those of the development venv the tests pass with.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
  zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6
  dask==2026.8.0 partd==1.4.2 locket==1.0.0
  webdataset==1.0.2 braceexpand==0.1.7
)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
echo "wheels in .whl ($(du -sh .whl | cut -f1)):"
for wheel in .whl/*.whl; do
  requires=$(unzip -p "$wheel" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | cut -d' ' -f1 | tr '\n' ' ' || true)
  echo "  $(basename "$wheel"): ${requires:-no requirements}"
done
