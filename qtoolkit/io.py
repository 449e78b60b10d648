"""Writing outputs so that nothing a user made is lost: atomically, and never over an existing path unless asked."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import QtoolkitError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_new_output(path: Path, overwrite: bool = False) -> None:
    """Refuse to replace a user's existing output unless asked: call before any long work."""
    if Path(path).exists() and not overwrite:
        raise QtoolkitError(f"{path} already exists: choose another --out or pass --overwrite")


def atomic_dir(final: Path, overwrite: bool = False):
    """Context manager yielding a temporary folder that replaces `final` only when the block succeeds."""
    return _AtomicDir(Path(final), overwrite)


class _AtomicDir:
    def __init__(self, final: Path, overwrite: bool):
        check_new_output(final, overwrite)
        self.final = final
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.final.rename(old)
            self.tmp.rename(self.final)
            shutil.rmtree(old)
        else:
            self.tmp.rename(self.final)
        return False


def partial_dir(final: Path) -> Path:
    """Where a resumable job works on `final` (qtoolkit.io.resumable_dir): a hidden folder beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def resumable_dir(final: Path, overwrite: bool = False, resume: bool = False):
    """Context manager yielding the work folder of a long job that replaces `final` when the block succeeds.

    Unlike atomic_dir, the work folder has a fixed name (partial_dir(final)) and is kept when the block fails or
    is interrupted, so that a rerun with `resume=True` continues from the stages it holds. A work folder left
    over is never reused silently: without `resume` it is refused (or, with `overwrite`, removed: the user
    asked to start over)."""
    return _ResumableDir(Path(final), overwrite, resume)


class _ResumableDir(_AtomicDir):
    def __init__(self, final: Path, overwrite: bool, resume: bool):
        super().__init__(final, overwrite)
        self.partial = partial_dir(final)
        if resume and not self.partial.is_dir():
            raise QtoolkitError(f"nothing to resume: no interrupted run of {final} ({self.partial} does not exist); "
                                "run without --resume")
        if not resume and self.partial.exists():
            if not overwrite:
                raise QtoolkitError(f"{self.partial} holds an interrupted run of {final}: pass --resume to continue "
                                    "it, or --overwrite to start again")
            shutil.rmtree(self.partial)

    def __enter__(self) -> Path:
        self.partial.mkdir(parents=True, exist_ok=True)
        self.tmp = self.partial
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False  # kept: what it holds is what --resume continues from
        return super().__exit__(exc_type, exc, tb)


def read_description(path: Path, format: str, version: int, how_to_fix: str) -> dict:
    """A folder's JSON description that names its `format` and `format_version`, checked: unreadable, another
    format or another version is one line ending in `how_to_fix`."""
    try:
        description = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QtoolkitError(f"{path} is corrupt ({e}): {how_to_fix}") from None
    if not isinstance(description, dict) or description.get("format") != format:
        raise QtoolkitError(f"{path} is not a {format} description: {how_to_fix}")
    if description.get("format_version") != version:
        raise QtoolkitError(f"{Path(path).parent} was written in format version {description.get('format_version')!r}; "
                            f"this qtoolkit reads version {version}: {how_to_fix}")
    return description
