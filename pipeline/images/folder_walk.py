"""Listing an ImageFolder tree, with a policy for symbolic links.

Links are followed, within two limits:
- a folder is listed once: one reached again (a link loop, or two links to one folder) is
  skipped, recognised by device and inode, so a loop cannot make the listing endless;
- a link whose target lies outside the root is skipped unless the caller allows it
  (`encode --follow-links`): a link to `/` or `..` must not pull in a whole disk.
Folders are visited in sorted name order, so which of two paths to one folder is kept never
depends on the order the file system lists them in. What was skipped is logged once per scan.
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

    def __post_init__(self) -> None:
        self.visited.add(_identity(self.root))

    def names(self, folder: Path) -> tuple[list[str], list[str]]:
        """(sub-folder names, other names) directly in `folder`, sorted, hidden ones left out;
        links to files outside the root are left out unless allowed."""
        folders, others = [], []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
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
                        f"{target}); pass --follow-links to include what they point to")
        if self.repeated:
            log.warning(f"{self.root}: skipped {len(self.repeated)} folder(s) reached a second time through links "
                        f"(e.g. {self.repeated[0]}): a link loop or two links to one folder")

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


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()  # follows links: the folder itself
    return stat.st_dev, stat.st_ino
