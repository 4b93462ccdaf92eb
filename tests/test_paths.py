"""Local paths vs fsspec URLs: what each name means, decided in one place."""

import os
from pathlib import Path

import pytest

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.paths import absolute_url, exists, image_path, local_path, same_location


def test_plain_paths_and_file_urls_are_local_other_urls_are_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path("stores/s.zarr") == Path("stores/s.zarr")  # as the user wrote it
    assert local_path("~/s.zarr") == Path(os.path.expanduser("~")) / "s.zarr"
    assert local_path(f"file://{tmp_path}/s.zarr") == tmp_path / "s.zarr"
    assert local_path("memory://bucket/s.zarr") is None
    assert local_path("simplecache::memory://bucket/s.zarr") is None
    with pytest.raises(UserError, match="cannot open nosuch://x"):
        local_path("nosuch://x")


def test_absolute_urls_name_one_store_one_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert absolute_url("real/s.zarr") == str(tmp_path / "real" / "s.zarr")
    assert absolute_url("link/s.zarr") == str(tmp_path / "real" / "s.zarr")
    assert absolute_url(f"file://{tmp_path}/real") == str(tmp_path / "real")
    assert absolute_url("memory://bucket/s.zarr") == "memory://bucket/s.zarr"
    assert same_location("real/s.zarr/", f"file://{tmp_path}/link/s.zarr")
    assert not same_location("real/a.zarr", "real/b.zarr")
    assert exists("real") and exists(f"file://{tmp_path}/real") and not exists("memory://revq-nothing-here")


def test_image_paths_stay_inside_their_folder(tmp_path):
    assert image_path(tmp_path, "cat/001.jpg") == tmp_path / "cat" / "001.png"
    assert image_path(tmp_path, "../../etc/passwd") == tmp_path / "etc" / "passwd.png"
    assert image_path(tmp_path, "/abs/./x.webp") == tmp_path / "abs" / "x.png"
