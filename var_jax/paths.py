"""Paths a user gives (workdirs, checkpoints, images, outputs): the one place they are interpreted.

`user_path` accepts what a shell user types: relative paths (against the current directory, made absolute at
once, because orbax and tensorstore resolve relative paths against other roots), absolute paths, `~`, and URLs
such as `gs://bucket/run` that etils.epath (the path library orbax itself uses) knows how to open. Everything
else in var-jax works on the returned `epath.Path`.
"""
from __future__ import annotations

import os
from typing import Callable

from etils import epath

PathLike = str | os.PathLike


def is_url(text: PathLike) -> bool:
    return "://" in os.fspath(text)


def user_path(text: PathLike) -> epath.Path:
    """An absolute `epath.Path` for a path typed by a user (relative, absolute, `~`, or a URL)."""
    text = os.fspath(text)
    if not text:
        raise ValueError("empty path")
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: epath.Path) -> bool:
    return not is_url(path)


def atomic_write(path: PathLike, write_fn: Callable, *, text: bool = False) -> epath.Path:
    """Write `path` through a temporary file beside it, flushed to disk, then renamed into place: a killed
    process never leaves half a file, and a reader sees either the old content or the new."""
    path = user_path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("w" if text else "wb") as f:
            write_fn(f)
            if is_local(tmp):
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: PathLike, content: str) -> epath.Path:
    return atomic_write(path, lambda f: f.write(content), text=True)
