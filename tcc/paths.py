"""Paths the user names for tcc to write: tcc never deletes or overwrites what it did not write.

A user-given output path (`tcc compile -o`, `--report`, `--search-dir`, `tcc run -o`, `tcc analyze
-o`, a pass's `out=`) may be written when it does not exist, when it is an empty directory (where a
directory goes), when what is there is something tcc wrote (`tcc_wrote(path)`, a recogniser the
writer supplies: an artifact's manifest.json format, a report's schema, a search directory's marker
file, an .npz's zip comment), or when the user passed `--force` (`force=True`). Anything else is a
UserError (exit 2) naming the path and why, with the hint `--force`. Writers call these before their
slow work starts, and again right before they replace anything.

  check_dir(path, what, tcc_wrote, force=False) -> Path    a directory output
  check_file(path, what, tcc_wrote, force=False) -> Path   a file output (never a directory, even with force)
  save_npz(path, arrays)                                    an .npz that is_tcc_npz() recognises
  is_tcc_npz(path) -> bool
  read_small_json(path) -> dict | None                      a recogniser's look at a JSON file
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Callable

from .errors import UserError

NPZ_COMMENT = b"written by tcc run"
MAX_RECOGNISED_BYTES = 64 << 20  # a recogniser reads no JSON file larger than this


def _refuse(what: str, path: Path, why: str) -> UserError:
    return UserError(f"{what} {path} {why}, and tcc never deletes or overwrites what it did not write",
                     "choose another path, or pass --force (Python: force=True) to overwrite it")


def check_dir(path, what: str, tcc_wrote: Callable[[Path], bool], force: bool = False) -> Path:
    """`path` (absolute) when tcc may write the directory there; UserError otherwise. `what` names
    the output in the message ("output directory", "search directory")."""
    path = Path(path).absolute()
    if force or not os.path.lexists(path):
        return path
    if path.is_symlink() or not path.is_dir():
        raise _refuse(what, path, "exists and is not a directory")
    if next(os.scandir(path), None) is None or tcc_wrote(path):
        return path
    raise _refuse(what, path, "is a non-empty directory tcc did not write")


def check_file(path, what: str, tcc_wrote: Callable[[Path], bool], force: bool = False) -> Path:
    """`path` (absolute) when tcc may write the file there; UserError otherwise. A directory at the
    path is refused even with `force` (tcc writes a file there, it never deletes a directory)."""
    path = Path(path).absolute()
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{what} {path} is a directory", "give the path of a file")
    if force or not os.path.lexists(path):
        return path
    if path.is_symlink() or not path.is_file() or not tcc_wrote(path):
        raise _refuse(what, path, "exists and is not a file tcc wrote")
    return path


def read_small_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, too large, not JSON or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_RECOGNISED_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def save_npz(path, arrays: dict) -> None:
    """numpy.savez, atomically, marked (zip comment) so a later `tcc run -o` may replace it."""
    import numpy as np
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        with zipfile.ZipFile(tmp, "a") as z:
            z.comment = NPZ_COMMENT
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_tcc_npz(path: Path) -> bool:
    """Whether `path` is an .npz save_npz wrote (reads the zip directory only, never the arrays)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.comment == NPZ_COMMENT
    except (OSError, zipfile.BadZipFile):
        return False
