"""Score samples against reference images: FID, sFID, Inception Score, precision and recall, as OpenAI's ADM
evaluator defines them (VAR's tables), on the FID Inception-v3 or, for the embedded digits, a digits network.

Examples:
  python -m var_jax eval --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
      --inception pt_inception-2015-12-05-6726825d.pth --out metrics.json
  python -m var_jax eval --ref ref.npz --inception W.pth --save-stats ref_stats.npz     # reference only, once
  python -m var_jax eval --samples samples.npz --ref ref_stats.npz --inception W.pth   # then every time
  python -m var_jax eval --features digits --samples workdirs/demo/samples/samples.npz --ref digits:test

--samples and --ref: an .npz whose arr_0 is uint8 (N, H, W, 3) (the ADM layout `sample` writes), or a folder of
image files of one size. --ref may also be a statistics file written by --save-stats (it holds the means and
covariances and the reference's pool features, so every metric is available from it; it is tied to the network
and, for Inception, to the weights file's sha256), or, with --features digits, `digits:test` / `digits:train` /
`digits:all`: the embedded digits split rendered at the samples' resolution.

Samples and references must be images of one size and one colour kind (grey or RGB; a statistics file records
its images' since this check exists): other pairs are refused, since their distance would measure the resizing.
Sets with no more images than the feature dimensions (Inception 2,048, sFID 2,023, digits 64) give singular
covariances: the metrics are still written, with a warning on stderr and under `warning` in --out.

--inception: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF FID graph ported to PyTorch), read
with torch.load(weights_only=True). Nothing downloads. Its sha256 goes into the metrics.
Inputs are resized to 299 bilinearly (PyTorch align_corners=False), as pytorch-fid does; the TF graph the ADM
evaluator runs resizes slightly differently, so numbers can differ from the evaluator's in the last digits.
sFID uses the first 7 channels of Mixed_6d.branch1x1 (the TF graph's `mixed_6/conv`, 17×17: 2,023 dims).
The Inception Score uses splits of 5,000 images; fewer images make one split, a partial last split counts.
"""
from __future__ import annotations

import json
import sys

from var_jax.cli.common import CommandError, add_mesh_argument, batch_mesh
from var_jax.eval.sources import first_line
from var_jax.paths import atomic_write_text, user_path

FEATURES = ("inception", "digits")
DIGITS_REF_PREFIX = "digits:"


def add_arguments(parser):
    parser.add_argument("--samples", default=None, help="samples: .npz (arr_0 uint8 NHWC) or a folder of images")
    parser.add_argument("--ref", required=True,
                        help="reference: .npz, folder, statistics file (--save-stats), or digits:test")
    parser.add_argument("--features", choices=FEATURES, default="inception",
                        help="feature network (default inception; digits: the embedded digits' network)")
    parser.add_argument("--inception", default=None, metavar="W.pth",
                        help="pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (default 64)")
    parser.add_argument("--out", default=None, metavar="M.json", help="write the metrics as JSON")
    parser.add_argument("--save-stats", default=None, metavar="F.npz",
                        help="write the reference's statistics (usable as --ref later); --samples optional then")
    add_mesh_argument(parser)


def _network(args, mesh):
    from var_jax.checkpoints import CheckpointError
    from var_jax.eval.evaluate import digits_network, inception_network
    from var_jax.eval.inception import InceptionWeightsError

    if args.features == "digits":
        if args.inception:
            raise CommandError("--inception is for --features inception; the digits network is built in")
        return digits_network()
    if not args.inception:
        raise CommandError("--features inception needs --inception W.pth: pytorch-fid's "
                           "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    try:
        return inception_network(user_path(args.inception), mesh, args.batch_size)
    except (CheckpointError, InceptionWeightsError) as e:
        raise CommandError(f"--inception: {first_line(e)}") from None


def _images(option: str, text: str, args, resolution: int | None = None):
    from var_jax.eval.sources import ArrayImages, SourceError, open_images
    if text.startswith(DIGITS_REF_PREFIX):
        if args.features != "digits":
            raise CommandError(f"{option} {text}: embedded digits references need --features digits")
        from var_jax.data.digits import SPLITS
        from var_jax.eval.digits_features import FEATURE_RESOLUTION, real_digits
        split = text[len(DIGITS_REF_PREFIX):]
        if split not in SPLITS:
            raise CommandError(f"{option} {text}: the digits split must be one of {', '.join(SPLITS)}")
        return ArrayImages(real_digits(split, resolution or FEATURE_RESOLUTION), name=text)
    try:
        return open_images(user_path(text))
    except SourceError as e:
        raise CommandError(f"{option} {first_line(e)}") from None


def _check_comparable(samples, ref_shape):
    """Refuse samples and references of different image sizes or colour kinds (eval/evaluate.image_mismatch)."""
    from var_jax.eval.evaluate import image_mismatch, image_shape_of
    problem = image_mismatch(image_shape_of(samples), ref_shape) if samples is not None else None
    if problem:
        raise CommandError(problem)


def run(args):
    from var_jax.eval import evaluate
    from var_jax.eval.feature_metrics import IS_SPLIT_SIZE
    from var_jax.eval.sources import SourceError

    if args.samples is None and args.save_stats is None:
        raise CommandError("give --samples (to score them) and/or --save-stats (to store the reference's statistics)")
    mesh = batch_mesh(args.mesh, args.batch_size)
    network = _network(args, mesh)

    samples = _images("--samples", args.samples, args) if args.samples else None
    resolution = samples.image_shape[0] if samples is not None else None
    ref_path = None if args.ref.startswith(DIGITS_REF_PREFIX) else user_path(args.ref)
    try:
        if ref_path is not None and ref_path.is_file() and evaluate.is_stats_file(ref_path):
            if args.save_stats:
                raise CommandError(f"--ref {ref_path} is already a statistics file; --save-stats needs images")
            ref = evaluate.load_stats(ref_path, network)
            _check_comparable(samples, ref.image_shape)
        else:
            ref_images = _images("--ref", args.ref, args, resolution)
            _check_comparable(samples, evaluate.image_shape_of(ref_images))
            ref = evaluate.compute_feature_set(ref_images, network, args.batch_size, desc="reference")
        if args.save_stats:
            stats_path = user_path(args.save_stats)
            stats_path.parent.mkdir(parents=True, exist_ok=True)
            evaluate.save_stats(stats_path, ref, network)
            print(f"wrote reference statistics of {ref.num_images} images to {stats_path}")
        if samples is None:
            return 0
        smp = evaluate.compute_feature_set(samples, network, args.batch_size, desc="samples")
        metrics = evaluate.compare(smp, ref, mesh=mesh)
    except (SourceError, evaluate.StatsFileError, ValueError) as e:   # e.g. too few images for k-NN radii
        raise CommandError(first_line(e)) from None

    warning = evaluate.too_few_images(smp, ref)
    if warning:
        print(f"var-jax eval: warning: {warning}", file=sys.stderr)
    result = {**metrics, "num_samples": smp.num_images, "num_ref": ref.num_images, "warning": warning,
              "inception_score_splits": smp.is_splits, "inception_score_split_size": IS_SPLIT_SIZE,
              "features": network.kind, "network": network.network_id,
              "weights": str(user_path(args.inception)) if args.inception else None,
              "weights_sha256": network.sha256, "samples": str(user_path(args.samples)), "ref": args.ref
              if ref_path is None else str(ref_path)}
    if network.kind == "digits":
        result["sfid_note"] = "digits: sfid is the Fréchet distance of the 8x8 block-mean pixels"
    if args.out:
        out_path = user_path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
    pr = ("precision/recall n/a (no reference features)" if metrics["precision"] is None else
          f"precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}")
    print(f"FID {metrics['fid']:.4f}  sFID {metrics['sfid']:.4f}  IS {metrics['inception_score']:.4f}  {pr}  "
          f"({smp.num_images} samples vs {ref.num_images} references, {network.kind} features"
          + (f"; wrote {user_path(args.out)}" if args.out else "") + ")")
    return 0
