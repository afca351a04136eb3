"""Train both stages on the embedded digits dataset (no download) and sample ten digits of every class.

    python -m var_jax demo --workdir workdirs/demo        # ~10 CPU-minutes: well under 15 min on 2 cores
    python -m var_jax demo --workdir /tmp/demo --quick    # two steps per stage: checks the plumbing (tests)

Stage 1 trains the tokenizer (`train --config configs/digits_tokenizer.py --workdir DIR/tokenizer`), stage 2 the
VAR transformer on its tokens (`train --config configs/digits_var.py --workdir DIR/var`), stage 3 samples
(`sample --checkpoint DIR/var/model --num-per-class 10 --out DIR/samples`). The samples are then scored by a
classifier of the real digits: DIR/samples/score.json holds its accuracy against the requested classes and the
share of samples that look like real digits (in_distribution), and FID, precision and recall against the held-out
real digits in the digits feature network's space (as `eval --features digits --ref digits:test` computes them).

Rerunning the same command on the same DIR resumes: finished stages are skipped, an interrupted training
continues from its last checkpoint, finished sample batches are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from var_jax.cli import sample, train
from var_jax.cli.common import CommandError
from var_jax.cli.reruns import check_same_settings
from var_jax.paths import atomic_write_text, user_path
from var_jax.train.workdir import Workdir

SETTINGS_FILE = "demo.json"
STAGE_DIRS = {"tokenizer": "tokenizer", "var": "var"}
SAMPLES_DIR = "samples"
SCORE_FILE = "score.json"
NUM_CLASSES = 10             # var_jax.data.digits.NUM_CLASSES (not imported: --help stays light)
# Sampling defaults for the digits models. The reference's ImageNet setting (cfg 1.5, top-k 900, top-p 0.96) keeps
# every one of the V=256 codes; a tighter filter and stronger guidance trade diversity for class fidelity
# (digits-classifier accuracy, one full demo run: cfg 0 / no filter 95%, cfg 1.5 top-p 0.96 99%, these 100%).
DEFAULT_SAMPLING = {"cfg": 3.0, "top_k": 64, "top_p": 0.9}

# --quick: the configs' tokenizer and images, a one-block VAR, two steps of batch 8 per stage; enough to run
# every code path in a test (a checkpoint after each VAR step, so a test can resume from the first).
QUICK = {
    "tokenizer": ("steps=2,batch=8", ["log_every=1", "checkpoint_every=2"]),
    "var": ("depth=1,width=64,batch=8,steps=2", ["log_every=1", "checkpoint_every=1"]),
}


def default_config_dir() -> str:
    """The repository's configs/ (beside the var_jax package), else ./configs."""
    import var_jax
    beside_package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(var_jax.__file__))), "configs")
    return beside_package if os.path.isdir(beside_package) else os.path.abspath("configs")


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--workdir", required=True, help="DIR: tokenizer/, var/, samples/ and demo.json")
    parser.add_argument("--quick", action="store_true", help="a one-block VAR, two steps per stage (tests)")
    parser.add_argument("--tokenizer-config", default=None, metavar="FILE[:ARG]",
                        help="stage 1 config (default configs/digits_tokenizer.py)")
    parser.add_argument("--var-config", default=None, metavar="FILE[:ARG]",
                        help="stage 2 config (default configs/digits_var.py)")
    parser.add_argument("--num-per-class", type=int, default=10, help="samples per digit class (default 10)")
    parser.add_argument("--cfg", type=float, default=None,
                        help=f"classifier-free guidance scale (default {DEFAULT_SAMPLING['cfg']})")
    parser.add_argument("--top-k", type=int, default=None,
                        help=f"keep the k largest logits (default {DEFAULT_SAMPLING['top_k']}; 0: off)")
    parser.add_argument("--top-p", type=float, default=None,
                        help=f"nucleus filter (default {DEFAULT_SAMPLING['top_p']}; 0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def stage_configs(args):
    """(tokenizer config spec, overrides), (VAR config spec, overrides) for the train command's loader."""
    config_dir = default_config_dir()
    tok_spec = args.tokenizer_config or os.path.join(config_dir, "digits_tokenizer.py")
    var_spec = args.var_config or os.path.join(config_dir, "digits_var.py")
    tok_overrides, var_overrides = [], []
    if args.quick:
        tok_spec, tok_overrides = _with_arg(tok_spec, QUICK["tokenizer"][0]), list(QUICK["tokenizer"][1])
        var_spec, var_overrides = _with_arg(var_spec, QUICK["var"][0]), list(QUICK["var"][1])
    return (tok_spec, tok_overrides), (var_spec, var_overrides)


def wiring_overrides(workdir, stage: str) -> list[str]:
    """What the demo always sets: no PNG grids during training (the demo samples once at the end; each grid
    costs a compile), and stage 1's model as the VAR stage's tokenizer."""
    if stage == "tokenizer":
        return ["sample_every=0"]
    tokenizer_model = Workdir.at(user_path(workdir) / STAGE_DIRS["tokenizer"]).model
    return [f"tokenizer_checkpoint={tokenizer_model}", "sample_every=0"]


def _with_arg(spec: str, arg: str) -> str:
    path, _, existing = spec.partition(":")
    return f"{path}:{existing},{arg}" if existing else f"{path}:{arg}"


def sampling_settings(args) -> dict:
    chosen = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
    return {k: DEFAULT_SAMPLING[k] if v is None else v for k, v in chosen.items()}


def train_stage(name: str, spec: str, overrides: list[str], workdir):
    """One `var-jax train` run (resumed by the trainer when its workdir holds checkpoints); skipped when it has
    already exported its model."""
    if Workdir.at(workdir).finished():
        print(f"[demo] {name}: finished earlier ({Workdir.at(workdir).model}), skipped", flush=True)
        return
    print(f"[demo] {name}: python -m var_jax train --config {spec} --workdir {workdir} "
          + " ".join(f"--config.{o}" for o in overrides), flush=True)
    train.run(argparse.Namespace(config=spec, config_overrides=overrides, workdir=str(workdir), print_config=False,
                                 distributed=False, coordinator_address=None, num_processes=None, process_id=None))


def sample_stage(checkpoint, out, num_per_class: int, sampling: dict, seed: int):
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--num-per-class", str(num_per_class),
            "--cfg", str(sampling["cfg"]), "--top-k", str(sampling["top_k"]), "--top-p", str(sampling["top_p"]),
            "--seed", str(seed), "--batch-size", str(num_per_class * NUM_CLASSES)]
    print(f"[demo] sampling: python -m var_jax sample {' '.join(argv)}", flush=True)
    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    sample.run(parser.parse_args(argv))


def score_samples(out, num_per_class: int) -> dict:
    """Classifier accuracy on the samples (and the in-distribution share); a one-row-per-class grid.png."""
    import numpy as np

    from var_jax.eval.digits_classifier import digits_classifier
    from var_jax.images import save_grid
    with (out / "samples.npz").open("rb") as f, np.load(f) as data:
        images, labels = data["arr_0"], data["arr_1"]
    # the sample command's grid holds the first 64 images; the demo's shows them all, one class per row
    save_grid(out / "grid.png", images, columns=num_per_class)
    classifier = digits_classifier(images.shape[1])
    score = classifier.score(images, labels)
    score["real_digits_accuracy"] = classifier.held_out_accuracy   # the classifier on held-out real digits
    score["num_images"] = int(len(labels))
    score.update(digits_feature_metrics(images))
    return score


def digits_feature_metrics(images) -> dict:
    """FID, precision, recall (and IS, sFID) of the samples against the held-out real digits ('test' split,
    rendered at the samples' resolution), in the digits feature network's space (`eval --features digits`)."""
    from var_jax.eval.digits_features import NETWORK_ID, real_digits
    from var_jax.eval.evaluate import compare, compute_feature_set, digits_network
    from var_jax.eval.feature_metrics import NEAREST_K
    from var_jax.eval.sources import ArrayImages
    if len(images) <= NEAREST_K:   # k-NN manifolds need more than k samples
        return {"fid": None, "precision": None, "recall": None, "feature_network": NETWORK_ID}
    network = digits_network()
    ref = compute_feature_set(ArrayImages(real_digits("test", images.shape[1]), "digits:test"), network, 1024,
                              progress=False)
    metrics = compare(compute_feature_set(ArrayImages(images), network, 1024, progress=False), ref)
    return {"fid": metrics["fid"], "precision": metrics["precision"], "recall": metrics["recall"],
            "inception_score": metrics["inception_score"], "sfid": metrics["sfid"],
            "feature_network": NETWORK_ID, "fid_reference": f"digits:test ({ref.num_images} held-out real digits)"}


def run(args):
    if args.num_per_class < 1:
        raise CommandError(f"--num-per-class must be >= 1, got {args.num_per_class}")
    start = time.perf_counter()
    workdir = user_path(args.workdir)
    (tok_spec, tok_overrides), (var_spec, var_overrides) = stage_configs(args)
    sampling = sampling_settings(args)
    settings = {"tokenizer_config": tok_spec, "tokenizer_overrides": tok_overrides,
                "var_config": var_spec, "var_overrides": var_overrides,
                "num_per_class": args.num_per_class, "seed": args.seed, **sampling}
    check_same_settings(workdir, SETTINGS_FILE, settings, "a demo run", "--workdir")

    train_stage("stage 1/3, tokenizer", tok_spec, tok_overrides + wiring_overrides(workdir, "tokenizer"),
                workdir / STAGE_DIRS["tokenizer"])
    train_stage("stage 2/3, VAR transformer", var_spec, var_overrides + wiring_overrides(workdir, "var"),
                workdir / STAGE_DIRS["var"])
    out = workdir / SAMPLES_DIR
    sample_stage(Workdir.at(workdir / STAGE_DIRS["var"]).model, out, args.num_per_class, sampling, args.seed)

    score = score_samples(out, args.num_per_class)
    score["wall_s_this_run"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / SCORE_FILE, json.dumps(score, indent=2) + "\n")
    print(f"[demo] digits classifier on the samples: accuracy {score['accuracy']:.1%} "
          f"(real held-out digits: {score['real_digits_accuracy']:.1%}), in-distribution "
          f"{score['in_distribution']:.1%}; predicted per class {score['predicted_counts']}", flush=True)
    print(f"[demo] wrote {out / 'samples.npz'}, {out / 'grid.png'}, {out / SCORE_FILE} "
          f"in {score['wall_s_this_run']:.0f} s", flush=True)
    return 0
