#!/usr/bin/env python
"""A model-size sweep: one ordinary `train` workdir per depth, for `python -m var_jax scaling`.

    python launch/sweep.py --config configs/shapes_var.py --depths 2,3,4,5 --sweep-dir workdirs/shapes_sweep \
        --config.total_steps=2000
    python launch/sweep.py ... --dry-run          # print the per-depth train commands, run nothing
    python launch/sweep.py ... --slurm            # write SWEEP_DIR/sweep_slurm.sh, a SLURM job array
    python launch/sweep.py ... --tpu-pod          # the runs one after another through launch/tpu_pod.sh
    python -m var_jax scaling --sweep workdirs/shapes_sweep

Run d{depth} trains `--config FILE[:ARG]` in SWEEP_DIR/d{depth} with --config.model.depth=D and the reference
shape rule, width = 64·D (--width-per-depth) and heads = D (head size 64); every other --config.KEY=VALUE is
passed to every run. An override of model.width or model.heads replaces the rule for every depth. The learning
rate is the config's: the reference scales it with the batch only (lr = tblr · batch / 256), not with depth.

Locally the runs go one after another (`python -m var_jax train` subprocesses); a run whose model is exported
(d{depth}/model/config.json) is skipped, an interrupted one resumes from its checkpoint, so rerunning the same
command finishes a sweep. A failed run stops the sweep with its exit status.

--slurm writes a job array (one task per depth) whose tasks run launch/slurm_gpu.sh with the run's arguments,
under slurm_gpu.sh's own #SBATCH settings; submit it with `sbatch`. --tpu-pod runs launch/tpu_pod.sh per depth
(TPU_NAME, ZONE as that script needs).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))   # so that a checkout that is not pip-installed still imports var_jax

from var_jax.cli.common import CommandError, exit_on_command_error, parse_int_list  # noqa: E402
from var_jax.cli.train import parse_args_with_overrides  # noqa: E402
from var_jax.paths import user_path  # noqa: E402
from var_jax.train.workdir import Workdir  # noqa: E402

REFERENCE_WIDTH_PER_DEPTH = 64      # VAR: C = 64·depth, heads = depth
SLURM_LAUNCHER = REPO_ROOT / "launch" / "slurm_gpu.sh"
TPU_LAUNCHER = REPO_ROOT / "launch" / "tpu_pod.sh"
MODEL_CONFIG = "model/config.json"      # written last by a finished run (var_jax/train/workdir.py)
SLURM_SCRIPT = "sweep_slurm.sh"


def run_name(depth: int) -> str:
    return f"d{depth}"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help="a VAR config, e.g. configs/shapes_var.py")
    parser.add_argument("--depths", required=True, help="comma-separated depths, e.g. 2,3,4,5")
    parser.add_argument("--sweep-dir", required=True, help="one workdir per depth: SWEEP_DIR/d{depth}")
    parser.add_argument("--width-per-depth", type=int, default=REFERENCE_WIDTH_PER_DEPTH,
                        help="width = this × depth, heads = depth (default: the reference's 64)")
    launcher = parser.add_mutually_exclusive_group()
    launcher.add_argument("--slurm", action="store_true", help="write a SLURM job array script instead of running")
    launcher.add_argument("--tpu-pod", action="store_true", help="run each depth through launch/tpu_pod.sh")
    parser.add_argument("--dry-run", action="store_true", help="print what would run; run and write nothing")
    args = parse_args_with_overrides(parser, argv)
    return args


def run_dir(args, depth: int) -> str:
    return f"{args.sweep_dir.rstrip('/')}/{run_name(depth)}"


def train_arguments(args, depth: int) -> list[str]:
    """The `train` arguments of run d{depth} (after `python -m var_jax train`)."""
    keys = {item.partition("=")[0] for item in args.overrides}
    shape = []
    if "model.width" not in keys:
        shape.append(f"--config.model.width={args.width_per_depth * depth}")
    if "model.heads" not in keys:
        shape.append(f"--config.model.heads={depth}")
    return (["--config", args.config, "--workdir", run_dir(args, depth), f"--config.model.depth={depth}", *shape]
            + [f"--config.{item}" for item in args.overrides])


def local_command(args, depth: int) -> list[str]:
    return [sys.executable, "-m", "var_jax", "train", *train_arguments(args, depth)]


def is_finished(args, depth: int) -> bool:
    return Workdir.at(run_dir(args, depth)).finished()


def slurm_script(args, depths) -> str:
    """A job array over the depths; each task execs launch/slurm_gpu.sh (one process per GPU) with its run's
    arguments, under slurm_gpu.sh's #SBATCH settings plus the array and log options."""
    headers = [line for line in SLURM_LAUNCHER.read_text().splitlines() if line.startswith("#SBATCH")]
    runs = "\n".join(f"    {shlex.quote(shlex.join(train_arguments(args, d)))}" for d in depths)
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# var-jax sweep over depths {','.join(map(str, depths))} (written by launch/sweep.py); submit with sbatch.",
        "# Task i trains depth i of the list through launch/slurm_gpu.sh; resubmitting resumes unfinished runs.",
        *[h.replace("--job-name=var-jax", "--job-name=var-jax-sweep") for h in headers],
        f"#SBATCH --array=0-{len(depths) - 1}",
        f"#SBATCH --output={args.sweep_dir.rstrip('/')}/slurm-%A_%a.out",
        "set -euo pipefail",
        "RUNS=(",
        runs,
        ")",
        f'cd {shlex.quote(str(REPO_ROOT))}',
        'eval "set -- ${RUNS[$SLURM_ARRAY_TASK_ID]}"',
        f'exec bash {shlex.quote(str(SLURM_LAUNCHER))} "$@"',
        ""])


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    depths = parse_int_list(args.depths, "--depths")
    if any(d < 1 for d in depths) or len(set(depths)) != len(depths):
        raise CommandError(f"--depths must be distinct positive integers, got {args.depths!r}")
    if args.width_per_depth < 1:
        raise CommandError(f"--width-per-depth must be >= 1, got {args.width_per_depth}")
    if not os.path.isfile(args.config.partition(":")[0]):
        raise CommandError(f"--config: no config file {args.config.partition(':')[0]}")
    args.sweep_dir = str(user_path(args.sweep_dir))   # as every run sees it: absolute, or the URL

    if args.slurm:
        script = slurm_script(args, depths)
        path = user_path(args.sweep_dir) / SLURM_SCRIPT
        if args.dry_run:
            print(script, end="")
            return 0
        from var_jax.paths import atomic_write_text
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, script)
        print(f"wrote {path}; submit with: sbatch {shlex.quote(str(path))}")
        return 0

    for depth in depths:
        if args.tpu_pod:
            command = ["bash", str(TPU_LAUNCHER), *train_arguments(args, depth)]
        else:
            command = local_command(args, depth)
        if is_finished(args, depth):
            print(f"[sweep] {run_name(depth)}: finished ({MODEL_CONFIG} exists), skipped", flush=True)
            continue
        print(("" if args.dry_run else "[sweep] ") + shlex.join(command), flush=True)
        if args.dry_run:
            continue
        status = subprocess.call(command)
        if status:
            print(f"[sweep] {run_name(depth)} failed (exit status {status}); rerun the same command to resume",
                  file=sys.stderr)
            return status
    if not args.dry_run:
        print(f"[sweep] done; fit with: python -m var_jax scaling --sweep {shlex.quote(args.sweep_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_command_error("launch/sweep.py", main))
