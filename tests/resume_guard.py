"""Test helpers for the resume guard: record a run as an older workdir did, then ask whether a config resumes it."""
import json

from var_jax.train.checkpointing import RUN_CONFIG_FILE, TrainCheckpointer, run_identity


def record_run(directory, run: dict) -> None:
    """`directory`/checkpoints as a run recorded with the run identity `run` left it (no checkpoint yet)."""
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / RUN_CONFIG_FILE).write_text(json.dumps({"model": {}, "run": run}))


def check_resumes(directory, config) -> None:
    """Raises CheckpointMismatch when `config` may not resume the run recorded in `directory`."""
    checkpointer = TrainCheckpointer(directory, keep=1, model_config={}, run_config=run_identity(config))
    try:
        checkpointer.check_model_config()
    finally:
        checkpointer.close()
