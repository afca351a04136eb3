#!/usr/bin/env python
"""Every research result of the README from one command: the shapes tokenizers, pre-tokenized data, a scaling
sweep fitted on held-out losses, Table 3, and a report.

    python launch/reproduce.py --out workdirs/reproduce                  # seed 0
    python launch/reproduce.py --out workdirs/reproduce_seed1 --seed 1   # another seed (training and samples)
    python launch/reproduce.py --out /tmp/reproduce_quick --quick        # tiny sizes: checks the pipeline
    python launch/reproduce.py --out workdirs/reproduce --stages tokenizers,tokenize   # in parts

Stages, in order; each is ordinary commands in DIR, so a finished stage is skipped and an interrupted one reruns
its commands, which resume (training from its last checkpoint, tokenize from its last shard):

  tokenizers  train configs/shapes_tokenizer.py[:TOKENIZER_ARG] in DIR/tokenizer and
              configs/shapes_raster.py:stage=tokenizer[,RASTER_TOKENIZER_ARG] in DIR/raster_tokenizer (the configs'
              defaults are the recipe), then measure each on RECON_IMAGES held-out shapes: PSNR and the shapes
              classifier's accuracy on the reconstructions (var_jax/eval/reconstruction.py)
  tokenize    `python -m var_jax tokenize` of each tokenizer: a training pool of POOL = max(SWEEP_STEPS,
              ABLATION_STEPS) x BATCH images (so no run sees an image twice) into DIR/tokens/<order>/train and
              EVAL_IMAGES held-out images into DIR/tokens/<order>/val
  sweep       launch/sweep.py over DEPTHS into DIR/sweep (width 64·depth, heads = depth). Compute rule: every size
              trains the same SWEEP_STEPS steps of BATCH examples from the same pool (the paper trains every size
              for the same epochs), so compute grows with size; held-out evaluation every EVAL_EVERY steps
  scaling     `python -m var_jax scaling --sweep DIR/sweep --require-held-out`: the fits of held-out losses
  ablations   launch/ablations.py into DIR/ablations (Table 3: raster AR, VAR, VAR w/o AdaLN, + top-k, + CFG at
              depth ABLATION_DEPTH; the sweep's run of that depth is the `var` model when the steps agree)
  report      launch/report.py DIR: DIR/report.md and the plots

DIR/results.json is written as each stage ends: 'settings', 'tokenizer' and 'raster_tokenizer' ({'psnr',
'recon_accuracy', ...}), 'scaling' (scaling.json), 'table3' (rows {'variant', 'params', 'fid', 'fid_noise_floor',
'precision', 'recall', 'accuracy', 's_per_image', ...}), 'table3_meta', 'table3_real', 'commands' and 'timings'
(each stage's wall seconds, summed over the invocations that ran it) per stage, 'stages_done', 'environment'.
A rerun must give the settings of the first run (or another --out); --stages runs some stages only (a stage needs
the ones before it done). --seed changes every training seed and the sample seed, not the data.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))   # so that a checkout that is not pip-installed still imports var_jax

from var_jax.cli.common import CommandError, exit_on_command_error, parse_int_list  # noqa: E402

RESULTS = "results.json"
STAGES = ("tokenizers", "tokenize", "sweep", "scaling", "ablations", "report")
ORDERS = ("scale", "raster")       # the multi-scale tokenizer and the raster baseline's single-scale one
TOKENIZER_RESULT = {"scale": "tokenizer", "raster": "raster_tokenizer"}
TOKENIZER_DIR = {"scale": "tokenizer", "raster": "raster_tokenizer"}
TOKENIZER_CONFIG = {"scale": "configs/shapes_tokenizer.py", "raster": "configs/shapes_raster.py:stage=tokenizer"}
VAR_CONFIG = {"scale": "configs/shapes_var.py", "raster": "configs/shapes_raster.py"}

# full run / --quick (the pipeline end to end in minutes on a CPU; the numbers mean nothing)
DEFAULTS = dict(tokenizer_arg="", raster_tokenizer_arg=None, recon_images=1000, depths="1,2,3,4,5",
                sweep_steps=3000, eval_every=500, batch=32, eval_images=2000, ablation_depth=3,
                ablation_steps=None, num_samples=1000, num_refs=1000)
QUICK = dict(tokenizer_arg="steps=2,batch=8,latent=4,vocab=64,cvae=8", recon_images=32, depths="1,2", sweep_steps=2,
             eval_every=2, batch=8,
             eval_images=16, ablation_depth=1, ablation_steps=2, num_samples=64, num_refs=100)
QUICK_OVERRIDES = ["log_every=1", "sample_every=0", "checkpoint_every=2"]   # every step logged, no PNG grids


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="launch/reproduce.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the directory of every stage's outputs and results.json")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run and the sample seed")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a test of the pipeline")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"stages to run (default all: {','.join(STAGES)})")
    parser.add_argument("--tokenizer-arg", help="config argument of configs/shapes_tokenizer.py, e.g. 'steps=4000' "
                                                "(default: '', the config's own recipe)")
    parser.add_argument("--raster-tokenizer-arg",
                        help="config argument added to configs/shapes_raster.py:stage=tokenizer (default: "
                             "--tokenizer-arg, the same recipe)")
    parser.add_argument("--recon-images", type=int, help="held-out shapes the tokenizers are measured on (1000)")
    parser.add_argument("--depths", help="sweep depths (default 1,2,3,4,5)")
    parser.add_argument("--sweep-steps", type=int, help="training steps of every sweep run (3000)")
    parser.add_argument("--eval-every", type=int, help="held-out evaluation interval of the sweep runs (500)")
    parser.add_argument("--batch", type=int, help="batch size of every VAR run (32)")
    parser.add_argument("--eval-images", type=int, help="held-out images of the pre-tokenized evaluation set (2000)")
    parser.add_argument("--ablation-depth", type=int, help="depth of every Table 3 model (3)")
    parser.add_argument("--ablation-steps", type=int, help="training steps of every Table 3 model (--sweep-steps)")
    parser.add_argument("--num-samples", type=int, help="samples per Table 3 row (1000)")
    parser.add_argument("--num-refs", type=int, help="held-out real shapes as FID references (1000)")
    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.raster_tokenizer_arg is None:
        args.raster_tokenizer_arg = args.tokenizer_arg
    if args.ablation_steps is None:
        args.ablation_steps = args.sweep_steps
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        parser.error(f"--stages: unknown stage(s) {unknown}; the stages are {','.join(STAGES)}")
    try:
        args.depths = list(parse_int_list(args.depths, "--depths"))
    except CommandError as e:
        parser.error(str(e))
    for name in ("recon_images", "sweep_steps", "eval_every", "batch", "eval_images", "ablation_depth",
                 "ablation_steps", "num_samples", "num_refs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def settings_of(args) -> dict:
    """What the results depend on: a rerun into the same --out must give the same."""
    return {"seed": args.seed, "quick": args.quick, "tokenizer_arg": args.tokenizer_arg,
            "raster_tokenizer_arg": args.raster_tokenizer_arg, "recon_images": args.recon_images,
            "depths": args.depths, "sweep_steps": args.sweep_steps, "eval_every": args.eval_every,
            "batch": args.batch, "eval_images": args.eval_images, "pool_images": pool_images(args),
            "ablation_depth": args.ablation_depth, "ablation_steps": args.ablation_steps,
            "num_samples": args.num_samples, "num_refs": args.num_refs}


def pool_images(args) -> int:
    """The training pool: the longest run's examples, so that no run sees an image twice."""
    return max(args.sweep_steps, args.ablation_steps) * args.batch


# ---- the run: results.json, commands, stage bookkeeping -------------------------------------------------------

class StageFailed(Exception):
    """A stage's command failed: its exit status is the run's."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Run:
    """The reproduction in --out: its results.json (read at start, written after every change) and the commands
    of the stage in progress."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out).resolve()
        self.path = self.out / RESULTS
        try:
            self.results = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CommandError(f"{self.path}: not valid JSON ({e}); move it away to start this --out afresh") from None
        self.stage = None

    def check_settings(self):
        recorded, settings = self.results.get("settings"), settings_of(self.args)
        if recorded is not None and recorded != settings:
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            was = ", ".join(f"{k}: {recorded.get(k)!r}" for k in changed)
            raise CommandError(f"{self.out} was made with other settings ({was}); rerun with those or give another "
                               "--out")
        self.results["settings"] = settings

    def save(self):
        from var_jax.paths import atomic_write_text
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.results, indent=2) + "\n")

    def path_of(self, *parts) -> str:
        return str(self.out.joinpath(*parts))

    def command(self, argv: list[str]):
        """Run one command of the current stage from the repository root; a nonzero exit fails the stage."""
        commands = self.results.setdefault("commands", {}).setdefault(self.stage, [])
        text = self.display(argv)
        if text not in commands:
            commands.append(text)
            self.save()
        print(f"[reproduce] {self.stage}: {text}", flush=True)
        status = run_command(argv)
        if status:
            print(f"[reproduce] {self.stage} failed (exit status {status}); rerun the same command to resume",
                  file=sys.stderr)
            raise StageFailed(status)

    def display(self, argv: list[str]) -> str:
        """A command as a reader would type it: `python`, and --out as it was given."""
        out = str(self.out)
        return shlex.join("python" if a == sys.executable else a.replace(out, self.args.out.rstrip("/") or out)
                          for a in map(str, argv))

    def done(self, stage: str) -> bool:
        return stage in self.results.get("stages_done", []) and OUTPUTS[stage](self)

    def run_stage(self, stage: str):
        self.stage = stage
        self.results.setdefault("stages_done", [])
        t0 = time.time()
        try:
            self.results.update(STAGE_FUNCTIONS[stage](self) or {})
            self.results["stages_done"] = [s for s in STAGES if s in self.results["stages_done"] or s == stage]
        finally:
            timings = self.results.setdefault("timings", {})
            timings[stage] = round(timings.get(stage, 0.0) + time.time() - t0, 1)
            self.save()
        print(f"[reproduce] {stage}: done in {time.time() - t0:.0f} s", flush=True)


def run_command(argv: list[str]) -> int:
    """One subprocess from the repository root (the commands take repository-relative config paths)."""
    return subprocess.call(argv, cwd=REPO_ROOT)


def python(*argv) -> list[str]:
    return [sys.executable, *map(str, argv)]


def var_jax_command(*argv) -> list[str]:
    return python("-m", "var_jax", *argv)


def overrides(run: Run, *items: str) -> list[str]:
    extra = list(items) + (QUICK_OVERRIDES if run.args.quick else [])
    return [f"--config.{item}" for item in extra]


def with_arg(config: str, arg: str) -> str:
    """A config spec with `arg` added to its argument: 'file.py' + 'a=1' -> 'file.py:a=1'."""
    if not arg:
        return config
    return f"{config},{arg}" if ":" in config else f"{config}:{arg}"


def tokenizer_shape(run: Run, order: str) -> str:
    """The VAR configs' `image_size` and `latent` arguments, from the trained tokenizer of `order`."""
    from var_jax.checkpoints import read_model_config
    from var_jax.tokenizer.config import TokenizerConfig
    tok = TokenizerConfig.from_dict(read_model_config(Path(run.path_of(TOKENIZER_DIR[order], "model")))["tokenizer"])
    return f"image_size={tok.image_size},latent={tok.patch_nums[-1]}"


def token_dir(run: Run, order: str, split: str) -> str:
    return run.path_of("tokens", order, split)


def finished(path) -> bool:
    from var_jax.train.workdir import Workdir
    return Workdir.at(path).finished()


# ---- stages ----------------------------------------------------------------------------------------------------

def measure_tokenizer(path, num_images: int) -> dict:
    from var_jax.eval.reconstruction import shapes_reconstruction_quality
    return shapes_reconstruction_quality(path, num_images=num_images)


def stage_tokenizers(run: Run) -> dict:
    out = {}
    for order in ORDERS:
        arg = run.args.tokenizer_arg if order == "scale" else run.args.raster_tokenizer_arg
        workdir = run.path_of(TOKENIZER_DIR[order])
        key = TOKENIZER_RESULT[order]
        if not finished(workdir):
            run.results.pop(key, None)     # a measurement of an earlier tokenizer in this place
            # --quick: no held-out pass over the 10,000 'val' shapes (the measurement below is the result)
            quick = ["eval_every=0"] if run.args.quick else []
            run.command(var_jax_command("train", "--config", with_arg(TOKENIZER_CONFIG[order], arg),
                                        "--workdir", workdir, *overrides(run, f"seed={run.args.seed}", *quick)))
        if run.results.get(key) is None:   # measured once: a finished tokenizer does not change
            out[key] = {**measure_tokenizer(workdir, run.args.recon_images), "workdir": workdir,
                        **final_tokenizer_metrics(workdir)}
            run.results[key] = out[key]
            run.save()
            print(f"[reproduce] {key}: " + json.dumps({k: out[key][k] for k in ("psnr", "recon_accuracy")}),
                  flush=True)
    return out


def final_tokenizer_metrics(workdir) -> dict:
    """The training run's last step and its last logged held-out PSNR and code usage, where it logged them."""
    from var_jax.train.workdir import read_metrics
    records = read_metrics(workdir)
    last = {k: v for r in records for k, v in r.items() if k in ("val/psnr", "val/code_usage")}
    return {"steps": max((int(r.get("step", 0)) for r in records), default=0),
            "train_val_psnr": last.get("val/psnr"), "train_val_code_usage": last.get("val/code_usage")}


def stage_tokenize(run: Run) -> dict:
    for order in ORDERS:
        checkpoint = run.path_of(TOKENIZER_DIR[order])
        config = with_arg(VAR_CONFIG[order], tokenizer_shape(run, order))
        for split, count in (("train", pool_images(run.args)), ("val", run.args.eval_images)):
            run.command(var_jax_command("tokenize", "--checkpoint", checkpoint, "--config", config,
                                        "--out", token_dir(run, order, split), "--count", count,
                                        *(["--split", "val"] if split == "val" else [])))
    return {"tokens": {order: {split: token_dir(run, order, split) for split in ("train", "val")}
                       for order in ORDERS}}


def token_overrides(run: Run, order: str) -> list[str]:
    return ["data.name=tokens", f"data.dir={token_dir(run, order, 'train')}",
            f"data.eval_dir={token_dir(run, order, 'val')}"]


def sweep_dir(run: Run) -> str:
    return run.path_of("sweep")


def stage_sweep(run: Run) -> None:
    a = run.args
    run.command(python("launch/sweep.py", "--config", with_arg(VAR_CONFIG["scale"], tokenizer_shape(run, "scale")),
                       "--depths", ",".join(map(str, a.depths)), "--sweep-dir", sweep_dir(run),
                       *overrides(run, f"tokenizer_checkpoint={run.path_of(TOKENIZER_DIR['scale'])}",
                                  f"total_steps={a.sweep_steps}", f"batch_size={a.batch}",
                                  f"eval_every={a.eval_every}", f"seed={a.seed}", *token_overrides(run, "scale"))))


def scaling_json(run: Run) -> Path:
    return Path(sweep_dir(run)) / "scaling" / "scaling.json"


def stage_scaling(run: Run) -> dict:
    run.command(var_jax_command("scaling", "--sweep", sweep_dir(run), "--require-held-out"))
    return {"scaling": json.loads(scaling_json(run).read_text())}


def ablations_dir(run: Run) -> str:
    return run.path_of("ablations")


def stage_ablations(run: Run) -> dict:
    a = run.args
    shared_var = a.ablation_depth in a.depths and a.ablation_steps == a.sweep_steps
    run.command(python(
        "launch/ablations.py", "--tokenizer", run.path_of(TOKENIZER_DIR["scale"]),
        "--raster-tokenizer", run.path_of(TOKENIZER_DIR["raster"]), "--out", ablations_dir(run),
        "--tokens", token_dir(run, "scale", "train"), "--eval-tokens", token_dir(run, "scale", "val"),
        "--raster-tokens", token_dir(run, "raster", "train"), "--raster-eval-tokens", token_dir(run, "raster", "val"),
        "--steps", a.ablation_steps, "--depth", a.ablation_depth, "--num-samples", a.num_samples,
        "--num-refs", a.num_refs, "--seed", a.seed,
        *(["--var-run", f"{sweep_dir(run)}/d{a.ablation_depth}"] if shared_var else []),
        *overrides(run, f"batch_size={a.batch}")))
    table = json.loads((Path(ablations_dir(run)) / "table3.json").read_text())
    return {"table3": table["rows"], "table3_meta": table["meta"], "table3_real": table["real"]}


def stage_report(run: Run) -> None:
    run.command(python("launch/report.py", str(run.out)))


STAGE_FUNCTIONS = {"tokenizers": stage_tokenizers, "tokenize": stage_tokenize, "sweep": stage_sweep,
                   "scaling": stage_scaling, "ablations": stage_ablations, "report": stage_report}
# whether a stage's outputs are still there (a stage recorded as done whose outputs were removed runs again)
OUTPUTS = {
    "tokenizers": lambda run: all(finished(run.path_of(TOKENIZER_DIR[o])) and run.results.get(TOKENIZER_RESULT[o])
                                  for o in ORDERS),
    "tokenize": lambda run: all(os.path.isdir(token_dir(run, o, s)) for o in ORDERS for s in ("train", "val")),
    "sweep": lambda run: all(finished(f"{sweep_dir(run)}/d{d}") for d in run.args.depths),
    "scaling": lambda run: scaling_json(run).exists() and "scaling" in run.results,
    "ablations": lambda run: (Path(ablations_dir(run)) / "table3.json").exists() and "table3" in run.results,
    "report": lambda run: False,    # cheap: always rewritten from the results
}


def environment() -> dict:
    import platform

    import jax
    device = jax.devices()[0]
    return {"device": f"{device.platform} ({getattr(device, 'device_kind', '')})", "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run = Run(args)
    run.check_settings()
    run.results.setdefault("environment", environment())
    run.save()
    for stage in STAGES:
        if stage not in args.stages:
            continue
        if run.done(stage):
            print(f"[reproduce] {stage}: done before, skipped", flush=True)
            continue
        missing = [s for s in STAGES[:STAGES.index(stage)] if s != "report" and not run.done(s)
                   and s not in args.stages]
        if missing:
            raise CommandError(f"stage {stage} needs stage(s) {','.join(missing)} first (add them to --stages)")
        try:
            run.run_stage(stage)
        except StageFailed as failure:
            return failure.status
    print(f"[reproduce] results in {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_command_error("launch/reproduce.py", main))
