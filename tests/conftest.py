"""Shared fixtures: everything here runs on a CPU-only machine."""

import os

# Tests never reach a model hub: anything that would download must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
