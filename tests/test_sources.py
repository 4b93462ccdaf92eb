"""Image sources: ImageFolder scanning, webdataset shards, blocks, preprocessing."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import PHOTO_CLASSES, PHOTO_COUNT, PHOTO_SHARD_SIZE
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.sample_images import load_photo
from revq_pipe.pipeline.images.sources import (
    BlockDataset,
    Cursor,
    ImageFolderSource,
    WebDatasetSource,
    decode_image,
    open_source,
    preprocess,
    resize_center_crop,
    to_model_input,
    to_rgb,
)


def blocks_of(source, size: int = 32, block_size: int = 4, cursor: Cursor = Cursor()):
    return list(BlockDataset(source.units(cursor, block_size), size, block_size))


def test_image_folder_labels_follow_sorted_class_folders(photo_folder):
    source = open_source(str(photo_folder))
    assert isinstance(source, ImageFolderSource)
    assert source.classes == sorted(PHOTO_CLASSES)
    assert len(source) == PHOTO_COUNT
    for rel, label in source.entries:
        assert PHOTO_CLASSES[label] == rel.split("/")[0]
    assert [rel for rel, _ in source.entries] == sorted(rel for rel, _ in source.entries)


def test_flat_folder_gives_unknown_labels(flat_photo_folder):
    source = open_source(str(flat_photo_folder))
    assert {label for _, label in source.entries} == {-1}
    assert len(source) == PHOTO_COUNT


def test_folder_scan_is_recursive_case_insensitive_and_skips_hidden(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}
    for rel in ("b/deep/x.JPG", "b/y.PnG", "a/z.webp", "a/w.bmp", "a/.hidden.jpg", ".cache/q.jpg", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("not an image")
        else:
            image.save(tmp_path / rel, format=formats[rel.rsplit(".", 1)[1].lower()])
    source = open_source(str(tmp_path))
    assert source.entries == [("a/w.bmp", 0), ("a/z.webp", 0), ("b/y.PnG", 1), ("b/deep/x.JPG", 1)]


@pytest.mark.parametrize("layout, message", [
    ({}, "is empty"),
    ({"notes.txt": b"hello", "more/readme.md": b"x"}, "no images in"),
    ({"top.jpg": None, "cls/a.jpg": None}, "top level"),
])
def test_bad_folders_are_user_errors(tmp_path, layout, message):
    for rel, data in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            Image.new("RGB", (4, 4)).save(tmp_path / rel)
        else:
            (tmp_path / rel).write_bytes(data)
    with pytest.raises(UserError, match=message):
        open_source(str(tmp_path))


def test_missing_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="source not found"):
        open_source(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="shard not found"):
        open_source(str(tmp_path / "train-{000000..000003}.tar"))
    (tmp_path / "file.csv").write_text("a,b")
    with pytest.raises(UserError, match="is a file"):
        open_source(str(tmp_path / "file.csv"))


def test_webdataset_blocks_cover_each_shard_in_order(photo_shards):
    source = open_source(photo_shards)
    assert isinstance(source, WebDatasetSource)
    n_shards = -(-PHOTO_COUNT // PHOTO_SHARD_SIZE)
    assert len(source.urls) == n_shards
    blocks = blocks_of(source, block_size=2)
    for part in range(n_shards):
        mine = [b for b in blocks if b.part == part]
        assert [b.start for b in mine] == list(range(0, 2 * len(mine), 2))
        assert [b.last for b in mine] == [False] * (len(mine) - 1) + [True]
        expected = min(PHOTO_SHARD_SIZE, PHOTO_COUNT - part * PHOTO_SHARD_SIZE)
        assert sum(b.size for b in mine) == expected
    keys = [k for b in blocks for k in b.keys]
    labels = [label for b in blocks for label in b.labels]
    assert keys == sorted(keys)
    assert [PHOTO_CLASSES[label] for label in labels] == [k.split("/")[0] for k in keys]


def test_webdataset_resume_starts_at_the_cursor_block(photo_shards):
    source = open_source(photo_shards)
    blocks = blocks_of(source, block_size=2, cursor=Cursor(part=1, index=3))
    assert (blocks[0].part, blocks[0].start) == (1, 2)  # the block holding the cursor, re-read whole
    assert all(b.part >= 1 for b in blocks)


def test_webdataset_samples_without_image_are_skipped_and_without_label_get_minus_1(tmp_path):
    """(A label member that holds no label stops the run instead: test_hostile_inputs.py.)"""
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), "blue").save(jpeg, format="JPEG")
    with wds.TarWriter(str(tmp_path / "odd.tar")) as sink:
        sink.write({"__key__": "good", "jpg": jpeg.getvalue(), "cls": "7"})
        sink.write({"__key__": "textonly", "txt": "no picture here"})
        sink.write({"__key__": "nolabel", "png": _png_bytes()})
    (block,) = blocks_of(open_source(str(tmp_path / "odd.tar")), size=8, block_size=8)
    assert block.keys == ["good", "nolabel"] and block.labels == [7, -1]
    assert [(i, k) for i, k, _ in block.skipped] == [(1, "textonly")]
    assert "no image member" in block.skipped[0][2]


def test_unreadable_shard_is_reported_as_an_error_block(tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar archive" * 40)
    blocks = blocks_of(open_source(str(tmp_path / "broken.tar")))
    assert blocks[-1].error and "broken.tar" in blocks[-1].error


def test_resize_center_crop_matches_torchvision_rules():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 100, 3), dtype=np.uint8))
    out = resize_center_crop(image, 20)
    # Resize(20): 40x100 -> 20x50 (bilinear); CenterCrop(20): left = round((50-20)/2) = 15.
    expected = image.resize((50, 20), Image.Resampling.BILINEAR).crop((15, 0, 35, 20))
    assert out.size == (20, 20)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    # Already at size on the short side: no resampling, only the crop (offset round(3/2) = 2).
    small = Image.fromarray(np.arange(23 * 20 * 3, dtype=np.uint8).reshape(23, 20, 3))
    assert np.array_equal(np.asarray(resize_center_crop(small, 20)), np.asarray(small)[2:22])


def test_colour_modes_become_rgb():
    photo = load_photo("astronaut").resize((24, 24))
    gray = photo.convert("L")
    rgb = to_rgb(gray)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 0], np.asarray(gray))
    assert to_rgb(photo.convert("CMYK")).mode == "RGB"
    assert to_rgb(photo.convert("P")).mode == "RGB"
    rgba = photo.convert("RGBA")
    assert np.array_equal(np.asarray(to_rgb(rgba)), np.asarray(photo))
    palette = photo.convert("P")
    palette.info["transparency"] = 0
    assert to_rgb(palette).mode == "RGB"
    deep = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert np.array_equal(np.asarray(to_rgb(deep))[..., 0], np.asarray(gray))  # scaled, not clipped


def test_preprocess_and_model_input_scale(tmp_path):
    photo = load_photo("chelsea")
    x = preprocess(photo, 32)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    y = to_model_input(x[None])
    assert y.dtype == torch.float32 and -1.0 <= y.min() and y.max() <= 1.0
    assert torch.equal(y, x[None].float() / 255 * 2 - 1)


def test_truncated_image_fails_to_decode(tmp_path):
    path = tmp_path / "cut.jpg"
    load_photo("coffee").save(path, quality=90)
    data = path.read_bytes()
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2], 32)
    assert decode_image(data, 32).shape == (3, 32, 32)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (12, 12), (0, 255, 0, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folder_blocks_partition_the_files(photo_folder):
    source = open_source(str(photo_folder))
    blocks = blocks_of(source, block_size=5)
    assert [b.start for b in blocks] == [0, 5, 10]
    assert [b.last for b in blocks] == [False, False, True]
    assert [k for b in blocks for k in b.keys] == [rel for rel, _ in source.entries]
    assert Path(photo_folder, blocks[0].keys[0]).is_file()


def test_fsspec_urls_are_read_through_fsspec(photo_shards):
    import fsspec

    local = open_source(photo_shards)
    memory = fsspec.filesystem("memory")
    for i, path in enumerate(local.urls):
        memory.pipe(f"/revq-test/shard-{i}.tar", Path(path).read_bytes())
    remote = open_source(f"memory://revq-test/shard-{{0..{len(local.urls) - 1}}}.tar")
    assert isinstance(remote, WebDatasetSource) and len(remote.urls) == len(local.urls)
    assert [k for b in blocks_of(remote) for k in b.keys] == [k for b in blocks_of(local) for k in b.keys]
    file_url = open_source("file://" + local.urls[0])
    assert file_url.urls == local.urls[:1]
