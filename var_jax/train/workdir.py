"""The training workdir: its layout, and the writers that put a run's metrics and TensorBoard events into it.

    WORKDIR/                    a local directory or any URL etils.epath opens (gs://bucket/run)
      train_config.json         the run's whole config (workdirs from before it was named so: config.json)
      checkpoints/              orbax's CheckpointManager and the resume guard (train/checkpointing.py)
      checkpoints_unreadable/   checkpoints that failed to restore, moved aside
      metrics.jsonl             local workdir: one JSON record per logged step, appended
      metrics/                  bucket workdir: one object per logging window, FIRST-LAST.jsonl (its steps)
      tensorboard/              TensorBoard event files
      samples/                  image grids written during training
      model/                    the exported model directory, once the run finished
      best_model/               the best held-out model, and best_model.json its record (checkpointing.BestModel)
      profiles/                 profiler traces
      compile_cache/            JAX's persistent compilation cache

The trainer resolves the user's path once (`Workdir.at`) and hands this object to the checkpointer, the logger
and the exporters, which take their paths from it.

Metrics. A local file is appended to and flushed record by record. A bucket object cannot be appended to (an
append rewrites the object, and nothing reaches the bucket before the file is closed), so a bucket workdir writes
each logging window as an object of its own, and `read_metrics` merges the windows. A window ends at each
checkpoint, before the save starts (`end_window(wait=True)`: every step a checkpoint holds has its records in the
bucket by then), and otherwise after WINDOW_SECONDS; a killed run loses at most the window in progress, whose
steps the resumed run repeats. On resume the records after the restored step are removed first (local: the file
is cut back; bucket: the windows past it are trimmed or deleted), so each step's record is there exactly once.

TensorBoard. A local workdir's event file is written in place. A bucket workdir's is written to a local staging
directory and, at the end of each window, closed and uploaded once; the next window opens a new file (TensorBoard
reads every event file of a directory), so no file is held in memory or uploaded twice. A resumed run's first
event file starts with a purge step, so TensorBoard drops the killed run's events after the restored step.

Uploads run on one background thread, so the training loop waits for the bucket only at checkpoints and at close.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from etils import epath

from var_jax.paths import PathLike, atomic_write_text, is_local, read_bytes_many, upload_file, user_path

TRAIN_CONFIG_FILE = "train_config.json"      # the run's config; a model directory's own is config.json
OLD_TRAIN_CONFIG_FILE = "config.json"        # its name in workdirs from before train_config.json
METRICS_FILE = "metrics.jsonl"
METRICS_DIR = "metrics"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
BEST_MODEL_DIR = "best_model"                # a model directory (var_jax.checkpoints), like WORKDIR/model
BEST_MODEL_FILE = "best_model.json"          # {"step", "metric", "value", "metrics"} of WORKDIR/best_model
MODEL_CONFIG_FILE = "config.json"            # var_jax.checkpoints.CONFIG_FILE: present once a model is complete
WINDOW_SECONDS = 300.0                       # a bucket window also ends after this long without a checkpoint
_WINDOW_NAME = re.compile(r"^(\d+)-(\d+)\.jsonl$")


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Named paths of a training workdir (see the module docstring)."""
    root: epath.Path

    @classmethod
    def at(cls, path: PathLike | Workdir) -> Workdir:
        """The workdir at a user's path (resolved here, once), or `path` itself when it is one already."""
        return path if isinstance(path, Workdir) else cls(user_path(path))

    def __str__(self) -> str:
        return str(self.root)

    @property
    def is_local(self) -> bool:
        return is_local(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    train_config = property(lambda self: self.root / TRAIN_CONFIG_FILE)
    old_train_config = property(lambda self: self.root / OLD_TRAIN_CONFIG_FILE)
    checkpoints = property(lambda self: self.root / CHECKPOINTS_DIR)
    checkpoints_unreadable = property(lambda self: self.root / UNREADABLE_DIR)
    metrics_file = property(lambda self: self.root / METRICS_FILE)
    metrics_dir = property(lambda self: self.root / METRICS_DIR)
    tensorboard = property(lambda self: self.root / "tensorboard")
    samples = property(lambda self: self.root / "samples")
    model = property(lambda self: self.root / MODEL_DIR)
    best_model = property(lambda self: self.root / BEST_MODEL_DIR)
    best_model_record = property(lambda self: self.root / BEST_MODEL_FILE)
    profiles = property(lambda self: self.root / "profiles")
    compile_cache = property(lambda self: self.root / "compile_cache")

    def run_config_path(self) -> epath.Path:
        """train_config.json, or config.json in an older workdir."""
        return self.train_config if self.train_config.exists() else self.old_train_config

    def finished(self) -> bool:
        """Whether the run exported its model (model/config.json is written last)."""
        return (self.model / MODEL_CONFIG_FILE).exists()

    def has_metrics(self) -> bool:
        return self.metrics_file.exists() or self.metrics_dir.exists()

    def open_log(self, start_step: int, window_seconds: float = WINDOW_SECONDS) -> RunLog:
        """The writers of a run starting (or resuming) after `start_step`; records past it are removed first."""
        return RunLog(self, start_step, window_seconds)


# ---- metrics ----------------------------------------------------------------------------------------------------

def _records(text: str) -> list[dict]:
    """The JSON records of a .jsonl text (a torn last line is skipped)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _step(record: dict) -> int:
    return int(record.get("step", -1))


def _windows(directory: epath.Path) -> list[tuple[int, int, epath.Path]]:
    """(first step, last step, path) of the metric windows in `directory`, in step order."""
    if not directory.exists():
        return []
    found = [(m, p) for p in directory.iterdir() if (m := _WINDOW_NAME.match(p.name))]
    return sorted((int(m[1]), int(m[2]), p) for m, p in found)


def _window_path(directory: epath.Path, records: list[dict]) -> epath.Path:
    return directory / f"{_step(records[0]):010d}-{_step(records[-1]):010d}.jsonl"


def read_metrics(workdir: PathLike | Workdir) -> list[dict]:
    """Every logged record of a workdir in step order, from metrics.jsonl and the metrics/ windows, one per step
    (where a step appears twice, e.g. a trim cut short by a kill, the later window's record)."""
    workdir = Workdir.at(workdir)
    by_step = {}
    if workdir.metrics_file.exists():
        by_step.update((_step(r), r) for r in _records(workdir.metrics_file.read_text()))
    windows = _windows(workdir.metrics_dir)
    for content in read_bytes_many([path for _, _, path in windows]):
        by_step.update((_step(r), r) for r in _records(content.decode()))
    return [by_step[s] for s in sorted(by_step)]


def _cut_metrics_file(path: epath.Path, last_step: int):
    """Keep only the records of metrics.jsonl at or before `last_step`."""
    if path.exists():
        atomic_write_text(path, _jsonl([r for r in _records(path.read_text()) if _step(r) <= last_step]))


def _cut_windows(directory: epath.Path, last_step: int):
    """Trim or delete the windows holding records after `last_step` (the trimmed copy is written before the
    window is deleted, so a kill in between leaves a duplicate that read_metrics resolves, never a gap)."""
    for first, last, path in _windows(directory):
        if last <= last_step:
            continue
        if first <= last_step:
            kept = [r for r in _records(path.read_text()) if _step(r) <= last_step]
            if kept:
                atomic_write_text(_window_path(directory, kept), _jsonl(kept))
        path.unlink()


class _LocalMetrics:
    """metrics.jsonl, appended and flushed record by record."""

    def __init__(self, path: epath.Path):
        self._file = path.open("a")

    def write(self, record: dict):
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def end_window(self, uploads):
        pass

    def close(self):
        self._file.close()


class _BucketMetrics:
    """One object per window under metrics/."""

    def __init__(self, directory: epath.Path):
        self.directory, self._records = directory, []

    def write(self, record: dict):
        self._records.append(record)

    def end_window(self, uploads):
        if self._records:
            records, self._records = self._records, []
            uploads.submit(atomic_write_text, _window_path(self.directory, records), _jsonl(records))

    def close(self):
        pass


# ---- TensorBoard ------------------------------------------------------------------------------------------------

class _TensorBoard:
    """tensorboardX event files: in place locally; on a bucket staged locally, one closed file per window."""

    def __init__(self, directory: epath.Path, start_step: int):
        self.directory, self.remote = directory, not is_local(directory)
        self.staging = tempfile.mkdtemp(prefix="var_jax_tensorboard_") if self.remote else os.fspath(directory)
        self._purge_step = start_step + 1 if start_step else None
        self._start_step, self._writer, self._files = start_step, None, 0

    def writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter
            # names start with the second they were opened in; the suffix keeps files of the same second (this
            # run's, or a killed run's before it) apart and in the order written
            suffix = f".{self._start_step:010d}-{self._files:06d}" if self.remote else ""
            self._writer = SummaryWriter(self.staging, purge_step=self._purge_step, filename_suffix=suffix)
            self._purge_step, self._files = None, self._files + 1
        return self._writer

    def end_window(self, uploads):
        if self._writer is None:
            return
        if not self.remote:
            self._writer.flush()
            return
        self._writer.close()
        self._writer = None
        for name in sorted(os.listdir(self.staging)):
            uploads.submit(self._upload, name)

    def _upload(self, name: str):
        local = os.path.join(self.staging, name)
        upload_file(local, self.directory / name)
        os.remove(local)

    def close(self):
        if self._writer is not None:
            self._writer.close()
        if self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)


# ---- the writers of one run -------------------------------------------------------------------------------------

class _Uploads:
    """One background thread for uploads; a failed upload is raised at the next wait()."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="var_jax_upload")
        self._pending = []

    def submit(self, fn, *args):
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self):
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self):
        try:
            self.wait()
        finally:
            self._pool.shutdown()


class RunLog:
    """Where one run's metric records and TensorBoard events go (see the module docstring). Process 0 only."""

    def __init__(self, workdir: Workdir, start_step: int, window_seconds: float = WINDOW_SECONDS):
        self.window_seconds = window_seconds
        workdir.root.mkdir(parents=True, exist_ok=True)
        _cut_metrics_file(workdir.metrics_file, start_step)
        _cut_windows(workdir.metrics_dir, start_step)
        self._metrics = _LocalMetrics(workdir.metrics_file) if workdir.is_local else _BucketMetrics(workdir.metrics_dir)
        self._tensorboard = _TensorBoard(workdir.tensorboard, start_step)
        self._uploads = _Uploads()
        self._window_started = time.monotonic()

    def write(self, record: dict):
        """One step's record (a dict with "step" and JSON-able values)."""
        self._metrics.write(record)
        if time.monotonic() - self._window_started >= self.window_seconds:
            self.end_window()

    def add_scalar(self, tag: str, value: float, step: int):
        self._tensorboard.writer().add_scalar(tag, value, step)

    def add_image(self, tag: str, image_hwc, step: int):
        self._tensorboard.writer().add_image(tag, image_hwc, step, dataformats="HWC")

    def end_window(self, wait: bool = False):
        """Send the window's records and events on their way; with wait, return once they are stored."""
        self._metrics.end_window(self._uploads)
        self._tensorboard.end_window(self._uploads)
        self._window_started = time.monotonic()
        if wait:
            self._uploads.wait()

    def close(self):
        try:
            self.end_window()
            self._uploads.close()
        finally:
            self._metrics.close()
            self._tensorboard.close()
