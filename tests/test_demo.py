"""`python -m var_jax demo --quick`: both trainings, sampling and scoring end to end (the digits configs with a
one-block VAR, two steps of batch 8 per stage), then reruns on the same workdir: a finished run is skipped stage
by stage, an interrupted VAR training resumes from its checkpoint, and a rerun asking for other settings is
refused.

The module's run is the README's main command exactly as a newcomer types it (with --quick): a subprocess from the
repository root with a relative `--workdir workdirs/...`; the other commands are then run from another directory
with relative and `~` paths.
"""
import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("jax")

from conftest import REPO_ROOT  # noqa: E402
from var_jax.cli import main  # noqa: E402

QUICK_IMAGE = 32
PER_CLASS = 10


def demo(workdir, *extra):
    return main(["demo", "--workdir", str(workdir), "--quick", *extra])


def snapshot(directory):
    """{relative path: (size, mtime_ns)} of every file under `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def logged_steps(stage_dir):
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished():
    relative = f"workdirs/test-demo-{uuid.uuid4().hex[:8]}"
    # the README's command: `python -m var_jax demo --workdir workdirs/demo`, run from the repo root
    proc = subprocess.run([sys.executable, "-m", "var_jax", "demo", "--workdir", relative, "--quick"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workdir = REPO_ROOT / relative
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


def test_commands_take_relative_and_home_paths_from_another_directory(finished, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path))
    model = os.path.relpath(finished / "var" / "model")          # ../../.../workdirs/test-demo-*/var/model
    assert main(["sample", "--checkpoint", model, "--classes", "3,7", "--num-per-class", "1", "--out", "out"]) == 0
    assert main(["reconstruct", "--checkpoint", model, "--images", "out/samples.npz", "--out", "~/rec.npz"]) == 0
    with np.load(elsewhere / "out" / "samples.npz") as samples, np.load(tmp_path / "rec.npz") as rec:
        assert rec["arr_0"].shape == samples["arr_0"].shape == (2, QUICK_IMAGE, QUICK_IMAGE, 3)
        np.testing.assert_array_equal(samples["arr_1"], [3, 7])


def test_outputs_have_the_adm_layout_ten_per_class_a_grid_and_a_score(finished):
    samples = finished / "samples"
    with np.load(samples / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10 * PER_CLASS, QUICK_IMAGE, QUICK_IMAGE, 3)
    assert images.std() > 0       # decoded images, not a constant placeholder
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), PER_CLASS))
    grid = np.asarray(Image.open(samples / "grid.png"))
    side = PER_CLASS * (QUICK_IMAGE + 2) + 2          # one row per class, 2 px padding
    assert grid.shape[:2] == (side, side)
    score = json.loads((samples / "score.json").read_text())
    assert 0.0 <= score["accuracy"] <= 1.0 and 0.0 <= score["in_distribution"] <= 1.0
    assert sum(score["predicted_counts"]) == 10 * PER_CLASS and score["num_images"] == 10 * PER_CLASS
    assert score["real_digits_accuracy"] > 0.9
    for stage in ("tokenizer", "var"):
        assert (finished / stage / "model" / "config.json").is_file()
        assert logged_steps(finished / stage) == [1, 2]


def test_rerun_skips_finished_stages_and_refuses_other_settings(finished, capsys):
    before = {d: snapshot(finished / d) for d in ("tokenizer", "var", "samples/shards")}
    capsys.readouterr()
    assert demo(finished) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 2, out
    assert {d: snapshot(finished / d) for d in before} == before      # nothing trained or sampled again
    with pytest.raises(SystemExit) as exit_info:
        demo(finished, "--seed", "1")
    assert exit_info.value.code == 2
    assert "seed" in capsys.readouterr().err


def test_interrupted_var_training_resumes_from_its_checkpoint(finished, tmp_path, capsys):
    workdir = tmp_path / "demo"
    shutil.copytree(finished, workdir)
    # as if killed after the step-1 checkpoint: no step-2 checkpoint, no exported model, no samples
    var = workdir / "var"
    shutil.rmtree(var / "checkpoints" / "2")
    shutil.rmtree(var / "model")
    shutil.rmtree(workdir / "samples")
    tokenizer_before = snapshot(workdir / "tokenizer")
    capsys.readouterr()
    assert demo(workdir) == 0
    out = capsys.readouterr()
    assert "resuming from step 1" in out.out + out.err
    assert logged_steps(var) == [1, 2]                   # step 1 kept, step 2 redone: not restarted
    assert snapshot(workdir / "tokenizer") == tokenizer_before
    assert (var / "model" / "config.json").is_file() and (workdir / "samples" / "samples.npz").is_file()
