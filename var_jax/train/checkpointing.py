"""Training checkpoints: an orbax CheckpointManager over WORKDIR/checkpoints.

Each checkpoint holds the train state (model, optimizer, step, RNG; restored straight onto the shardings of
the current abstract state, so a different mesh is the same code path) and the data iterator's position
(grain). Saves are asynchronous; `keep` checkpoints are kept. WORKDIR/checkpoints/model_config.json records the
model configuration of the run: resuming with a config whose model differs is refused, naming the fields.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp

from var_jax.data.pipeline import checkpoint_restore_args, checkpoint_save_args
from var_jax.paths import atomic_write_text, user_path

MODEL_CONFIG_FILE = "model_config.json"


class CheckpointMismatch(ValueError):
    """The workdir holds checkpoints of a different model."""


def _differences(stored, current, prefix="") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            out += _differences(stored.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if stored == current else [f"{prefix.rstrip('.')}: checkpoint has {stored!r}, config has {current!r}"]


class TrainCheckpointer:
    def __init__(self, workdir, *, keep: int, model_config: dict):
        self.directory = user_path(workdir) / "checkpoints"
        self.model_config = json.loads(json.dumps(model_config))   # normalised: tuples -> lists
        options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    # ---- the model-config guard ----------------------------------------------------------------------------
    def check_model_config(self):
        """Refuse to resume checkpoints of another model; record the config on a fresh run."""
        path = self.directory / MODEL_CONFIG_FILE
        if path.exists():
            stored = json.loads(path.read_text())
            diffs = _differences(stored, self.model_config)
            if diffs:
                raise CheckpointMismatch(
                    f"the checkpoints in {self.directory} are of a different model than the config: "
                    + "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
                    + " (use a new --workdir, or the config the checkpoints were made with)")
        elif jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(self.model_config, indent=2, sort_keys=True) + "\n")

    # ---- save / restore --------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Asynchronous save; returns whether a checkpoint was started (orbax skips existing steps)."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=checkpoint_save_args(data_iterator))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterator) -> Any:
        """The train state at `step`, placed as `abstract_state` says; the data iterator is repositioned."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=checkpoint_restore_args(data_iterator))
        return self.manager.restore(step, args=args)["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
