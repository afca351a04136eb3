"""Resumable commands keep their settings beside their outputs, so a rerun can't mix two different runs."""
from __future__ import annotations

import json

from var_jax.cli.common import CommandError
from var_jax.paths import atomic_write_text, user_path


def check_same_settings(directory, file_name: str, settings: dict, what: str, option: str, record: bool = True):
    """Record `settings` in directory/file_name on the first run; refuse a rerun that asks for different ones.
    record=False only checks (the non-writing hosts of a multi-host run)."""
    directory = user_path(directory)
    path = directory / file_name
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise CommandError(f"{directory} holds {what} with different settings ({', '.join(changed)}); "
                               f"use another {option} or delete it")
    elif record:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
