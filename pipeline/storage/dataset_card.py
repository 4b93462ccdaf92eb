"""The dataset card (README.md) that `export-tokens` writes beside every token export: inside a
token store's folder, and in the folder of webdataset or parquet shards.

Rendered with huggingface_hub's `DatasetCard.from_template`, so its YAML header is the metadata the
hub and `datasets` read (for shards, `configs` naming the files, so `load_dataset(FOLDER)` finds
them); the body says what the ids are (the tokenizer's weights hash, preset, T, K, d; the VAE and
image size; the class names), how a row maps to its image, and how to load the export in three
lines. It holds no local path, so a folder can be published as it is. The text depends only on what
an export must match to be resumed, so a resumed export rewrites it identically; it is written
under a temp name and renamed (a kill leaves the old card or the new one).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from revq_pipe.pipeline.atomic_files import write_atomically
from revq_pipe.pipeline.paths import filesystem, local_path
from revq_pipe.pipeline.storage.store import CARD_NAME

FOLDER = "path/to/this/folder"  # the loading examples' stand-in for wherever the export lies
TAGS = ["revq", "image-tokens", "vector-quantization"]
UNKNOWN = "not recorded"

# Per kind of export: what its files hold, and how to load it in three lines.
LAYOUTS = {
    "zarr": "A Zarr v3 group: `tokens` (N, T) {dtype}, `labels` (N,) int64 and `keys` (N,) strings, row for row "
            "in the latent store's order; its `revq` attributes name the tokenizer's weights, preset, T, K and d.",
    "wds": "Webdataset shards `tokens-NNNNNN.tar`, one sample per image: `tokens.npy` (T,) {dtype}, `cls` (the "
           "label) and `key.txt` (the key). `__key__` is the key percent-escaped, so that it names tar members "
           "(`urllib.parse.unquote(__key__)` gives the key back).",
    "parquet": "Parquet files `tokens-NNNNNN.parquet`, one row per image: `key`, `label`, `class` (the label's "
               "name) and `tokens` (a list of T {dtype} ids).",
}
LOADERS = {
    "zarr": f"""import zarr
group = zarr.open_group("{FOLDER}", mode="r")
ids, labels, keys = group["tokens"][:], group["labels"][:], group["keys"][:]  # ids: (N, T)""",
    "wds": f"""import glob, webdataset as wds
dataset = wds.WebDataset(sorted(glob.glob("{FOLDER}/tokens-*.tar")), shardshuffle=False).decode()
key, ids, label = next(iter(dataset.to_tuple("key.txt", "tokens.npy", "cls")))  # ids: (T,)""",
    "parquet": f"""from datasets import load_dataset
dataset = load_dataset("{FOLDER}", split="train").with_format("torch")  # or the dataset's hub id
ids, keys = dataset[:256]["tokens"].long(), dataset[:256]["key"]  # ids: (256, T) int64""",
}
# Shard files `datasets` reads, by kind (a token store is not one of its formats).
DATA_FILES = {"wds": "tokens-*.tar", "parquet": "tokens-*.parquet"}
DATASETS_NOTE = {
    "zarr": "",
    "wds": f'`datasets.load_dataset("{FOLDER}")` reads the shards too (columns `key.txt`, `tokens.npy`, `cls`).',
    "parquet": "",
}

TEMPLATE = """---
{{ card_data }}
---

# ReVQ token ids of {{ count }} images

Every image of a latent store as {{ tokens }} token ids, each one of the {{ codes }} codes of its
token position, made by `revq-pipe export-tokens` with the ReVQ tokenizer described below. That
tokenizer turns ids back into VAE latents, and through the VAE into images (`revq-pipe decode RUN
TOKENS`, or `ReVQ.from_pretrained(RUN).detokenize(ids)` in Python).

| | |
|---|---|
| tokenizer weights (sha256 of `model.safetensors`) | `{{ run }}` |
| preset | `{{ preset }}` |
| tokens per image T | {{ tokens }} |
| codes per position K | {{ codes }} |
| code dim d | {{ dim }} |
| latent shape (C, H, W) | {{ latent_shape }} |
| VAE | {{ vae }} |
| image size | {{ image_size }} |
| images | {{ count }} |
{% if files %}| files | {{ files }} |
{% endif %}
## Rows

{{ layout }}

A row's key is its image's key in the latent store the ids were made from: the image's path inside
the folder given to `revq-pipe encode` (`cat/001.jpg`), or its sample key in the webdataset shards
encoded (`cat/001`). The Zarr, webdataset and parquet exports of that store all hold it exactly, so
they join on it.

## Classes

{{ classes }}

## Load

```python
{{ loader }}
```
{% if datasets_note %}
{{ datasets_note }}
{% endif %}"""


def dataset_card(kind: str, attrs: dict[str, Any], *, count: int, dtype: str, image_size: int | None,
                 files: str | None = None) -> str:
    """The card of a `kind` export ("zarr", "wds" or "parquet") of `count` rows of `dtype` ids, made by
    the run that the token attrs `attrs` describe; `files` says how its shards are cut (shards only)."""
    card_data = DatasetCardData(pretty_name=f"ReVQ tokens, {attrs['tokens']} per image, {attrs['codes']} codes",
                                size_categories=[size_category(count)], tags=list(TAGS))
    if kind in DATA_FILES:
        card_data.configs = [{"config_name": "default",
                              "data_files": [{"split": "train", "path": DATA_FILES[kind]}]}]
    card = DatasetCard.from_template(
        card_data, template_str=TEMPLATE, count=count, run=attrs["run"], preset=attrs["preset"],
        tokens=attrs["tokens"], codes=attrs["codes"], dim=attrs["dim"], latent_shape=tuple(attrs["latent_shape"]),
        vae=f"`{attrs['vae']}`" if attrs.get("vae") else UNKNOWN,
        image_size=f"{image_size} px" if image_size else UNKNOWN, files=files,
        layout=LAYOUTS[kind].format(dtype=dtype), classes=describe_classes(attrs.get("classes", [])),
        loader=LOADERS[kind], datasets_note=DATASETS_NOTE[kind])
    return str(card)


def describe_classes(classes: list[str]) -> str:
    if not classes:
        return "The latent store names no classes: labels are the numbers it holds (-1 where unknown)."
    names = ", ".join(f"{index} `{name}`" for index, name in enumerate(classes))
    return f"Label i is class i of the latent store's {len(classes)} (for an image folder, its sorted class folders): {names}."


def size_category(count: int) -> str:
    """The hub's size category of a dataset of `count` rows (n<1K, 1K<n<10K, ..., n>1T)."""
    bounds = [(10**3, "1K"), (10**4, "10K"), (10**5, "100K"), (10**6, "1M"), (10**7, "10M"), (10**8, "100M"),
              (10**9, "1B"), (10**10, "10B"), (10**11, "100B"), (10**12, "1T")]
    if count < bounds[0][0]:
        return "n<1K"
    for (low, low_name), (high, high_name) in zip(bounds, bounds[1:]):
        if count < high:
            return f"{low_name}<n<{high_name}"
    return "n>1T"


def write_card(folder: str, text: str) -> None:
    """`text` as the card of the export in `folder` (a local folder, atomically, or an fsspec URL)."""
    path = local_path(folder)
    if path is None:  # an object store's put is whole or nothing already
        fs, root = filesystem(folder)
        fs.pipe_file(f"{root.rstrip('/')}/{CARD_NAME}", text.encode())
    else:
        write_atomically(path / CARD_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"), suffix=".partial")
