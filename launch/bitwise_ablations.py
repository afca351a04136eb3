#!/usr/bin/env python
"""Infinity's bitwise tokens on the procedural shapes data, beside Table 3 (launch/ablations.py) and on its
machinery: a VQ tokenizer against a BSQ tokenizer of as many bits, an index head against a bitwise head, and bitwise
self-correction p in {0, 0.1, 0.3}.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python launch/bitwise_ablations.py --vq-tokenizer workdirs/shapes_tokenizer --out workdirs/bitwise_ablations \
        --steps 1000 --depth 2
    python launch/bitwise_ablations.py --out /tmp/bitwise_quick --quick   # tiny sizes: the pipeline end to end

Tokenizers (train workdirs DIR/tokenizer_<name>; a finished one is skipped, an interrupted one resumes):
    vq    --vq-tokenizer (a finished shapes tokenizer workdir), or trained here: configs/shapes_tokenizer.py with
          --tokenizer-arg
    bsq   the same config, arguments and steps (read from the vq run's train_config.json) with
          --config.tokenizer.quantizer=bsq --config.tokenizer.bits=log2(V of vq) and Infinity's weight on its
          quantizer loss (--config.loss.vq_weight=4, Infinity's lfq_weight)
  measured on --recon-images held-out shapes (var_jax/eval/reconstruction.py): PSNR, the shapes classifier's accuracy
  on the reconstructions and on the originals; the tokenizer's last held-out (else training) code usage: % of the
  codes used, or for BSQ of the bits used both ways.

Transformers (configs/shapes_var.py at --depth, --steps each, train workdirs DIR/<name>):
    index_vq                       index head over vq (Table 3's `var` row; --var-run reuses a finished run)
    index_bsq                      index head (a 2^bits-way softmax) over bsq
    bitwise_p0, _p0.1, _p0.3       bitwise head over bsq, with --config.loss.bitwise_self_correction=p
  The bitwise rows are widened (multiples of 2·heads) to the index rows' non-embedding parameters, which their
  2·bits-way head would otherwise cut by width·(2^bits − 2·bits); --same-width keeps 64·depth.
  Per row: the held-out negative log-likelihood in nats per token (an index head's val/loss; a bitwise head's
  bits × val/loss, the NLL of its factorised token distribution, so the two compare), token accuracy, bit accuracy
  (bitwise heads), and NUM_SAMPLES samples drawn from the model's own distribution (no guidance, top-k or top-p):
  FID, precision and recall in the shapes classifier's feature space against held-out shapes, the real-vs-real
  noise floor and the class accuracy, exactly as launch/ablations.py scores its rows.

Writes DIR/bitwise.md and DIR/bitwise.json; finished rows are kept in DIR/rows/ and reused by a rerun with the same
settings. With --eval-every 0 (as --quick) the losses and accuracies are the last training records' (†).
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
sys.path.insert(0, str(REPO_ROOT / "launch"))

import ablations  # noqa: E402  (launch/ablations.py: Table 3's sampling, scoring and table helpers)
from var_jax.cli.common import CommandError, exit_on_command_error  # noqa: E402
from var_jax.cli.train import parse_args_with_overrides  # noqa: E402
from var_jax.train.workdir import Workdir, read_metrics  # noqa: E402

TOKENIZER_CONFIG, VAR_CONFIG = "configs/shapes_tokenizer.py", "configs/shapes_var.py"
# Infinity's weight on the BSQ quantizer loss (its BitVAE recipes' --lfq_weight 4)
INFINITY_LFQ_WEIGHT = 4.0
TOKENIZERS = {"vq": "VQ codebook (VAR)", "bsq": "BSQ, bits = log2 V (Infinity)"}
# transformer row -> (description, tokenizer, head, self-correction p)
TRANSFORMERS = {
    "index_vq": ("index head, VQ tokens", "vq", "index", 0.0),
    "index_bsq": ("index head, BSQ tokens", "bsq", "index", 0.0),
    "bitwise_p0": ("bitwise head, BSQ tokens", "bsq", "bitwise", 0.0),
    "bitwise_p0.1": ("bitwise head + self-correction p=0.1", "bsq", "bitwise", 0.1),
    "bitwise_p0.3": ("bitwise head + self-correction p=0.3", "bsq", "bitwise", 0.3),
}
QUICK = dict(tokenizer_arg="steps=2,batch=8,vocab=64", steps=2, depth=1, batch=8, eval_every=0, num_samples=64,
             num_refs=64, recon_images=32)
QUICK_OVERRIDES = ["log_every=1", "sample_every=0", "checkpoint_every=2", "eval_every=0"]   # no 10,000-shape passes


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="launch/bitwise_ablations.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="one workdir per model under it; bitwise.md / .json")
    parser.add_argument("--vq-tokenizer", help="finished VQ shapes tokenizer workdir (default: trained under --out)")
    parser.add_argument("--tokenizer-arg", default=None, help="configs/shapes_tokenizer.py argument of the tokenizers "
                        "trained here when there is no --vq-tokenizer (default: the config's recipe)")
    parser.add_argument("--var-run", help="a finished index-head VAR workdir over --vq-tokenizer with the same depth "
                                          "and steps to use as index_vq (Table 3's `var`)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every transformer (1000)")
    parser.add_argument("--depth", type=int, default=None, help="depth of every transformer, heads = depth (2)")
    parser.add_argument("--batch", type=int, default=None, help="batch of every transformer (the config's, 32)")
    parser.add_argument("--eval-every", type=int, default=None, help="held-out evaluation interval of the "
                        "transformers (default: --steps, at the end; 0: off, training records instead)")
    parser.add_argument("--same-width", action="store_true", help="bitwise rows keep width 64·depth")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per row (1000)")
    parser.add_argument("--num-refs", type=int, default=None, help="held-out real shapes as FID references (1000)")
    parser.add_argument("--recon-images", type=int, default=None, help="held-out shapes the tokenizers are measured "
                                                                       "on (1000)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every model and the sample seed")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline")
    parser.add_argument("--dry-run", action="store_true", help="print the train commands; run nothing")
    args = parse_args_with_overrides(parser, argv)
    defaults = dict(tokenizer_arg="", steps=1000, depth=2, batch=None, eval_every=None, num_samples=1000,
                    num_refs=1000, recon_images=1000)
    for key, value in {**defaults, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.overrides = [*QUICK_OVERRIDES, *args.overrides]
    if args.eval_every is None:
        args.eval_every = args.steps
    for name in ("steps", "depth", "num_samples", "num_refs", "recon_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_samples < 2 * ablations.SAMPLE_BATCH:
        parser.error(f"--num-samples must be at least {2 * ablations.SAMPLE_BATCH} (one compiling, one warm batch)")
    from var_jax.data import shapes
    if ablations.REF_START + args.num_refs + args.num_samples > shapes.HELD_OUT_SIZE:
        parser.error(f"--num-refs + --num-samples must be at most {shapes.HELD_OUT_SIZE - ablations.REF_START} "
                     "(references and the noise-floor set are disjoint held-out shapes)")
    return args


# ---- training -------------------------------------------------------------------------------------------------

def tokenizer_dir(args, name: str) -> Path:
    return Path(args.vq_tokenizer) if name == "vq" and args.vq_tokenizer else Path(args.out) / f"tokenizer_{name}"


def tokenizer_arg_of(workdir: Path) -> str:
    """The configs/shapes_tokenizer.py argument that reproduces a finished tokenizer run's recipe."""
    run = json.loads(Workdir.at(workdir).run_config_path().read_text())
    lr = run["optim"]["tblr"] * run["batch_size"] / 256   # config_base.small_tokenizer_config's tblr
    return (f"steps={run['total_steps']},batch={run['batch_size']},lr={lr:g},image_size={run['data']['image_size']},"
            f"latent={run['patch_nums'][-1]},vocab={run['tokenizer']['vocab_size']}")


def bits_of(vocab: int) -> int:
    bits = int(round(math.log2(vocab)))
    if 2 ** bits != vocab:
        raise CommandError(f"the VQ tokenizer's vocabulary {vocab} is not a power of two: no BSQ tokenizer has as "
                           "many bits")
    return bits


def tokenizer_command(args, name: str, config_arg: str, bits: int) -> list[str]:
    extra = ["--config.tokenizer.quantizer=bsq", f"--config.tokenizer.bits={bits}",
             f"--config.loss.vq_weight={INFINITY_LFQ_WEIGHT:g}"] if name == "bsq" else []
    return [sys.executable, "-m", "var_jax", "train", "--config", f"{TOKENIZER_CONFIG}:{config_arg}", "--workdir",
            str(tokenizer_dir(args, name)), f"--config.seed={args.seed}", *extra,
            *[f"--config.{item}" for item in args.overrides]]


def var_dir(args, name: str) -> Path:
    return Path(args.var_run) if name == "index_vq" and args.var_run else Path(args.out) / name


def var_command(args, name: str, info: dict, width: int) -> list[str]:
    _, tokenizer, head, p = TRANSFORMERS[name]
    config = (f"{VAR_CONFIG}:depth={args.depth},image_size={info['image_size']},latent={info['patch_nums'][-1]}"
              + (f",batch={args.batch}" if args.batch else ""))
    return [sys.executable, "-m", "var_jax", "train", "--config", config, "--workdir", str(var_dir(args, name)),
            f"--config.tokenizer_checkpoint={tokenizer_dir(args, tokenizer)}", f"--config.total_steps={args.steps}",
            f"--config.eval_every={args.eval_every}", f"--config.model.head={head}",
            f"--config.model.width={width}", f"--config.model.heads={args.depth}",
            f"--config.loss.bitwise_self_correction={p:g}", f"--config.seed={args.seed}",
            *[f"--config.{item}" for item in args.overrides]]


def run(command: list[str], what: str, dry_run: bool) -> float:
    """Run a train command (unless finished); returns its wall seconds. A failure stops with its status."""
    print(("" if dry_run else "[bitwise] ") + shlex.join(command), flush=True)
    if dry_run:
        return 0.0
    t0 = time.time()
    status = subprocess.call(command, cwd=REPO_ROOT)
    if status:
        print(f"[bitwise] {what} failed (exit status {status}); rerun the same command to resume", file=sys.stderr)
        raise SystemExit(status)
    return time.time() - t0


def widths(args, info: dict) -> dict:
    """Width of every transformer: 64·depth, the bitwise rows widened to the index rows' non-embedding params."""
    from var_jax.data import shapes
    from var_jax.eval.scaling import non_embedding_params
    base = ablations.REFERENCE_WIDTH_PER_DEPTH * args.depth
    out = {name: base for name in TRANSFORMERS}
    if args.same_width:
        return out
    common = dict(vocab=info["vocab"], latent_ch=info["latent_ch"], patch_nums=info["patch_nums"],
                  num_classes=shapes.NUM_CLASSES)
    params = lambda width, head: non_embedding_params(
        ablations._var_dict(args.depth, width, "scale", True, head=head, **common))[0]
    target, step = params(base, "index"), 2 * args.depth
    low, high = 1, 2                                     # multiples of step: params grow with the width
    while params(high * step, "bitwise") < target:
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if params(mid * step, "bitwise") < target else (low, mid)
    best = min((low, high), key=lambda k: abs(params(k * step, "bitwise") - target))
    out.update({name: best * step for name, (_, _, head, _) in TRANSFORMERS.items() if head == "bitwise"})
    return out


# ---- evaluation -----------------------------------------------------------------------------------------------

def last_record(workdir, keys) -> tuple[dict, bool]:
    """(the last record holding keys[0], held out?): the held-out keys ('val/...') when logged, else training's."""
    records = read_metrics(workdir)
    for prefix, held_out in (("val/", True), ("", False)):
        have = [r for r in records if f"{prefix}{keys[0]}" in r]
        if have:
            return {k: have[-1].get(f"{prefix}{k}") for k in keys}, held_out
    return {k: None for k in keys}, False


def tokenizer_row(args, name: str, bits: int) -> dict:
    from var_jax.eval.reconstruction import shapes_reconstruction_quality
    workdir = tokenizer_dir(args, name)
    usage, held_out = last_record(workdir, ["code_usage"])
    run_config = json.loads(Workdir.at(workdir).run_config_path().read_text())
    return {"tokenizer": name, "description": TOKENIZERS[name], "bits": bits, "vocab": 2 ** bits,
            "steps": run_config["total_steps"], "code_usage": usage["code_usage"], "code_usage_held_out": held_out,
            **shapes_reconstruction_quality(workdir, num_images=args.recon_images)}


def transformer_row(args, name: str, ref_features, classifier, floor: dict) -> dict:
    from var_jax.checkpoints import load_model_dir
    from var_jax.eval.scaling import collect_run
    from var_jax.eval.shapes_classifier import shape_features
    from var_jax.images import save_grid
    from var_jax.sample.runner import Sampler
    description, tokenizer, head, p = TRANSFORMERS[name]
    workdir = var_dir(args, name)
    point, bundle = collect_run(workdir), load_model_dir(Workdir.at(workdir).model)
    bits = bundle.var_config.bits
    accuracy, held_out = last_record(workdir, ["token_acc", "acc"] if bits else ["acc"])
    if not held_out:   # training records: TokAccm / Accm
        accuracy, _ = last_record(workdir, ["TokAccm", "Accm"] if bits else ["Accm"])
        accuracy = dict(zip(["token_acc", "acc"] if bits else ["acc"], accuracy.values()))
    loss = point["val_loss"]
    options = ablations.sampling_options("plain", 0, 0.0)
    images, labels, times = ablations.draw_samples(Sampler(bundle, options), args.num_samples,
                                                   bundle.var_config.num_classes, args.seed)
    (Path(args.out) / "samples").mkdir(parents=True, exist_ok=True)
    save_grid(Path(args.out) / "samples" / f"{name}.png", images[:4 * bundle.var_config.num_classes],
              columns=bundle.var_config.num_classes)
    row = {"variant": name, "description": description, "tokenizer": tokenizer, "head": head,
           "self_correction": p, "bits": bundle.tokenizer_config.bits or bits_of(bundle.var_config.vocab_size),
           "depth": point["depth"], "width": point["width"], "params": point["params"],
           "params_total": point["params_total"], "steps": point["steps"], "loss_source": point["source"],
           "nll_per_token": None if loss is None else loss * (bits or 1),
           "token_accuracy": accuracy["token_acc"] if bits else accuracy["acc"],
           "bit_accuracy": accuracy["acc"] if bits else None, "num_samples": int(len(images)),
           "accuracy": float(classifier.accuracy(images, labels)), "fid_noise_floor": floor["fid"],
           "s_per_image": float(sum(times[1:]) / max(len(times) - 1, 1)) / ablations.SAMPLE_BATCH}
    row.update(ablations.feature_scores(ref_features, shape_features(images)))
    return row


def cached(path: Path, settings: dict, make) -> dict:
    """A finished row from `path` if made with `settings`, else make() (written to `path`)."""
    from var_jax.paths import atomic_write_text
    row = ablations.cached_row(path, settings)
    if row is None:
        row = {**make(), "settings": settings}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(row, indent=2) + "\n")
    return row


def make_tables(tokenizer_rows: list[dict], rows: list[dict], real: dict, meta: dict) -> str:
    fmt, params = ablations._fmt, ablations._params
    lines = ["| Tokenizer | Bits | Vocabulary | Steps | PSNR (dB) | Class acc. of reconstructions | Class acc. of "
             "originals | Code usage |", "|---|---|---|---|---|---|---|---|"]
    for r in tokenizer_rows:
        usage = fmt(r["code_usage"], ".1f") + " %" + ("" if r["code_usage_held_out"] else " †")
        lines.append(f"| {r['description']} | {r['bits']} | {r['vocab']:,} | {r['steps']} | {r['psnr']:.2f} | "
                     f"{r['recon_accuracy']:.1%} | {r['real_accuracy']:.1%} | {usage} |")
    lines += ["", "| # | Variant | Tokenizer | Head | Self-correction p | Width | Params (non-emb.) | Params (total) | "
              "Held-out NLL (nats/token) | Token acc. | Bit acc. | FID | FID floor | Precision | Recall | Class acc. |",
              "|" + "---|" * 16]
    for i, r in enumerate(rows, 1):
        mark = " †" if r["loss_source"] == "train" else ""
        lines.append(f"| {i} | {r['description']} | {r['tokenizer']} | {r['head']} | {r['self_correction']:g} | "
                     f"{r['width']} | {params(r['params'])} | {params(r['params_total'])} | "
                     f"{fmt(r['nll_per_token'], '.3f')}{mark} | {fmt(r['token_accuracy'], '.1f')} % | "
                     f"{fmt(r['bit_accuracy'], '.1f')}{' %' if r['bit_accuracy'] is not None else ''} | "
                     f"{r['fid']:.4g} | {r['fid_noise_floor']:.4g} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['accuracy']:.1%} |")
    lines.append(f"| – | {real['description']} | – | – | – | – | – | – | – | – | – | {real['fid']:.4g} | "
                 f"{real['fid_noise_floor']:.4g} | {real['precision']:.3f} | {real['recall']:.3f} | "
                 f"{real['accuracy']:.1%} |")
    lines += ["", f"Shapes {meta['image_size']} px; transformers: depth {meta['depth']} (heads = depth), "
              f"{meta['steps']} steps, seed {meta['seed']}; bitwise rows "
              + ("at width 64·depth." if meta["same_width"] else "widened to the index rows' non-embedding params.")
              + " NLL: an index head's held-out cross-entropy; a bitwise head's bits × its mean per-bit cross-entropy"
              " (the NLL of its factorised token distribution). Samples: "
              f"{meta['num_samples']} per row from the model's own distribution (no guidance, top-k or top-p), "
              f"scored as Table 3 (shapes-classifier features, {meta['num_refs']} held-out references). "
              "†: training records (no held-out evaluation in this run)."]
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    wall = {}
    if not (args.vq_tokenizer and Workdir.at(args.vq_tokenizer).finished()):
        if args.vq_tokenizer:
            raise CommandError(f"--vq-tokenizer {args.vq_tokenizer}: no exported model (model/config.json)")
        if not Workdir.at(tokenizer_dir(args, "vq")).finished():
            wall["vq"] = run(tokenizer_command(args, "vq", args.tokenizer_arg, 0), "tokenizer vq", args.dry_run)
    if args.dry_run and not Workdir.at(tokenizer_dir(args, "vq")).finished():
        return 0
    vq_info = ablations.tokenizer_info(tokenizer_dir(args, "vq"))
    bits = bits_of(vq_info["vocab"])
    if not Workdir.at(tokenizer_dir(args, "bsq")).finished():
        wall["bsq"] = run(tokenizer_command(args, "bsq", tokenizer_arg_of(tokenizer_dir(args, "vq")), bits),
                          "tokenizer bsq", args.dry_run)
    if args.dry_run and not Workdir.at(tokenizer_dir(args, "bsq")).finished():
        return 0
    infos = {name: ablations.tokenizer_info(tokenizer_dir(args, name)) for name in TOKENIZERS}
    width = widths(args, infos["bsq"])
    for name, (_, tokenizer, _, _) in TRANSFORMERS.items():
        if not Workdir.at(var_dir(args, name)).finished():
            wall[name] = run(var_command(args, name, infos[tokenizer], width[name]), name, args.dry_run)
    if args.dry_run:
        return 0

    import jax
    from var_jax.checkpoints import model_fingerprint
    from var_jax.eval.shapes_classifier import shapes_classifier
    from var_jax.paths import atomic_write_text
    resolution = infos["vq"]["image_size"]
    tokenizer_rows = [cached(out / "rows" / f"tokenizer_{name}.json",
                             {"model": model_fingerprint(Workdir.at(tokenizer_dir(args, name)).model),
                              "recon_images": args.recon_images},
                             lambda name=name: tokenizer_row(args, name, bits)) for name in TOKENIZERS]
    classifier = shapes_classifier(resolution)
    _, ref_features = ablations.reference_features(args.num_refs, resolution)
    real = ablations.real_row(args, ref_features, classifier, resolution)
    rows = []
    for name in TRANSFORMERS:
        settings = {"model": model_fingerprint(Workdir.at(var_dir(args, name)).model), "seed": args.seed,
                    "num_samples": args.num_samples, "num_refs": args.num_refs}
        row = cached(out / "rows" / f"{name}.json", settings,
                     lambda name=name: transformer_row(args, name, ref_features, classifier, real))
        rows.append({**row, **({"train_wall_s": wall[name]} if name in wall else {})})
        print(f"[bitwise] {name}: " + json.dumps({k: row[k] for k in ("params", "nll_per_token", "token_accuracy",
                                                                      "fid", "accuracy")}), flush=True)
    device = jax.devices()[0]
    meta = {"steps": args.steps, "depth": args.depth, "seed": args.seed, "same_width": args.same_width,
            "num_samples": args.num_samples, "num_refs": args.num_refs, "recon_images": args.recon_images,
            "image_size": resolution, "bits": bits, "device": f"{device.platform} ({getattr(device, 'device_kind', '')})"}
    atomic_write_text(out / "bitwise.md", make_tables(tokenizer_rows, rows, real, meta))
    atomic_write_text(out / "bitwise.json", json.dumps({"meta": meta, "tokenizers": tokenizer_rows, "rows": rows,
                                                        "real": real}, indent=2) + "\n")
    print((out / "bitwise.md").read_text())
    print(f"[bitwise] wrote {out / 'bitwise.md'} and {out / 'bitwise.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_command_error("launch/bitwise_ablations.py", main))
