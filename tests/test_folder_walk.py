"""The symlink policy of ImageFolder scans (pipeline/images/folder_walk.py): links are followed, a folder is
listed once, and links never lead out of the root unless asked."""

import os
import shutil
import threading

import pytest
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.images.sources import open_source
from revq_pipe.pipeline.storage.store import LatentStore


@pytest.fixture
def trees(photo_folder, tmp_path):
    """root/{a,b}/ with two real photos each, beside `elsewhere/` holding two more (outside root)."""
    photos = sorted(photo_folder.rglob("*.jpg"))
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    for i, name in enumerate(["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[i], root / name)
    elsewhere.mkdir()
    for i, name in enumerate(["5.jpg", "6.jpg"]):
        shutil.copy(photos[4 + i], elsewhere / name)
    return root, elsewhere


def keys(root, **options) -> list[str]:
    return [rel for rel, _ in open_source(str(root), **options).entries]


def test_links_out_of_the_root_and_back_up_are_not_followed(trees, caplog):
    """What made six images 438 rows: links to the root's parent and to the root itself."""
    root, elsewhere = trees
    os.symlink(elsewhere, root / "a" / "out")  # a folder outside
    os.symlink(elsewhere / "5.jpg", root / "b" / "linked.jpg")  # a file outside
    os.symlink(root.parent, root / "a" / "parent")  # up and out: would list the whole tmp dir
    os.symlink(root, root / "b" / "root")  # back to the root: a loop
    assert keys(root) == ["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg"]
    assert "skipped 3 link(s) leading out of the folder" in caplog.text and "`follow_links=True`" in caplog.text
    assert "skipped 1 folder(s) reached a second time" in caplog.text


def test_follow_links_lets_them_out_but_still_lists_each_folder_once(trees):
    root, elsewhere = trees
    os.symlink(elsewhere, root / "a" / "out")
    os.symlink(elsewhere, root / "b" / "same-again")
    os.symlink(elsewhere / "5.jpg", root / "b" / "linked.jpg")
    assert keys(root, follow_links=True) == ["a/1.jpg", "a/2.jpg", "a/out/5.jpg", "a/out/6.jpg",
                                             "b/3.jpg", "b/4.jpg", "b/linked.jpg"]


def test_links_inside_the_root_are_followed_once_in_name_order(trees):
    root, _ = trees
    os.symlink(root / "b", root / "a" / "also-b")  # listed under a/ first: a/ sorts before b/
    listed = keys(root)
    assert listed == ["a/1.jpg", "a/2.jpg", "a/also-b/3.jpg", "a/also-b/4.jpg"]


def test_a_symlink_loop_ends(trees):
    """F17: a loop used to make the scan walk forever with growing memory."""
    root, _ = trees
    os.symlink("..", root / "a" / "loop")
    os.symlink("../b", root / "b" / "self")
    result = []
    scan = threading.Thread(target=lambda: result.append(keys(root)), daemon=True)
    scan.start()
    scan.join(timeout=60)
    assert not scan.is_alive(), "the scan did not end"
    assert result == [["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg"]]


def test_a_class_whose_folder_leads_out_keeps_its_label(trees):
    root, elsewhere = trees
    os.symlink(elsewhere, root / "0-outside")  # sorts first: label 0, skipped
    source = open_source(str(root))
    assert source.classes == ["0-outside", "a", "b"]
    assert source.entries == [("a/1.jpg", 1), ("a/2.jpg", 1), ("b/3.jpg", 2), ("b/4.jpg", 2)]


def test_encode_follows_the_policy_and_follow_links_widens_it(trees, tiny_dc_vae_dir, tmp_path):
    root, elsewhere = trees
    os.symlink(elsewhere, root / "a" / "out")
    os.symlink(root, root / "b" / "root")
    base = ["encode", str(root), "--vae", str(tiny_dc_vae_dir), "--image-size", str(TINY_IMAGE_SIZE), "--workers", "0"]
    for out, extra, count in (("s.zarr", [], 4), ("follow.zarr", ["--follow-links"], 6)):
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / out), *extra])
        assert result.exit_code == 0, result.output
        assert len(LatentStore.open(str(tmp_path / out))) == count
