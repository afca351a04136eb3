#!/usr/bin/env python
"""The paper's Table 3 on the procedural shapes data: raster AR, next-scale VAR, VAR w/o AdaLN, and the sampling
additions the paper stacks on VAR (top-k, then classifier-free guidance), on one code path.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python -m var_jax train --config configs/shapes_raster.py:stage=tokenizer --workdir workdirs/shapes_raster_tokenizer
    python launch/ablations.py --tokenizer workdirs/shapes_tokenizer \
        --raster-tokenizer workdirs/shapes_raster_tokenizer --out workdirs/ablations --steps 300 --depth 2
    # from pre-tokenized data (python -m var_jax tokenize), as launch/reproduce.py runs it:
    python launch/ablations.py ... --tokens TOK_TRAIN --eval-tokens TOK_VAL \
        --raster-tokens RASTER_TRAIN --raster-eval-tokens RASTER_VAL

Trained models (each an ordinary `train` workdir DIR/<name>; a run whose model is exported, DIR/<name>/model/
config.json, is skipped, an interrupted one resumes from its checkpoint; finished workdirs under the old names
var_noadaln / raster_noadaln are used as they are):

    var              next-scale VAR (configs/shapes_var.py), AdaLN
    var_no_adaln     the same with --config.model.adaln=False
    raster           raster-order AR (configs/shapes_raster.py, order='raster') over the single-scale tokenizer, AdaLN
    raster_no_adaln  raster AR without AdaLN (--no-raster-no-adaln leaves it out)

--var-run DIR takes a finished workdir of the same config and steps (a sweep's run of this depth) as `var`. The
configs get the tokenizers' image size and last token-map side (config arguments image_size, latent).

Table rows (variant: model, sampling). As in the paper, the model rows sample from the model's own distribution
(no top-k, no guidance), and the last two rows add the sampling tricks to the trained `var` model:

    raster, raster_no_adaln, var_no_adaln, var   plain sampling
    var_topk                                     + top-k (k = --top-k; default the reference's share of the
                                                   vocabulary, 900 of 4,096 codes: 112 of 512)
    var_topk_cfg                                 + top-k + classifier-free guidance (--cfg, default the reference's
                                                   FID scale 1.5, ramped linearly over the scales / tokens)

All trained models have the same depth (heads = depth). Parameters: the AdaLN rows keep the reference width
64·depth; the w/o-AdaLN rows drop the AdaLN projections (about a third of a block's weights), so by default their
width is raised to the multiple of 2·heads whose non-embedding parameter count is nearest the AdaLN row's of the
same order (--same-width keeps 64·depth instead). The table reports the counts as they come out.

For each row: the trained model's final held-out loss (val/loss over all tokens, val/loss_last over the last
scale; the raster rows' losses are over the latent² tokens of a single-scale tokenizer, the scale rows' over
every scale of the multi-scale one, e.g. 16 and 30 at latent 4: comparable only within a group); NUM_SAMPLES class-conditional samples (classes in
turn) in batches of 32 with one compiled Sampler; FID, precision and recall (k = 3) in the shapes classifier's
feature space (var_jax/eval/shapes_classifier.shape_features: outline features invariant to colour, position, size
and rotation) against NUM_REFS held-out real shapes (the 'val' split, centre crops, as the pipeline renders them;
indices from REF_START, after the classifier's own held-out images); `fid_noise_floor`: the FID of NUM_SAMPLES
other held-out real shapes (disjoint from the references) against the same references, the real-vs-real floor a
model's FID can reach at this sample size; the class accuracy of the samples by the shapes classifier; s_per_image:
the mean wall time of the warm full batches (the first batch, which compiles, is excluded) / 32.

Writes DIR/table3.md (markdown), DIR/table3.json ({'meta', 'rows', 'real'}), DIR/samples/<variant>.png (the first
samples, one column per class) and DIR/rows/<variant>.json (a finished row, reused by a rerun with the same
settings). --seed sets every model's training seed and the sample seed; the data are the same for every seed.
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

from var_jax.cli.common import CommandError, exit_on_command_error  # noqa: E402
from var_jax.cli.train import parse_args_with_overrides  # noqa: E402
from var_jax.train.workdir import Workdir  # noqa: E402

MODEL_CONFIG = Path("model") / "config.json"
SAMPLE_BATCH = 32
REF_START = 2000          # first held-out index of the FID references (the classifier holds out [0, 1000))
REFERENCE_WIDTH_PER_DEPTH = 64
REFERENCE_TOP_K_SHARE = 900 / 4096   # the reference FID setting keeps the top 900 of its 4,096 codes
REFERENCE_CFG = 1.5                  # the reference FID setting's guidance scale (linear ramp)

# trained model -> (order, adaln)
MODELS = {"raster": ("raster", True), "raster_no_adaln": ("raster", False), "var_no_adaln": ("scale", False),
          "var": ("scale", True)}
LEGACY_RUN_NAMES = {"raster_no_adaln": "raster_noadaln", "var_no_adaln": "var_noadaln"}
# table row (variant) -> (description, trained model, sampling)
VARIANTS = {
    "raster": ("AR (raster order, next-token)", "raster", "plain"),
    "raster_no_adaln": ("AR (raster order) w/o AdaLN", "raster_no_adaln", "plain"),
    "var_no_adaln": ("VAR (next-scale) w/o AdaLN", "var_no_adaln", "plain"),
    "var": ("VAR (next-scale)", "var", "plain"),
    "var_topk": ("VAR + top-k", "var", "top_k"),
    "var_topk_cfg": ("VAR + top-k + CFG", "var", "top_k_cfg"),
}
CONFIGS = {"scale": "configs/shapes_var.py", "raster": "configs/shapes_raster.py"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="launch/ablations.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="multi-scale shapes tokenizer (workdir or model dir)")
    parser.add_argument("--raster-tokenizer", required=True,
                        help="single-scale tokenizer (configs/shapes_raster.py:stage=tokenizer)")
    parser.add_argument("--out", required=True, help="one workdir per model under it; table3.md / .json")
    parser.add_argument("--tokens", help="pre-tokenized training pool of --tokenizer (python -m var_jax tokenize)")
    parser.add_argument("--eval-tokens", help="pre-tokenized held-out set of --tokenizer (with --tokens)")
    parser.add_argument("--raster-tokens", help="pre-tokenized training pool of --raster-tokenizer")
    parser.add_argument("--raster-eval-tokens", help="pre-tokenized held-out set of --raster-tokenizer")
    parser.add_argument("--var-run", help="a finished training workdir of the same config and steps to use as the "
                                          "`var` model instead of training one (a sweep's run of this depth)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every model")
    parser.add_argument("--depth", type=int, default=2, help="depth of every model (heads = depth)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="held-out evaluation interval (default: total steps, i.e. at the end only; 0: off, the "
                             "loss columns then come from the training loss, see var_jax/eval/scaling.py)")
    parser.add_argument("--same-width", action="store_true",
                        help="w/o-AdaLN rows keep width 64·depth (fewer parameters) instead of a matched width")
    parser.add_argument("--no-raster-no-adaln", "--no-raster-noadaln", dest="no_raster_no_adaln",
                        action="store_true", help="leave out the raster w/o AdaLN row")
    parser.add_argument("--num-samples", type=int, default=1000, help=f"samples per row (>= {2 * SAMPLE_BATCH})")
    parser.add_argument("--num-refs", type=int, default=1000, help="held-out real shapes as FID references")
    parser.add_argument("--top-k", type=int, default=None,
                        help="k of the top-k rows (default: round(900/4096 · vocabulary), the reference's share)")
    parser.add_argument("--cfg", type=float, default=REFERENCE_CFG, help="guidance scale of the CFG row")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every model and the sample seed")
    parser.add_argument("--table-only", action="store_true", help="train nothing; evaluate the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the train commands; run nothing")
    args = parse_args_with_overrides(parser, argv)
    if args.num_samples < 2 * SAMPLE_BATCH:
        parser.error(f"--num-samples must be at least {2 * SAMPLE_BATCH} (one compiling and one warm batch)")
    from var_jax.data import shapes
    if REF_START + args.num_refs + args.num_samples > shapes.HELD_OUT_SIZE:
        parser.error(f"--num-refs + --num-samples must be at most {shapes.HELD_OUT_SIZE - REF_START} (references "
                     "and the noise-floor set are disjoint held-out shapes)")
    for train, val in (("tokens", "eval_tokens"), ("raster_tokens", "raster_eval_tokens")):
        if (getattr(args, train) is None) != (getattr(args, val) is None):
            parser.error(f"--{train.replace('_', '-')} and --{val.replace('_', '-')} go together")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if not math.isfinite(args.cfg) or args.cfg <= 0:
        parser.error(f"--cfg must be a finite number > 0, got {args.cfg}")
    return args


# ---- parameters -----------------------------------------------------------------------------------------------

def _var_dict(depth: int, width: int, order: str, adaln: bool, vocab: int, latent_ch: int, patch_nums,
              num_classes: int, **fields) -> dict:
    """The VARConfig of a row as a dict; `fields`: further VARConfig fields (e.g. head, launch/bitwise_ablations.py)."""
    from var_jax.transformer import VARConfig
    import dataclasses
    cfg = VARConfig(depth=depth, width=width, heads=depth, vocab_size=vocab, z_channels=latent_ch,
                    patch_nums=tuple(patch_nums), num_classes=num_classes, adaln=adaln, order=order, **fields)
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
    from var_jax.checkpoints import CheckpointError, read_model_config
    path = Path(path)
    model_dir = path / "model" if (path / "model" / "config.json").exists() else path
    try:
        tok = read_model_config(model_dir)["tokenizer"]
    except CheckpointError as e:
        raise CommandError(str(e)) from None
    if tok is None:
        raise CommandError(f"{path}: holds no tokenizer")
    from var_jax.tokenizer.config import TokenizerConfig
    return {"vocab": tok["vocab_size"], "latent_ch": tok["z_channels"], "patch_nums": tuple(tok["patch_nums"]),
            "image_size": TokenizerConfig.from_dict(tok).image_size}


def token_set(info: dict) -> str:
    """'multi-scale tokens (1,2,3,4): 30 per image' / 'single-scale tokens (4x4): 16 per image'."""
    patch_nums = info["patch_nums"]
    count = sum(p * p for p in patch_nums)
    if len(patch_nums) == 1:
        return f"single-scale tokens ({patch_nums[0]}x{patch_nums[0]}): {count} per image"
    return f"multi-scale tokens ({','.join(map(str, patch_nums))}): {count} per image"


def default_top_k(vocab: int) -> int:
    return max(1, round(REFERENCE_TOP_K_SHARE * vocab))


# ---- training -------------------------------------------------------------------------------------------------

def model_names(args) -> list[str]:
    return [n for n in MODELS if not (n == "raster_no_adaln" and args.no_raster_no_adaln)]


def variant_names(args) -> list[str]:
    models = set(model_names(args))
    return [v for v, (_, model, _) in VARIANTS.items() if model in models]


def run_dir(args, name: str) -> Path:
    """DIR/<name> (--var-run for `var`), or a finished workdir under the model's old name when only that exists."""
    if name == "var" and args.var_run:
        return Path(args.var_run)
    out = Path(args.out)
    path = out / name
    legacy = LEGACY_RUN_NAMES.get(name)
    if legacy and not path.exists() and Workdir.at(out / legacy).finished():
        return out / legacy
    return path


def token_data_overrides(train_dir, eval_dir) -> list[str]:
    """The train overrides that read pre-tokenized shards (python -m var_jax tokenize) instead of images."""
    if train_dir is None:
        return []
    return ["--config.data.name=tokens", f"--config.data.dir={train_dir}", f"--config.data.eval_dir={eval_dir}"]


def train_command(args, name: str, width: int, info: dict) -> list[str]:
    """The model's `train` command; `info` (tokenizer_info of its tokenizer) gives the config's image size and
    last token map."""
    order, adaln = MODELS[name]
    tokenizer = args.raster_tokenizer if order == "raster" else args.tokenizer
    tokens = (args.raster_tokens, args.raster_eval_tokens) if order == "raster" else (args.tokens, args.eval_tokens)
    config = f"{CONFIGS[order]}:depth={args.depth},image_size={info['image_size']},latent={info['patch_nums'][-1]}"
    return [sys.executable, "-m", "var_jax", "train", "--config", config, "--workdir", str(run_dir(args, name)),
            f"--config.tokenizer_checkpoint={tokenizer}", f"--config.total_steps={args.steps}",
            f"--config.eval_every={args.steps if args.eval_every is None else args.eval_every}",
            f"--config.model.adaln={adaln}", f"--config.model.width={width}", f"--config.model.heads={args.depth}",
            f"--config.seed={args.seed}", *token_data_overrides(*tokens),
            *[f"--config.{item}" for item in args.overrides]]


# ---- evaluation -----------------------------------------------------------------------------------------------

def sampling_options(kind: str, top_k: int, cfg: float):
    """SampleOptions of a row: 'plain' draws from the model's distribution; 'top_k' keeps the top_k codes;
    'top_k_cfg' adds classifier-free guidance at scale cfg (linear ramp, the reference's)."""
    from var_jax.sample import SampleOptions
    return {"plain": SampleOptions(cfg=0.0, top_k=0, top_p=0.0),
            "top_k": SampleOptions(cfg=0.0, top_k=top_k, top_p=0.0),
            "top_k_cfg": SampleOptions(cfg=cfg, cfg_schedule="linear", top_k=top_k, top_p=0.0)}[kind]


def reference_features(num_images: int, resolution: int, start: int = REF_START):
    import numpy as np
    from var_jax.eval.shapes_classifier import render_like_pipeline, shape_features
    images = render_like_pipeline(np.arange(start, start + num_images), resolution, train=False)
    return images, shape_features(images)


def feature_scores(ref_features, features) -> dict:
    import numpy as np
    from var_jax.eval.feature_metrics import frechet_distance, precision_recall
    ref = np.asarray(ref_features, np.float64)
    smp = np.asarray(features, np.float64)
    fid = frechet_distance(ref.mean(0), np.cov(ref, rowvar=False), smp.mean(0), np.cov(smp, rowvar=False))
    precision, recall = precision_recall(ref, smp)
    return {"fid": float(fid), "precision": precision, "recall": recall}


def draw_samples(sampler, num_samples: int, num_classes: int, seed: int):
    """(uint8 images, labels, per-batch wall seconds of the full batches): classes in turn, batches of 32 (a
    short last batch runs padded to 32 and is left out of the times)."""
    import numpy as np
    labels = np.arange(num_samples) % num_classes
    images, times = [], []
    for start in range(0, num_samples, SAMPLE_BATCH):
        ids = np.arange(start, min(start + SAMPLE_BATCH, num_samples))
        t0 = time.perf_counter()
        out = sampler(labels[ids], image_ids=ids, seed=seed, pad_to=SAMPLE_BATCH)   # host arrays: the work is done
        if len(ids) == SAMPLE_BATCH:
            times.append(time.perf_counter() - t0)
        images.append(out["images"])
    return np.concatenate(images), labels, times


def row_settings(args, variant: str, top_k: int, model_fingerprint: str) -> dict:
    """What a finished row depends on: a cached row is reused only if these match."""
    _, _, kind = VARIANTS[variant]
    return {"model": model_fingerprint, "num_samples": args.num_samples, "num_refs": args.num_refs,
            "seed": args.seed, "sampling": kind, "top_k": top_k if kind != "plain" else 0,
            "cfg": args.cfg if kind == "top_k_cfg" else 0.0}


def evaluate_variant(args, variant: str, bundle, point: dict, top_k: int, ref_features, classifier,
                     floor: dict, settings: dict, token_sets: dict) -> dict:
    from var_jax.eval.shapes_classifier import shape_features
    from var_jax.images import save_grid
    from var_jax.sample.runner import Sampler
    import numpy as np

    description, model, kind = VARIANTS[variant]
    order, adaln = MODELS[model]
    options = sampling_options(kind, top_k, args.cfg)
    num_classes = bundle.var_config.num_classes
    images, labels, times = draw_samples(Sampler(bundle, options), args.num_samples, num_classes, args.seed)
    (Path(args.out) / "samples").mkdir(parents=True, exist_ok=True)
    save_grid(Path(args.out) / "samples" / f"{variant}.png", images[:4 * num_classes], columns=num_classes)
    row = {"variant": variant, "description": description, "model": model, "order": order, "adaln": adaln,
           "sampling": {"cfg": options.cfg, "cfg_schedule": options.cfg_schedule, "top_k": options.top_k,
                        "top_p": options.top_p},
           "depth": point["depth"], "width": point["width"], "params": point["params"],
           "params_total": point["params_total"], "steps": point["steps"],
           "val_loss": point["val_loss"], "val_loss_last": point["val_loss_last"], "loss_source": point["source"],
           "token_set": token_sets[order], "num_samples": int(len(images)),
           "accuracy": float(classifier.accuracy(images, labels)),
           "s_per_image": float(np.mean(times[1:])) / SAMPLE_BATCH, "first_batch_s": times[0],
           "fid_noise_floor": floor["fid"], "settings": settings}
    row.update(feature_scores(ref_features, shape_features(images)))
    return row


def real_row(args, ref_features, classifier, resolution: int) -> dict:
    """NUM_SAMPLES held-out real shapes (disjoint from the references) scored like the samples: the noise floor."""
    import numpy as np
    from var_jax.data import shapes
    start = REF_START + args.num_refs
    images, features = reference_features(args.num_samples, resolution, start)
    labels = np.array([shapes.label_of(i) for i in range(start, start + args.num_samples)])
    row = {"variant": "real", "description": "held-out real shapes (noise floor)", "order": "", "adaln": None,
           "params": None, "params_total": None, "val_loss": None, "val_loss_last": None,
           "num_samples": args.num_samples, "accuracy": float(classifier.accuracy(images, labels)),
           "s_per_image": None, "first_index": start}
    row.update(feature_scores(ref_features, features))
    row["fid_noise_floor"] = row["fid"]
    return row


# ---- the table ------------------------------------------------------------------------------------------------

def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _sampling(row: dict) -> str:
    options = row.get("sampling")
    if not options:
        return "–"
    parts = ([f"top-k {options['top_k']}"] if options.get("top_k") else []) + (
        [f"cfg {options['cfg']:g}"] if options.get("cfg") else [])
    return ", ".join(parts) or "plain"


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
    """Markdown in the layout of the paper's Table 3 (one row per variant; Δ = FID minus the first model row's,
    as the paper's Δ is against its AR baseline; a row without params, the real shapes, closes the table)."""
    header = ["#", "Description", "Order", "AdaLN", "Sampling", "Depth", "Width", "Params (non-emb.)",
              "Params (total)", "Held-out loss", "Last-scale loss", "FID", "FID floor", "Δ FID", "Precision",
              "Recall", "Class acc.", "s / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    model_rows = [r for r in rows if r.get("params") is not None]
    base_fid = model_rows[0]["fid"] if model_rows and model_rows[0].get("fid") is not None else None
    number = 0
    for row in rows:
        is_model = row.get("params") is not None
        if is_model:
            number += 1
        delta = (f"{row['fid'] - base_fid:+.3g}" if is_model and base_fid is not None and row.get("fid") is not None
                 else "–")
        adaln = {True: "✓", False: "✗", None: "–"}[row.get("adaln")]
        train_mark = "†" if row.get("loss_source") == "train" and row.get("val_loss_last") is not None else ""
        cells = [str(number) if is_model else "–", row["description"], row.get("order") or "–", adaln,
                 _sampling(row), _fmt(row.get("depth"), "d"), _fmt(row.get("width"), "d"),
                 _params(row.get("params")), _params(row.get("params_total")),
                 loss_cell(row), _fmt(row.get("val_loss_last"), ".3f") + train_mark,
                 _fmt(row.get("fid"), ".4g"), _fmt(row.get("fid_noise_floor"), ".4g"), delta,
                 _fmt(row.get("precision"), ".3f"), _fmt(row.get("recall"), ".3f"), _fmt(row.get("accuracy"), ".1%"),
                 _fmt(row.get("s_per_image"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Shapes {meta.get('image_size', '?')} px, {meta.get('steps', '?')} training steps per model at batch "
        f"{meta.get('batch', '?')}, "
        f"depth {meta.get('depth', '?')} (heads = depth), training seed {meta.get('seed', '?')}. "
        + ("The w/o-AdaLN rows are widened to match the AdaLN rows' non-embedding parameters. "
           if meta.get("matched_width") else "All rows at width 64·depth. "),
        "Held-out loss: final `val/loss` (cross-entropy over all tokens of an image); last-scale loss: `val/loss_last`."
        " Scale rows are over " + meta.get("token_sets", {}).get("scale", "the multi-scale tokens")
        + "; raster rows over " + meta.get("token_sets", {}).get("raster", "the single-scale tokens")
        + " of another tokenizer: the losses compare within a group only (raster order has one scale, so its"
        " last-scale loss is its loss)."
        + (" †: no held-out evaluation in this run (eval_every=0); the mean training loss (`Lm`, `Lt`) of the last"
           " logged steps instead, as `python -m var_jax scaling` falls back to."
           if any(r.get("loss_source") == "train" for r in rows) else ""),
        f"FID / precision / recall (k = 3): {meta.get('num_samples', '?')} samples per row (classes in turn, seed "
        f"{meta.get('seed', '?')}) against {meta.get('num_refs', '?')} held-out real shapes, in the shapes "
        "classifier's outline-feature space (var_jax/eval/shapes_classifier.shape_features), not Inception: the "
        "numbers are on their own scale. FID floor: the FID of as many other held-out real shapes against the same "
        "references. Sampling: plain = the model's own distribution; top-k keeps the k most likely codes; cfg: "
        "classifier-free guidance, ramped linearly over the scales (tokens in raster order). "
        "Class acc.: the shapes classifier's accuracy on the samples' requested classes. Δ FID: against row 1.",
        f"s / image: mean wall time of a warm, jitted batch of {SAMPLE_BATCH} / {SAMPLE_BATCH} "
        f"on {meta.get('device', '?')} (first, compiling batch excluded).",
    ]
    return "\n".join(lines + notes) + "\n"


# ---- main -----------------------------------------------------------------------------------------------------

def model_width(args, name: str, info: dict) -> int:
    """64·depth, or for a w/o-AdaLN model the matched width (see the module docstring)."""
    from var_jax.data import shapes
    order, adaln = MODELS[name]
    if adaln or args.same_width:
        return REFERENCE_WIDTH_PER_DEPTH * args.depth
    return matched_width(args.depth, order, info, shapes.NUM_CLASSES)


def train_models(args, names, infos) -> tuple[int, dict]:
    """(exit status, wall seconds per model trained here): each model's train command, skipping finished runs."""
    wall = {}
    for name in names:
        if Workdir.at(run_dir(args, name)).finished():
            print(f"[ablations] {name}: finished ({MODEL_CONFIG} exists), skipped", flush=True)
            continue
        info = infos[MODELS[name][0]]
        command = train_command(args, name, model_width(args, name, info), info)
        print(("" if args.dry_run else "[ablations] ") + shlex.join(command), flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        status = subprocess.call(command, cwd=REPO_ROOT)
        wall[name] = time.time() - t0
        if status:
            print(f"[ablations] {name} failed (exit status {status}); rerun the same command to resume",
                  file=sys.stderr)
            return status, wall
        print(f"[ablations] {name}: trained in {wall[name]:.0f} s", flush=True)
    return 0, wall


def cached_row(path: Path, settings: dict) -> dict | None:
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    return row if row.get("settings") == settings else None


def evaluate_rows(args, top_k: int, wall: dict, infos: dict) -> tuple[list[dict], dict]:
    """(model rows, the real row) for every variant whose model is exported; finished rows are read back."""
    from var_jax.checkpoints import load_model_dir, model_fingerprint
    from var_jax.eval.scaling import collect_run
    from var_jax.eval.shapes_classifier import shapes_classifier
    from var_jax.paths import atomic_write_text

    resolution = infos["scale"]["image_size"]
    if infos["raster"]["image_size"] != resolution:
        raise CommandError(f"the tokenizers' image sizes differ: {resolution} and {infos['raster']['image_size']}")
    token_sets = {order: token_set(info) for order, info in infos.items()}
    t0 = time.time()
    classifier = shapes_classifier(resolution)
    _, ref_features = reference_features(args.num_refs, resolution)
    real = real_row(args, ref_features, classifier, resolution)
    print(f"[ablations] classifier, references and noise floor ready in {time.time() - t0:.0f} s", flush=True)
    rows, bundles, fingerprints = [], {}, {}
    for variant in variant_names(args):
        _, model, _ = VARIANTS[variant]
        workdir = run_dir(args, model)
        if not Workdir.at(workdir).finished():
            print(f"[ablations] {variant}: no exported model in {workdir}, left out of the table", file=sys.stderr)
            continue
        cache = Path(args.out) / "rows" / f"{variant}.json"
        if model not in fingerprints:
            fingerprints[model] = model_fingerprint(workdir / "model")
        settings = row_settings(args, variant, top_k, fingerprints[model])
        row = cached_row(cache, settings)
        if row is None:
            t0 = time.time()
            if model not in bundles:
                bundles = {model: (load_model_dir(workdir / "model"), collect_run(workdir))}   # one model held
            row = evaluate_variant(args, variant, *bundles[model], top_k, ref_features, classifier, real, settings,
                                   token_sets)
            if model in wall:
                row["train_wall_s"] = wall[model]
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(row, indent=2) + "\n")
            print(f"[ablations] {variant}: evaluated in {time.time() - t0:.0f} s: "
                  + json.dumps({k: row[k] for k in ("params", "val_loss", "fid", "fid_noise_floor", "precision",
                                                    "recall", "accuracy", "s_per_image")}), flush=True)
        else:
            print(f"[ablations] {variant}: evaluated before ({cache}), reused", flush=True)
        rows.append(row)
    return rows, real


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    names = model_names(args)
    infos = {"scale": tokenizer_info(args.tokenizer), "raster": tokenizer_info(args.raster_tokenizer)}
    top_k = args.top_k or default_top_k(infos["scale"]["vocab"])
    if args.var_run:
        var_run = Workdir.at(args.var_run)
        if not var_run.finished():
            raise CommandError(f"--var-run {args.var_run}: no exported model (model/config.json)")
        steps = json.loads(var_run.run_config_path().read_text()).get("total_steps")
        if steps != args.steps:
            raise CommandError(f"--var-run {args.var_run} trained {steps} steps, not --steps {args.steps}")
    wall = {}
    if not args.table_only:
        status, wall = train_models(args, names, infos)
        if status:
            return status
    if args.dry_run:
        return 0

    import jax
    from var_jax.paths import atomic_write_text
    rows, real = evaluate_rows(args, top_k, wall, infos)
    first_run = Workdir.at(run_dir(args, rows[0]["model"])) if rows else None
    batch = json.loads(first_run.run_config_path().read_text())["batch_size"] if rows else None
    device = jax.devices()[0]
    meta = {"steps": args.steps, "depth": args.depth, "batch": batch, "matched_width": not args.same_width,
            "num_samples": args.num_samples, "num_refs": args.num_refs, "top_k": top_k, "cfg": args.cfg,
            "cfg_schedule": "linear", "seed": args.seed, "image_size": infos["scale"]["image_size"],
            "token_sets": {order: token_set(info) for order, info in infos.items()},
            "device": f"{device.platform} ({getattr(device, 'device_kind', '')})"}
    atomic_write_text(out / "table3.md", make_table(rows + [real], meta))
    atomic_write_text(out / "table3.json", json.dumps({"meta": meta, "rows": rows, "real": real}, indent=2) + "\n")
    print((out / "table3.md").read_text())
    print(f"[ablations] wrote {out / 'table3.md'} and {out / 'table3.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_command_error("launch/ablations.py", main))
