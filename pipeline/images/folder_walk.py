"""Listing an ImageFolder tree, with a policy for symbolic links.

Links are followed, within two limits:
- a folder is listed once: one reached again (a link loop, or two links to one folder) is
  skipped, recognised by device and inode, so a loop cannot make the listing endless;
- a link whose target lies outside the root is skipped unless the caller allows it
  (`encode --follow-links`): a link to `/` or `..` must not pull in a whole disk.
Folders are visited in sorted name order, so which of two paths to one folder is kept never
depends on the order the file system lists them in. Names that are not UTF-8 cannot become a
store's keys (Zarr and JSON hold text): such files and folders are skipped. An entry whose type
cannot be read (a loop of links between files) is listed as a file, which then fails to decode and
is skipped and counted like any unreadable image. What was skipped is logged once per scan.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class FolderWalk:
    """One scan of the tree under `root` (a resolved path)."""

    root: Path
    follow_outside: bool = False
    visited: set[tuple[int, int]] = field(default_factory=set)
    outside: list[tuple[str, str]] = field(default_factory=list)  # (link relative to root, its target)
    repeated: list[str] = field(default_factory=list)  # folders reached again, relative to root
    not_utf8: list[str] = field(default_factory=list)  # names that are not UTF-8, relative to root, escaped

    def __post_init__(self) -> None:
        self.visited.add(_identity(self.root))

    def names(self, folder: Path) -> tuple[list[str], list[str]]:
        """(sub-folder names, other names) directly in `folder`, sorted, hidden ones left out;
        links to files outside the root are left out unless allowed."""
        folders, others = [], []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not _is_utf8(entry.name):
                self.not_utf8.append(_shown(Path(entry.path).relative_to(self.root)))
                continue
            if _is_folder(entry):
                folders.append(entry.name)
            elif self._allowed(Path(entry.path)):
                others.append(entry.name)  # files, and broken links (they fail to decode, as skipped)
        return folders, others

    def tree(self, top: Path) -> list[tuple[Path, list[str]]]:
        """(folder, its non-folder names) for `top` and every folder under it the policy lets in."""
        listing = []
        pending = [top]
        while pending:
            folder = pending.pop()
            if not self._allowed(folder) or not self._first_visit(folder):
                continue
            folders, others = self.names(folder)
            listing.append((folder, others))
            pending += [folder / name for name in reversed(folders)]  # depth first, in name order
        return listing

    def report(self) -> None:
        if self.outside:
            link, target = self.outside[0]
            log.warning(f"{self.root}: skipped {len(self.outside)} link(s) leading out of the folder (e.g. {link} -> "
                        f"{target}); pass `follow_links=True` to include what they point to")
        if self.repeated:
            log.warning(f"{self.root}: skipped {len(self.repeated)} folder(s) reached a second time through links "
                        f"(e.g. {self.repeated[0]}): a link loop or two links to one folder")
        if self.not_utf8:
            log.warning(f"{self.root}: skipped {len(self.not_utf8)} file(s) or folder(s) whose names are not UTF-8 "
                        f"(e.g. {self.not_utf8[0]}): rename them to include them")

    def _allowed(self, path: Path) -> bool:
        """Whether a path may be read: anything not a link, and links that stay in the root or
        may leave it."""
        if self.follow_outside or not path.is_symlink():
            return True
        target = Path(os.path.realpath(path))
        if target.is_relative_to(self.root):
            return True
        self.outside.append((path.relative_to(self.root).as_posix(), str(target)))
        return False

    def _first_visit(self, folder: Path) -> bool:
        identity = _identity(folder)
        if identity in self.visited and folder != self.root:
            self.repeated.append(folder.relative_to(self.root).as_posix())
            return False
        self.visited.add(identity)
        return True


def _is_utf8(name: str) -> bool:
    """Whether a name read from the file system is UTF-8 (Python keeps other bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: Path) -> str:
    """A path whose bytes are not all UTF-8, printable: those bytes as \\x escapes."""
    return os.fsencode(path.as_posix()).decode("utf-8", "backslashreplace")


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder (through links); one whose type cannot be read is not."""
    try:
        return entry.is_dir()
    except OSError:  # e.g. ELOOP: links that point at each other
        return False


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()  # follows links: the folder itself
    return stat.st_dev, stat.st_ino
