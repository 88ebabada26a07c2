"""Where a command writes: refused in one line, before any work, when the place cannot take it.

A destination whose folder is missing, or whose path runs through a file, would otherwise fail after the
work is done, with the operating system's words ("[Errno 20] Not a directory").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def _blocking_file(folder: Path) -> Optional[Path]:
    """The file standing where ``folder`` or one of the folders above it should be, if one does."""
    for place in (folder, *folder.parents):
        if place.exists():
            return None if place.is_dir() else place
    return None


def check_file_destination(path: Path, shown: Optional[str] = None) -> None:
    """Refuse writing file ``path`` (named as ``shown``) when its folder is missing, runs through a file, or
    does not take writes, or when ``path`` is a folder."""
    shown = shown or str(path)
    folder = path.parent
    blocker = _blocking_file(folder)
    if blocker is not None:
        raise ValueError(f"cannot write {shown}: {blocker} is a file, not a folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {shown}: the folder {folder} does not exist (create it first)")
    if path.is_dir():
        raise ValueError(f"cannot write {shown}: it is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {shown}: the folder {folder} does not take writes (permission denied)")


def check_folder_destination(folder: Path, flag: str) -> None:
    """Refuse a folder to be made for a command's output (``flag``, e.g. --out) when a file stands in its path.
    (A disk that refuses the writes is the writer's to explain: a training run then names its intact checkpoint.)"""
    blocker = _blocking_file(folder)
    if blocker is not None:
        what = "is a file, not a folder" if blocker == folder else f"lies under {blocker}, a file, not a folder"
        raise ValueError(f"{flag} {folder} {what}: give a folder")
