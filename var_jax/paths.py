"""Paths a user gives (workdirs, checkpoints, images, outputs): the one place they are interpreted.

`user_path` accepts what a shell user types: relative paths (against the current directory, made absolute at
once, because orbax and tensorstore resolve relative paths against other roots), absolute paths, `~`, and URLs
such as `gs://bucket/run` that etils.epath (the path library orbax itself uses) knows how to open. Everything
else in var-jax works on the returned `epath.Path`. A URL whose storage library is not installed is refused here,
where it enters, with one line naming the package (gs://: the `gcs` extra), not at its first use.

Writes: `atomic_write` leaves either the old content or the new. Locally through a temporary file beside the
target, flushed and renamed into place. On a bucket an object only appears once its upload completes, and a
rename would be a copy, so the content is written to a local temporary file and uploaded in one call
(`upload_file`; fsspec's put_file, through the same filesystem instance that etils.epath uses, so its listing
cache sees the new object).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from etils import epath

PathLike = str | os.PathLike
# The pip extra that brings each URL scheme's storage library (setup.py extras_require).
EXTRAS = {"gs": "gcs"}


class StorageUnavailable(ValueError):
    """A URL whose storage library is not installed."""


def is_url(text: PathLike) -> bool:
    return "://" in os.fspath(text)


def user_path(text: PathLike) -> epath.Path:
    """An absolute `epath.Path` for a path typed by a user (relative, absolute, `~`, or a URL)."""
    text = os.fspath(text)
    if not text:
        raise ValueError("empty path")
    if is_url(text):
        try:
            _check_storage_library(text.partition("://")[0])
        except StorageUnavailable as e:
            raise StorageUnavailable(f"{text}: {e}") from None
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


@functools.cache
def _check_storage_library(scheme: str) -> None:
    """Import the fsspec filesystem of `scheme` once; a missing one is StorageUnavailable naming what to install."""
    from fsspec.registry import get_filesystem_class, known_implementations
    try:
        get_filesystem_class(scheme)
    except ValueError:
        raise StorageUnavailable(f"{scheme}:// is not a storage scheme fsspec knows") from None
    except ImportError:
        package = known_implementations[scheme]["class"].split(".")[0]
        extra = f"'var-jax[{EXTRAS[scheme]}]'" if scheme in EXTRAS else package
        raise StorageUnavailable(f"{scheme}:// paths need {package}, which is not installed "
                                 f"(pip install {extra})") from None


def is_local(path: epath.Path) -> bool:
    return not is_url(path)


def atomic_write(path: PathLike, write_fn: Callable, *, text: bool = False) -> epath.Path:
    """Write `path` with write_fn(file) so that a reader sees either the old content or the new, and a killed
    process never leaves half a file (see the module docstring)."""
    path = user_path(path)
    if not is_local(path):
        with tempfile.TemporaryDirectory(prefix="var_jax_upload_") as staging:
            local = os.path.join(staging, path.name)
            with open(local, "w" if text else "wb") as f:
                write_fn(f)
            upload_file(local, path)
        return path
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("w" if text else "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def upload_file(local: PathLike, path: PathLike) -> epath.Path:
    """Copy the local file `local` to `path` whole: on a bucket one upload (the object appears when it is
    complete); locally through atomic_write."""
    path = user_path(path)
    if is_local(path):
        with open(local, "rb") as source:
            return atomic_write(path, lambda f: shutil.copyfileobj(source, f))
    _filesystem(path).put_file(os.fspath(local), os.fspath(path))
    return path


def read_bytes_many(paths: list[epath.Path], concurrency: int = 16) -> list[bytes]:
    """The contents of several files, read concurrently (on a bucket each read is a round trip)."""
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(paths)))) as pool:
        return list(pool.map(lambda p: p.read_bytes(), paths))


def _filesystem(path: epath.Path):
    """The fsspec filesystem etils.epath itself uses for the URL `path` (one instance: one listing cache)."""
    return epath.backend.fsspec_backend.fs(os.fspath(path))


def atomic_write_text(path: PathLike, content: str) -> epath.Path:
    return atomic_write(path, lambda f: f.write(content), text=True)


def read_json_object(path: PathLike, error: type[Exception], missing: str) -> dict:
    """The JSON object stored at `path`; `error(one line naming the file)` when it is absent (`missing` says
    what to do), not JSON, or not an object."""
    path = user_path(path)
    if not path.is_file():
        raise error(f"{path}: no such file ({missing})")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
