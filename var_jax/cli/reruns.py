"""Resumable commands keep their settings beside their outputs, so a rerun can't mix two different runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

from var_jax.cli import CommandError


def atomic_write(path: Path, write_fn):
    """Write through a temporary file and rename it into place: a killed process never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write_fn(f)
    os.replace(tmp, path)


def check_same_settings(directory: Path, file_name: str, settings: dict, what: str, option: str):
    """Record `settings` in directory/file_name on the first run; refuse a rerun that asks for different ones."""
    path = directory / file_name
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise CommandError(f"{directory} holds {what} with different settings ({', '.join(changed)}); "
                               f"use another {option} or delete it")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write((json.dumps(settings, indent=2) + "\n").encode()))
