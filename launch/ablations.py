#!/usr/bin/env python
"""The paper's Table 3 on the procedural shapes data: next-scale VAR against its ablations, on one code path.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python -m var_jax train --config configs/shapes_raster.py:stage=tokenizer --workdir workdirs/shapes_raster_tokenizer
    python launch/ablations.py --tokenizer workdirs/shapes_tokenizer \
        --raster-tokenizer workdirs/shapes_raster_tokenizer --out workdirs/ablations --steps 300 --depth 2

Variants (each an ordinary `train` workdir DIR/<name>; a run whose model is exported, DIR/<name>/model/config.json,
is skipped, an interrupted one resumes from its checkpoint):

    var            next-scale VAR (configs/shapes_var.py), AdaLN
    var_noadaln    the same with --config.model.adaln=False
    raster         raster-order AR (configs/shapes_raster.py, order='raster') over the single-scale tokenizer, AdaLN
    raster_noadaln raster AR without AdaLN (--no-raster-noadaln leaves it out)

All have the same depth (heads = depth). Parameters: the AdaLN rows keep the reference width 64·depth; the
w/o-AdaLN rows drop the AdaLN projections (about a third of a block's weights), so by default their width is
raised to the multiple of 2·heads whose non-embedding parameter count is nearest the AdaLN row's of the same order
(--same-width keeps 64·depth instead). The table reports the counts as they come out (non-embedding and total).

For each exported model: the final held-out loss (val/loss over all tokens, val/loss_last over the last scale;
the raster rows' losses are over the 16 tokens of a single-scale tokenizer, the scale rows' over the 30 tokens of
the multi-scale one: the two groups are not comparable with each other, only within a group); NUM_SAMPLES
class-conditional samples (classes in turn) in batches of 32 with one compiled Sampler; FID, precision and recall
(k = 3) in the shapes classifier's feature space (var_jax/eval/shapes_classifier.shape_features: outline features
invariant to colour, position, size and rotation) against NUM_REFS held-out real shapes (the 'val' split, centre
crops, as the pipeline renders them; indices from REF_START so they do not overlap the classifier's own held-out
images); the class accuracy of the samples by the shapes classifier; sampling seconds per image: the mean wall
time of the warm batches (the first batch, which compiles, is excluded; every batch is the same shape) / 32.
A reference row gives the same metrics for held-out real shapes against the references (the floor of FID here).

Writes DIR/table3.md (markdown) and DIR/table3.json, and DIR/<name>/ablation_samples.png (the first samples, one
column per class) to look at.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))   # so that a checkout that is not pip-installed still imports var_jax

from var_jax.cli.common import exit_on_command_error  # noqa: E402
from var_jax.cli.train import parse_args_with_overrides  # noqa: E402
from var_jax.train.workdir import Workdir  # noqa: E402

MODEL_CONFIG = Path("model") / "config.json"
SAMPLE_BATCH = 32
REF_START = 2000          # first held-out index of the FID references (the classifier holds out [0, 1000))
REFERENCE_WIDTH_PER_DEPTH = 64

# name -> (description, order, adaln)
VARIANTS = {
    "raster": ("AR (raster order, next-token)", "raster", True),
    "raster_noadaln": ("AR (raster order) w/o AdaLN", "raster", False),
    "var_noadaln": ("VAR (next-scale) w/o AdaLN", "scale", False),
    "var": ("VAR (next-scale)", "scale", True),
}
CONFIGS = {"scale": "configs/shapes_var.py", "raster": "configs/shapes_raster.py"}
TOKEN_SETS = {"scale": "multi-scale tokens (1,2,3,4): 30 per image",
              "raster": "single-scale tokens (4x4): 16 per image"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="launch/ablations.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="multi-scale shapes tokenizer (workdir or model dir)")
    parser.add_argument("--raster-tokenizer", required=True,
                        help="single-scale tokenizer (configs/shapes_raster.py:stage=tokenizer)")
    parser.add_argument("--out", required=True, help="one workdir per variant under it; table3.md / .json")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every variant")
    parser.add_argument("--depth", type=int, default=2, help="depth of every variant (heads = depth)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="held-out evaluation interval (default: total steps, i.e. at the end only; 0: off, the "
                             "loss columns then come from the training loss, see var_jax/eval/scaling.py)")
    parser.add_argument("--same-width", action="store_true",
                        help="w/o-AdaLN rows keep width 64·depth (fewer parameters) instead of a matched width")
    parser.add_argument("--no-raster-noadaln", action="store_true", help="leave out the raster w/o AdaLN row")
    parser.add_argument("--num-samples", type=int, default=320, help="samples per variant (a multiple of 32)")
    parser.add_argument("--num-refs", type=int, default=1000, help="held-out real shapes as FID references")
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale of the samples")
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true", help="train nothing; evaluate the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the train commands; run nothing")
    args = parse_args_with_overrides(parser, argv)
    if args.num_samples < SAMPLE_BATCH * 2 or args.num_samples % SAMPLE_BATCH:
        parser.error(f"--num-samples must be a multiple of {SAMPLE_BATCH}, at least {2 * SAMPLE_BATCH}")
    return args


# ---- parameters -----------------------------------------------------------------------------------------------

def _var_dict(depth: int, width: int, order: str, adaln: bool, vocab: int, latent_ch: int, patch_nums,
              num_classes: int) -> dict:
    from var_jax.transformer import VARConfig
    import dataclasses
    cfg = VARConfig(depth=depth, width=width, heads=depth, vocab_size=vocab, z_channels=latent_ch,
                    patch_nums=tuple(patch_nums), num_classes=num_classes, adaln=adaln, order=order)
    return dataclasses.asdict(cfg)


def matched_width(depth: int, order: str, tok_info: dict, num_classes: int) -> int:
    """The width (multiple of 2·heads) of the w/o-AdaLN model whose non-embedding parameters are nearest the
    AdaLN model's at width 64·depth."""
    from var_jax.eval.scaling import non_embedding_params
    common = dict(vocab=tok_info["vocab"], latent_ch=tok_info["latent_ch"], patch_nums=tok_info["patch_nums"],
                  num_classes=num_classes)
    base = REFERENCE_WIDTH_PER_DEPTH * depth
    target = non_embedding_params(_var_dict(depth, base, order, True, **common))[0]
    step = 2 * depth
    guess = base * math.sqrt(1.5)                 # block: 18 w² with AdaLN, 12 w² without
    candidates = sorted({max(step, int(round(guess / step)) * step + k * step) for k in range(-3, 4)})
    return min(candidates, key=lambda w: abs(non_embedding_params(_var_dict(depth, w, order, False, **common))[0]
                                             - target))


def tokenizer_info(path) -> dict:
    from var_jax.checkpoints import read_model_config
    path = Path(path)
    model_dir = path / "model" if (path / "model" / "config.json").exists() else path
    tok = read_model_config(model_dir)["tokenizer"]
    return {"vocab": tok["vocab_size"], "latent_ch": tok["z_channels"], "patch_nums": tuple(tok["patch_nums"])}


# ---- training -------------------------------------------------------------------------------------------------

def variant_names(args) -> list[str]:
    return [n for n in VARIANTS if not (n == "raster_noadaln" and args.no_raster_noadaln)]


def train_command(args, name: str, width: int) -> list[str]:
    _, order, adaln = VARIANTS[name]
    tokenizer = args.raster_tokenizer if order == "raster" else args.tokenizer
    return [sys.executable, "-m", "var_jax", "train", "--config", f"{CONFIGS[order]}:depth={args.depth}",
            "--workdir", str(Path(args.out) / name),
            f"--config.tokenizer_checkpoint={tokenizer}", f"--config.total_steps={args.steps}",
            f"--config.eval_every={args.steps if args.eval_every is None else args.eval_every}", f"--config.model.adaln={adaln}",
            f"--config.model.width={width}", f"--config.model.heads={args.depth}",
            *[f"--config.{item}" for item in args.overrides]]


# ---- evaluation -----------------------------------------------------------------------------------------------

def reference_features(num_refs: int, resolution: int, start: int = REF_START):
    import numpy as np
    from var_jax.eval.shapes_classifier import render_like_pipeline, shape_features
    images = render_like_pipeline(np.arange(start, start + num_refs), resolution, train=False)
    return images, shape_features(images)


def feature_scores(ref_features, features) -> dict:
    import numpy as np
    from var_jax.eval.feature_metrics import frechet_distance, precision_recall
    ref = np.asarray(ref_features, np.float64)
    smp = np.asarray(features, np.float64)
    fid = frechet_distance(ref.mean(0), np.cov(ref, rowvar=False), smp.mean(0), np.cov(smp, rowvar=False))
    precision, recall = precision_recall(ref, smp)
    return {"fid": float(fid), "precision": precision, "recall": recall}


def evaluate_variant(args, name: str, ref_features, classifier) -> dict:
    import numpy as np
    from var_jax.checkpoints import load_model_dir
    from var_jax.eval.scaling import collect_run
    from var_jax.eval.shapes_classifier import shape_features
    from var_jax.sample import SampleOptions
    from var_jax.sample.runner import Sampler

    run_dir = Path(args.out) / name
    point = collect_run(run_dir)
    bundle = load_model_dir(run_dir / "model")
    sampler = Sampler(bundle, SampleOptions(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p))
    num_classes = bundle.var_config.num_classes
    labels = np.arange(args.num_samples) % num_classes
    images, times = [], []
    for start in range(0, args.num_samples, SAMPLE_BATCH):
        ids = np.arange(start, start + SAMPLE_BATCH)
        t0 = time.perf_counter()
        out = sampler(labels[ids], image_ids=ids, seed=args.seed)   # returns host arrays: the work is done
        times.append(time.perf_counter() - t0)
        images.append(out["images"])
    images = np.concatenate(images)
    from var_jax.images import save_grid
    save_grid(run_dir / "ablation_samples.png", images[:4 * num_classes], columns=num_classes)   # to look at
    warm = times[1:]
    _, order, adaln = VARIANTS[name]
    row = {"name": name, "description": VARIANTS[name][0], "order": order, "adaln": adaln,
           "depth": point["depth"], "width": point["width"], "params": point["params"],
           "params_total": point["params_total"], "steps": point["steps"],
           "val_loss": point["val_loss"], "val_loss_last": point["val_loss_last"], "loss_source": point["source"],
           "token_set": TOKEN_SETS[order], "num_samples": int(len(images)),
           "accuracy": float(classifier.accuracy(images, labels)),
           "sec_per_image": float(np.mean(warm)) / SAMPLE_BATCH, "first_batch_sec": times[0]}
    row.update(feature_scores(ref_features, shape_features(images)))
    return row


def real_row(args, ref_features, classifier, resolution: int) -> dict:
    """Held-out real shapes (disjoint from the references) scored like the samples: the floor of each metric."""
    import numpy as np
    from var_jax.data import shapes
    start = REF_START + args.num_refs
    images, features = reference_features(args.num_samples, resolution, start)
    labels = np.array([shapes.label_of(i) for i in range(start, start + args.num_samples)])
    row = {"name": "real", "description": "held-out real shapes (reference)", "order": "", "adaln": None,
           "params": None, "params_total": None, "val_loss": None, "val_loss_last": None,
           "num_samples": args.num_samples, "accuracy": float(classifier.accuracy(images, labels)),
           "sec_per_image": None}
    row.update(feature_scores(ref_features, features))
    return row


# ---- the table ------------------------------------------------------------------------------------------------

def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def loss_cell(row: dict, reference_order: str = "scale") -> str:
    """The held-out loss cell: the value, and for the rows whose tokens differ from the reference order's the
    note that it is not comparable with them."""
    if row.get("val_loss") is None:
        return "–"
    text = f"{row['val_loss']:.3f}" + ("†" if row.get("loss_source") == "train" else "")
    if row.get("order") != reference_order:
        text += " (raster tokens: not comparable)"
    return text


def make_table(rows: list[dict], meta: dict) -> str:
    """Markdown in the layout of the paper's Table 3 (one row per variant, the last row the full VAR; Δ = FID
    minus the first model row's, as the paper's Δ is against its AR baseline)."""
    header = ["#", "Description", "Order", "AdaLN", "Depth", "Width", "Params (non-emb.)", "Params (total)",
              "Held-out loss", "Last-scale loss", "FID", "Δ FID", "Precision", "Recall", "Class acc.",
              "s / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    model_rows = [r for r in rows if r.get("params") is not None]
    base_fid = model_rows[0]["fid"] if model_rows and model_rows[0].get("fid") is not None else None
    number = 0
    for row in rows:
        is_model = row.get("params") is not None
        if is_model:
            number += 1
        delta = (f"{row['fid'] - base_fid:+.2f}" if is_model and base_fid is not None and row.get("fid") is not None
                 else "–")
        adaln = {True: "✓", False: "✗", None: "–"}[row.get("adaln")]
        cells = [str(number) if is_model else "–", row["description"], row.get("order") or "–", adaln,
                 _fmt(row.get("depth"), "d"), _fmt(row.get("width"), "d"),
                 _params(row.get("params")), _params(row.get("params_total")),
                 loss_cell(row), _fmt(row.get("val_loss_last"), ".3f") + ("†" if row.get("loss_source") == "train" and
                                                          row.get("val_loss_last") is not None else ""),
                 _fmt(row.get("fid"), ".2f"), delta, _fmt(row.get("precision"), ".3f"),
                 _fmt(row.get("recall"), ".3f"), _fmt(row.get("accuracy"), ".1%"),
                 _fmt(row.get("sec_per_image"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Shapes 32 px, {meta.get('steps', '?')} training steps per variant at batch {meta.get('batch', '?')}, "
        f"depth {meta.get('depth', '?')} (heads = depth). "
        + ("The w/o-AdaLN rows are widened to match the AdaLN rows' non-embedding parameters. "
           if meta.get("matched_width") else "All rows at width 64·depth. "),
        "Held-out loss: final `val/loss` (cross-entropy over all tokens of an image); last-scale loss: `val/loss_last`."
        " Scale rows are over " + TOKEN_SETS["scale"] + "; raster rows over " + TOKEN_SETS["raster"]
        + " of another tokenizer: the losses compare within a group only (raster order has one scale, so its"
        " last-scale loss is its loss)."
        + (" †: no held-out evaluation in this run (eval_every=0); the mean training loss (`Lm`, `Lt`) of the last"
           " logged steps instead, as `python -m var_jax scaling` falls back to: the procedural data never repeats,"
           " so each training batch is unseen when its loss is taken."
           if any(r.get("loss_source") == "train" for r in rows) else ""),
        f"FID / precision / recall (k = 3): {meta.get('num_samples', '?')} samples (classes in turn, cfg "
        f"{meta.get('cfg', '?')}, top-k {meta.get('top_k', '?')}, top-p {meta.get('top_p', '?')}) against "
        f"{meta.get('num_refs', '?')} held-out real shapes, in the shapes classifier's outline-feature space "
        "(var_jax/eval/shapes_classifier.shape_features), not Inception: the numbers are on their own scale. "
        "Class acc.: the shapes classifier's accuracy on the samples' requested classes. "
        "Δ FID: against row 1.",
        f"s / image: mean wall time of a warm, jitted batch of {SAMPLE_BATCH} / {SAMPLE_BATCH} "
        f"on {meta.get('device', '?')} (first, compiling batch excluded; the machine was shared with other jobs).",
    ]
    return "\n".join(lines + notes) + "\n"


# ---- main -----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    names = variant_names(args)
    # widths are needed for the commands, dry run included
    from var_jax.data import shapes
    infos = {"scale": tokenizer_info(args.tokenizer), "raster": tokenizer_info(args.raster_tokenizer)}
    widths = {}
    for name in names:
        _, order, adaln = VARIANTS[name]
        base = REFERENCE_WIDTH_PER_DEPTH * args.depth
        widths[name] = base if adaln or args.same_width else matched_width(
            args.depth, order, infos[order], shapes.NUM_CLASSES)
    wall = {}
    if not args.table_only:
        for name in names:
            command = train_command(args, name, widths[name])
            if Workdir.at(out / name).finished():
                print(f"[ablations] {name}: finished ({MODEL_CONFIG} exists), skipped", flush=True)
                continue
            print(("" if args.dry_run else "[ablations] ") + shlex.join(command), flush=True)
            if args.dry_run:
                continue
            t0 = time.time()
            status = subprocess.call(command, cwd=REPO_ROOT)
            wall[name] = time.time() - t0
            if status:
                print(f"[ablations] {name} failed (exit status {status}); rerun the same command to resume",
                      file=sys.stderr)
                return status
            print(f"[ablations] {name}: trained in {wall[name]:.0f} s", flush=True)
    if args.dry_run:
        return 0

    import jax
    from var_jax.eval.shapes_classifier import shapes_classifier
    resolution = 32
    t0 = time.time()
    classifier = shapes_classifier(resolution)
    _, ref_features = reference_features(args.num_refs, resolution)
    rows = [real_row(args, ref_features, classifier, resolution)]
    print(f"[ablations] classifier and references ready in {time.time() - t0:.0f} s", flush=True)
    for name in names:
        if not Workdir.at(out / name).finished():
            print(f"[ablations] {name}: no exported model, left out of the table", file=sys.stderr)
            continue
        t0 = time.time()
        row = evaluate_variant(args, name, ref_features, classifier)
        if name in wall:
            row["train_wall_sec"] = wall[name]
        rows.append(row)
        print(f"[ablations] {name}: evaluated in {time.time() - t0:.0f} s: "
              + json.dumps({k: row[k] for k in ("params", "val_loss", "fid", "precision", "recall", "accuracy",
                                                "sec_per_image")}), flush=True)
    model_rows = [r for r in rows if r["name"] != "real"]
    batch = json.loads(Workdir.at(out / names[0]).train_config.read_text())["batch_size"] if model_rows else None
    device = jax.devices()[0]
    meta = {"steps": args.steps, "depth": args.depth, "batch": batch, "matched_width": not args.same_width,
            "num_samples": args.num_samples, "num_refs": args.num_refs, "cfg": args.cfg, "top_k": args.top_k,
            "top_p": args.top_p, "device": f"{device.platform} ({getattr(device, 'device_kind', '')})"}
    ordered = model_rows + [r for r in rows if r["name"] == "real"]
    (out / "table3.md").write_text(make_table(ordered, meta))
    (out / "table3.json").write_text(json.dumps({"meta": meta, "rows": ordered}, indent=2) + "\n")
    print((out / "table3.md").read_text())
    print(f"[ablations] wrote {out / 'table3.md'} and {out / 'table3.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_command_error("launch/ablations.py", main))
