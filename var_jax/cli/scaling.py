"""Scaling laws of a sweep: parameters, compute and held-out loss per run, power-law fits, plots.

    python launch/sweep.py --config configs/shapes_var.py --depths 2,3,4,5 --sweep-dir workdirs/shapes_sweep
    python -m var_jax scaling --sweep workdirs/shapes_sweep            # -> workdirs/shapes_sweep/scaling/

Reads every run directory under --sweep that has exported its model (RUN/model/config.json) and writes
OUT/scaling.json (points, fits keyed METRIC~X with alpha, beta, r, alpha_ci, the compute Pareto frontier) and
OUT/scaling_params.{png,pdf}, OUT/scaling_flops.{png,pdf}. Definitions: var_jax/eval/scaling.py.
"""
import argparse


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--sweep", required=True, help="sweep directory: one training workdir per model size")
    parser.add_argument("--out", default=None, help="output directory (default: SWEEP/scaling)")
    parser.add_argument("--no-plots", action="store_true", help="write scaling.json only")
    parser.add_argument("--require-held-out", action="store_true",
                        help="refuse a sweep with a run that logged no held-out metrics (source 'train')")


def run(args):
    from var_jax.cli.common import CommandError
    from var_jax.paths import user_path

    sweep = user_path(args.sweep)
    if not sweep.is_dir():
        raise CommandError(f"--sweep: no directory {sweep}")
    out = user_path(args.out) if args.out else sweep / "scaling"

    from var_jax.checkpoints import CheckpointError
    from var_jax.eval import scaling
    try:
        runs = scaling.find_runs(sweep)
        if not runs:
            raise CommandError(f"--sweep: no finished runs under {sweep} (a run counts once it has exported "
                               f"RUN/{scaling.MODEL_DIR}/config.json and has logged metrics)")
        report = scaling.scaling_report(sweep)
        without = [p["run"] for p in report["points"] if p["source"] != "val"]
        if args.require_held_out and without:
            raise CommandError(f"--require-held-out: run(s) {', '.join(without)} logged no held-out val/loss "
                               "(train with eval_every > 0)")
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        raise CommandError(" ".join(str(e).split())) from None
    path = scaling.write_report(report, out)
    plots = [] if args.no_plots else scaling.write_plots(report, out)
    for p in report["points"]:
        print(f"{p['run']}: depth {p['depth']}, N = {p['params']:.4g}, C = {p['flops']:.4g}, "
              f"loss {p['val_loss']}, last-scale loss {p['val_loss_last']} ({p['source']})")
    for key, fit in report["fits"].items():
        x = key.partition("~")[2]
        print(f"{key}: {scaling.fit_formula(fit, x)}, alpha 95% CI [{fit['alpha_ci'][0]:.3g}, "
              f"{fit['alpha_ci'][1]:.3g}] over {fit['n']} runs")
    if report["source"] != "val":
        print("note: no held-out val/... metrics in some runs: their points use training metrics (source 'train')")
    print(f"wrote {path}" + "".join(f", {p.name}" for p in plots))
