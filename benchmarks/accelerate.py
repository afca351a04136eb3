"""The sampling accelerators (var_jax/sample/accelerate.py) against the plain sampler, in one run: speed on the
released shapes with random weights, quality on trained models.

    python benchmarks/accelerate.py speed --depths 16,30 --batches 1,32 --repeats 3 --json speed.json
    python benchmarks/accelerate.py quality --num-samples 1000 --json quality.json      # trains digits models first
    python benchmarks/accelerate.py quality --checkpoint M --refiner R --dataset shapes --num-samples 1000
    python benchmarks/accelerate.py speed --depths 4 --batches 1,4 --repeats 1 --refiner-depth 2   # a quick check

Variants (each against `plain`, the reference FID setting cfg 1.5 / top-k 900 / top-p 0.96 for speed, the digits
demo's cfg 3 / top-k 64 / top-p 0.9 for quality; S = the number of scales):
  cfg_stop    --cfg-stop-scale S-2: the last two scales unguided
  refiner     --refiner (d`--refiner-depth` for speed, the trained refiner for quality) --draft-scales S-2
  prune       --prune S-2:0.5,S-1:0.75
  kv_window   --kv-window 1,1
  and the combinations cfg_stop+prune, refiner+cfg_stop, all (the four together).

speed: for every depth and batch, every variant is compiled first (tokens without the decode), and the decode
once (the same VQVAE decode of one f_hat shape follows every variant); then the calls alternate over the variants
and the decode `--repeats` times (a shared machine's load hits every variant alike). The table gives the medians
without and with the decode (the variant's median plus the decode's), the speed-ups against plain, the analytic FLOP
ratio of the transformer (benchmarks/sample_bench.py's counter over each pass the variant runs) and the KV cache
positions it keeps. A depth/batch whose compiled program XLA estimates larger than the machine's available memory
is skipped and says so.

quality: `--num-samples` images per variant (classes in turn, image i with the random stream (seed, i)), and the
plain sampler again with another seed: per-scale token agreement with plain at equal seeds, FID / precision /
recall against the dataset's held-out images in its feature space (digits: the digits feature network against the
360 `test` digits, as `eval --features digits`; shapes: the shapes classifier's outline features against held-out
shapes, as launch/ablations.py), and the dataset classifier's accuracy on the requested classes. The noise floor
is |FID(plain, seed) − FID(plain, other seed)|; a variant's FID change is "inside" when it is at most twice that.
Without --checkpoint the digits models are trained into --workdir first (resumable), with the commands:
    python -m var_jax train --config configs/digits_tokenizer.py --workdir W/tokenizer --config.sample_every=0
    python -m var_jax train --config configs/digits_var.py --workdir W/var \
        --config.tokenizer_checkpoint=W/tokenizer/model --config.sample_every=0
    python -m var_jax train --config configs/digits_var.py:depth=2,width=64 --workdir W/refiner \\
        --config.tokenizer_checkpoint=W/tokenizer/model --config.sample_every=0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import var_jax  # noqa: F401  (its CPU XLA flags, before JAX starts)

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))

from var_jax.sample.accelerate import Accelerators, phases, plan_cuts, step_shapes, unrolled_from  # noqa: E402
from var_jax.sample.sampler import SampleOptions, make_sample_fn  # noqa: E402
from var_jax.sample.schedule import scale_plan  # noqa: E402
from var_jax.host_memory import release_freed_memory  # noqa: E402
from sample_bench import memory_estimate, pass_flops  # noqa: E402

SPEED_SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)
QUALITY_SAMPLING = dict(cfg=3.0, top_k=64, top_p=0.9)     # var_jax/cli/demo.py DEFAULT_SAMPLING (digits)
REFINER_VARIANTS = ("refiner", "refiner+cfg_stop", "all")
QUALITY_BATCH = 100
DEFAULT_WORKDIR = "workdirs/accelerate_digits"
DIGITS_REFINER_CONFIG = "configs/digits_var.py:depth=2,width=64"


def variants(num_scales: int) -> dict[str, Accelerators]:
    s = num_scales
    stop, prune, window = dict(cfg_stop_scale=s - 2), dict(prune=((s - 2, 0.5), (s - 1, 0.75))), dict(kv_window=(1, 1))
    refiner = dict(draft_scales=s - 2)
    return {"plain": Accelerators(), "cfg_stop": Accelerators(**stop), "refiner": Accelerators(**refiner),
            "prune": Accelerators(**prune), "kv_window": Accelerators(**window),
            "cfg_stop+prune": Accelerators(**stop, **prune), "refiner+cfg_stop": Accelerators(**refiner, **stop),
            "all": Accelerators(**stop, **refiner, **prune, **window)}


def options_for(sampling: dict, accel: Accelerators, mode: str = "unrolled") -> SampleOptions:
    return SampleOptions(**sampling, mode=mode, accel=accel)


# ---- FLOPs and cache ------------------------------------------------------------------------------------------

def sampling_flops(main_cfg, refiner_cfg, accel: Accelerators, batch: int, guided: bool, mode: str) -> float:
    """Analytic matmul FLOPs of the transformer passes of one sampling call (sample_bench's per-pass counter)."""
    pns = main_cfg.patch_nums
    plan = scale_plan(pns, mode, cuts=plan_cuts(accel, guided), unrolled_from=unrolled_from(accel, pns))
    total = 0.0
    for shape in step_shapes(pns, accel, plan, guided):
        cfg = main_cfg if shape["model"] == "main" else refiner_cfg
        total += batch * shape["rows"] * pass_flops(cfg, shape["tokens"], shape["attention"],
                                                    scale_tokens=shape["head_tokens"] or shape["tokens"])
    return total


def cache_positions(pns, accel: Accelerators, guided: bool, mode: str) -> int:
    """KV cache positions of the main model (the refiner's cache is counted beside it where there is one)."""
    plan = scale_plan(pns, mode, cuts=plan_cuts(accel, guided), unrolled_from=unrolled_from(accel, pns))
    return sum(phase.layout.length for phase in phases(pns, accel, plan))


# ---- speed ----------------------------------------------------------------------------------------------------

def _timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def speed_table(depth: int, refiner_depth: int, batches, repeats: int, mode: str) -> list[dict]:
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE, merge_for_decoding, split_for_decoding
    from var_jax.transformer.config import preset
    from var_jax.transformer.model import VAR

    tok_cfg = TokenizerConfig()
    var_cfg = preset(depth, patch_nums=tok_cfg.patch_nums)
    ref_cfg = preset(refiner_depth, patch_nums=tok_cfg.patch_nums)
    vg, vs = nnx.split(VAR(var_cfg, rngs=nnx.Rngs(1)))
    rg, rs = nnx.split(VAR(ref_cfg, rngs=nnx.Rngs(2)))
    tg, ts, encoder_spec = split_for_decoding(VQVAE(tok_cfg, rngs=nnx.Rngs(0)))
    decoder = jax.jit(lambda state, f: merge_for_decoding(tg, state, encoder_spec).decode(f))
    guided = SPEED_SAMPLING["cfg"] != 0
    table = variants(tok_cfg.num_scales)
    rows = []
    for batch in batches:
        labels = np.arange(batch, dtype=np.int32) * 97 % var_cfg.num_classes
        ids = np.arange(batch)
        # the decode is the same for every variant (f_hat of one shape): compiled and timed once, beside them
        f_hat = np.zeros((batch, tok_cfg.latent_size, tok_cfg.latent_size, tok_cfg.z_channels), np.float32)
        compiled = {"decode": (decoder.lower(ts, f_hat).compile(), (ts, f_hat), 0.0, 0)}
        skipped = None
        for name, accel in table.items():
            with_refiner = accel.draft_scales is not None
            fn = make_sample_fn(vg, tg, options_for(SPEED_SAMPLING, accel, mode), decode=False,
                                encoder_spec=encoder_spec, refiner_graphdef=rg if with_refiner else None)
            args = (vs, ts, labels, ids, 0, None, rs if with_refiner else None)
            t = time.perf_counter()
            program = fn.lower(*args).compile()
            need = memory_estimate(program)
            if need > available_memory():
                skipped = (f"compiled program needs {need / 2**30:.1f} GiB, "
                           f"{available_memory() / 2**30:.1f} available")
                break
            compiled[name] = (program, args, time.perf_counter() - t, need)
            release_freed_memory()
        if skipped:
            print(f"[accelerate] d{depth} batch {batch}: skipped ({skipped})", flush=True)
            rows.append({"depth": depth, "batch": batch, "skipped": skipped})
            continue
        for program, args, _, _ in compiled.values():   # first calls (allocations, thread pools) not timed
            jax.block_until_ready(program(*args))
        times = {key: [] for key in compiled}
        for _ in range(repeats):
            for key, (program, args, _, _) in compiled.items():
                times[key].append(_timed(lambda: program(*args)))
        decode = statistics.median(times["decode"])
        plain_flops = sampling_flops(var_cfg, ref_cfg, table["plain"], batch, guided, mode)
        plain_cache = cache_positions(tok_cfg.patch_nums, table["plain"], guided, mode)
        base = statistics.median(times["plain"])
        for name, accel in table.items():
            t_tf = statistics.median(times[name])
            flops = sampling_flops(var_cfg, ref_cfg, accel, batch, guided, mode)
            rows.append({"depth": depth, "refiner_depth": refiner_depth, "batch": batch, "variant": name,
                         "settings": accel.describe(), "s_no_decode": t_tf, "s_with_decode": t_tf + decode,
                         "speedup_no_decode": base / t_tf, "speedup_with_decode": (base + decode) / (t_tf + decode),
                         "flop_ratio": flops / plain_flops, "gflop": flops / 1e9, "decode_s": decode,
                         "cache_positions": cache_positions(tok_cfg.patch_nums, accel, guided, mode),
                         "plain_cache_positions": plain_cache, "compile_s": compiled[name][2],
                         "memory_estimate_gib": compiled[name][3] / 2**30, "times_no_decode": times[name],
                         "times_decode": times["decode"]})
            print(f"[accelerate] d{depth} b{batch} {name}: {t_tf:.3f} s ({rows[-1]['speedup_no_decode']:.2f}x), "
                  f"with decode {t_tf + decode:.3f} s, FLOP ratio {rows[-1]['flop_ratio']:.3f}", flush=True)
    return rows


def format_speed(rows: list[dict]) -> str:
    lines = ["| model | batch | variant | s / batch (no decode) | speed-up | s / batch (with decode) | speed-up | "
             "FLOP ratio | KV positions |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| d{r['depth']} | {r['batch']} | – | skipped: {r['skipped']} | | | | | |")
            continue
        model = f"d{r['depth']}" + (f" → d{r['refiner_depth']}" if r["settings"].get("draft_scales") else "")
        lines.append(f"| {model} | {r['batch']} | {r['variant']} | {r['s_no_decode']:.3f} | "
                     f"{r['speedup_no_decode']:.2f}× | {r['s_with_decode']:.3f} | {r['speedup_with_decode']:.2f}× | "
                     f"{r['flop_ratio']:.3f} | {r['cache_positions']} / {r['plain_cache_positions']} |")
    return "\n".join(lines)


# ---- quality --------------------------------------------------------------------------------------------------

def train_digits_models(workdir: Path) -> tuple[Path, Path]:
    """The digits tokenizer, VAR and refiner (var_jax/cli/demo.py's stages), each skipped once exported."""
    from var_jax.cli.demo import default_config_dir, train_stage
    from var_jax.train.workdir import Workdir
    configs = Path(default_config_dir())
    tokenizer = Workdir.at(workdir / "tokenizer").model
    train_stage("tokenizer", str(configs / "digits_tokenizer.py"), ["sample_every=0"], workdir / "tokenizer")
    wiring = [f"tokenizer_checkpoint={tokenizer}", "sample_every=0"]
    train_stage("VAR", str(configs / "digits_var.py"), wiring, workdir / "var")
    train_stage("refiner", str(configs / "digits_var.py") + ":depth=2,width=64", wiring, workdir / "refiner")
    return Workdir.at(workdir / "var").model, Workdir.at(workdir / "refiner").model


class Scorer:
    """FID / precision / recall in a dataset's feature space and its classifier's accuracy."""

    def __init__(self, dataset: str, resolution: int, num_refs: int):
        self.dataset = dataset
        if dataset == "digits":
            from var_jax.eval.digits_classifier import digits_classifier
            self.classifier = digits_classifier(resolution)
        elif dataset == "shapes":
            from ablations import reference_features
            from var_jax.eval.shapes_classifier import shapes_classifier
            self.classifier = shapes_classifier(resolution)
            self.ref_features = reference_features(num_refs, resolution)[1]
        else:
            raise SystemExit(f"--dataset must be digits or shapes, got {dataset!r}")

    def __call__(self, images, labels) -> dict:
        if self.dataset == "digits":
            from var_jax.cli.demo import digits_feature_metrics
            scores = {k: digits_feature_metrics(images)[k] for k in ("fid", "precision", "recall")}
        else:
            from ablations import feature_scores
            from var_jax.eval.shapes_classifier import shape_features
            scores = feature_scores(self.ref_features, shape_features(images))
        return {**scores, "accuracy": float(self.classifier.accuracy(images, labels))}


def draw(sampler, num: int, num_classes: int, seed: int):
    labels = np.arange(num) % num_classes
    images, tokens, times = [], [], []
    for start in range(0, num, QUALITY_BATCH):
        ids = np.arange(start, min(start + QUALITY_BATCH, num))
        t = time.perf_counter()
        out = sampler(labels[ids], image_ids=ids, seed=seed, pad_to=QUALITY_BATCH)
        times.append(time.perf_counter() - t)
        images.append(out["images"])
        tokens.append(out["tokens"])
    return (np.concatenate(images), labels, [np.concatenate(t) for t in zip(*tokens)],
            statistics.median(times[1:]) if len(times) > 1 else times[0])


def quality_table(args) -> tuple[list[dict], dict]:
    from var_jax.checkpoints import load_model_dir
    from var_jax.sample.runner import Sampler
    checkpoint, refiner_dir = args.checkpoint, args.refiner
    if checkpoint is None:
        checkpoint, refiner_dir = train_digits_models(Path(args.workdir))
    bundle = load_model_dir(checkpoint)
    refiner = load_model_dir(refiner_dir) if refiner_dir else None
    num_classes = bundle.var_config.num_classes
    scorer = Scorer(args.dataset, bundle.tokenizer_config.image_size, args.num_refs)
    rows, plain = [], None
    for name, accel in variants(bundle.tokenizer_config.num_scales).items():
        if accel.draft_scales is not None and refiner is None:
            continue
        sampler = Sampler(bundle, options_for(QUALITY_SAMPLING, accel, args.mode),
                          refiner=refiner if accel.draft_scales is not None else None)
        images, labels, tokens, s_per_batch = draw(sampler, args.num_samples, num_classes, args.seed)
        row = {"variant": name, "settings": accel.describe(), "num_samples": len(images),
               "s_per_batch": s_per_batch, **scorer(images, labels)}
        if plain is None:
            plain = (tokens, row)
            other = draw(sampler, args.num_samples, num_classes, args.seed + 1)
            row["fid_other_seed"] = scorer(other[0], other[1])["fid"]
            row["noise_floor"] = abs(row["fid"] - row["fid_other_seed"])
            row["agreement_other_seed"] = [float((a == b).mean()) for a, b in zip(tokens, other[2])]
        row["agreement"] = [float((a == b).mean()) for a, b in zip(tokens, plain[0])]
        row["fid_change"] = row["fid"] - plain[1]["fid"]
        row["inside_noise"] = abs(row["fid_change"]) <= 2 * plain[1]["noise_floor"]
        rows.append(row)
        print(f"[accelerate] quality {name}: " + json.dumps({k: row[k] for k in ("fid", "precision", "recall",
              "accuracy", "agreement", "fid_change")}), flush=True)
    meta = {"checkpoint": str(checkpoint), "refiner": str(refiner_dir), "dataset": args.dataset,
            "sampling": QUALITY_SAMPLING, "seed": args.seed, "mode": args.mode}
    return rows, meta


def format_quality(rows: list[dict]) -> str:
    floor = rows[0]["noise_floor"]
    lines = [f"noise floor |FID(plain, seed) − FID(plain, seed+1)| = {floor:.4g}; per-scale token agreement of two "
             f"plain seeds: {', '.join(f'{a:.2f}' for a in rows[0]['agreement_other_seed'])}", "",
             "| variant | settings | token agreement per scale | FID | Δ FID | inside 2× floor | precision | recall | "
             "class acc. |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {json.dumps(r['settings'])} | "
                     f"{', '.join(f'{a:.2f}' for a in r['agreement'])} | {r['fid']:.4g} | {r['fid_change']:+.3g} | "
                     f"{'yes' if r['inside_noise'] else 'no'} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['accuracy']:.1%} |")
    return "\n".join(lines)


def verdict(speed: list[dict], quality: list[dict]) -> str:
    """Which variants are >= 1.5x faster than plain at batch 32 (largest model measured) with their FID change
    inside twice the noise floor."""
    timed = [r for r in speed if "skipped" not in r and r["batch"] == 32]
    if not timed or not quality:
        return "verdict: needs both parts, with batch 32 in the speed part"
    depth = max(r["depth"] for r in timed)
    fast = {r["variant"]: r["speedup_with_decode"] for r in timed if r["depth"] == depth}
    good = [q["variant"] for q in quality if q["inside_noise"] and fast.get(q["variant"], 0) >= 1.5]
    if good:
        return (f"verdict: >= 1.5x at batch 32 (d{depth}, with decode) with the FID change inside twice the noise "
                f"floor: {', '.join(f'{v} ({fast[v]:.2f}x)' for v in good)}")
    best = max((v for v in fast if v != "plain"), key=fast.get)
    return (f"verdict: no variant reached 1.5x at batch 32 with its FID change inside twice the noise floor; "
            f"fastest {best} at {fast[best]:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("speed", "quality", "both"))
    parser.add_argument("--depths", default="16,30", help="speed: main model depths (released shapes)")
    parser.add_argument("--refiner-depth", type=int, default=None,
                        help="speed: the refiner's depth (default d16 for d30, else half the depth)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="unrolled", help="sampler mode of every variant")
    parser.add_argument("--checkpoint", default=None, help="quality: the main model (default: digits, trained)")
    parser.add_argument("--refiner", default=None, help="quality: the refiner model directory")
    parser.add_argument("--dataset", default="digits", help="quality: digits or shapes (feature space, classifier)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="quality: where the digits models are trained")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-refs", type=int, default=1000, help="quality, shapes: held-out reference images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}) x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {"machine": {"platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
                           "cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0]}}
    speed, quality = [], []
    if args.part in ("speed", "both"):
        for depth in (int(d) for d in args.depths.split(",")):
            refiner_depth = args.refiner_depth or (16 if depth == 30 else max(depth // 2, 1))
            speed += speed_table(depth, refiner_depth, [int(b) for b in args.batches.split(",")], args.repeats,
                                 args.mode)
        results["speed"] = speed
        print("\n" + format_speed(speed) + "\n", flush=True)
    if args.part in ("quality", "both"):
        quality, results["quality_meta"] = quality_table(args)
        results["quality"] = quality
        print("\n" + format_quality(quality) + "\n", flush=True)
    if args.part == "both":
        results["verdict"] = verdict(speed, quality)
        print(results["verdict"])
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
