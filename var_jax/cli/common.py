"""What the commands share: the one-line user error, option parsers, and the option groups several commands take
(mesh, run settings, sampling options and accelerators, hosts). Heavy imports stay inside the functions, so
`--help` stays quick."""
import argparse
import math
import re
import sys

from var_jax.paths import StorageUnavailable


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def exit_on_command_error(prog: str, fn, *args):
    """fn(*args); a CommandError (or a path whose storage library is missing) is printed as 'PROG: error: ...' and
    exits with status 2 (no traceback)."""
    try:
        return fn(*args)
    except (CommandError, StorageUnavailable) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3); an error naming the option `what` when it is not a non-empty integer list."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CommandError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CommandError(f"{what} is empty")
    return values


def parse_mesh(text: str, what: str = "--mesh") -> tuple[int, ...]:
    """'2,2,2' or '(2,2,2)' -> (2, 2, 2): the one mesh syntax of every command (train's --config.mesh too)."""
    return parse_int_list(text.strip().strip("()[]"), what)


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", default="-1,1,1",
                        help="device mesh sizes data,fsdp,tensor, e.g. 2,2,2 or (2,2,2); -1 = all remaining devices "
                             "(default -1,1,1)")


def batch_mesh(mesh_text: str, batch_size: int):
    """The device mesh of a --mesh option, with --batch-size checked to split evenly over its data axes."""
    from var_jax.sharding import data_parallel_size, make_mesh
    try:
        mesh = make_mesh(parse_mesh(mesh_text))
    except ValueError as e:
        raise CommandError(f"--mesh: {e}") from None
    dp = data_parallel_size(mesh)
    if batch_size < 1 or batch_size % dp:
        raise CommandError(f"--batch-size {batch_size} must be a positive multiple of the {dp} data-parallel "
                           f"devices of mesh {dict(mesh.shape)}")
    return mesh


# Sampling seeds reach jax.random.key as a uint32 (var_jax.sample.runner): anything else would wrap or overflow.
MAX_SEED = 2 ** 32 - 1


def check_sampling_args(args) -> None:
    """sample's and edit's --cfg, --top-k, --top-p and --seed, checked before any model is loaded (a NaN
    guidance scale would otherwise give NaN images only after the model loaded and compiled)."""
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise CommandError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if not math.isfinite(args.top_p) or not 0.0 <= args.top_p <= 1.0:
        raise CommandError(f"--top-p must be in [0, 1] (0: off), got {args.top_p}")
    if args.top_k < 0:
        raise CommandError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed must be in 0..{MAX_SEED} (a uint32), got {args.seed}")


def add_run_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """How this process runs the transformer (var_jax.transformer.RunSettings; not part of the model)."""
    # no `choices=`: importing the transformer here would slow `--help`; run_settings_from_args checks them
    parser.add_argument("--compute-dtype", default="auto",
                        help="activation dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32 or bfloat16")
    parser.add_argument("--attention-impl", default="auto",
                        help="auto, grouped, xla, cudnn, splash or pallas (see var_jax/transformer/config.py)")


def run_settings_from_args(args):
    """The transformer.RunSettings of --compute-dtype / --attention-impl, resolved for this process's backend."""
    from var_jax.transformer import RunSettings
    try:
        return RunSettings(compute_dtype=args.compute_dtype, attention_impl=args.attention_impl).resolved()
    except ValueError as e:
        field, _, why = str(e).partition(":")
        raise CommandError(f"--{field.replace('_', '-')}:{why}") from None


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-host options (read by var_jax.cli.train.maybe_initialize_distributed)."""
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (auto-detects TPU pods and SLURM)")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-process)")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)


def add_accelerator_arguments(parser: argparse.ArgumentParser) -> None:
    """sample's and edit's sampling accelerators (var_jax/sample/accelerate.py); every one is off by default."""
    group = parser.add_argument_group("sampling accelerators (off by default; each trades quality for speed or "
                                      "memory: benchmarks/accelerate.py measures both)")
    group.add_argument("--cfg-stop-scale", type=int, default=None, metavar="K",
                       help="from scale K (0-based) on run only the conditional rows, unguided: up to half the work "
                       "of those scales; trades the late scales' guidance (K = the number of scales = guidance "
                       "everywhere)")
    group.add_argument("--refiner", default=None, metavar="CKPT",
                       help="a second (smaller) model of the same tokenizer that draws the scales from "
                       "--draft-scales on, after prefilling its KV cache over the drafted ones in one pass (CoDe): "
                       "the late scales hold most of the work; trades --checkpoint's detail for the refiner's speed")
    group.add_argument("--draft-scales", type=int, default=None, metavar="N",
                       help="with --refiner: --checkpoint draws scales 0..N-1, the refiner the rest")
    group.add_argument("--prune", default=None, metavar="SI:R,...",
                       help="cached token pruning (FastVAR-style): at scale SI every block computes only its "
                       "L - floor(L*R) tokens farthest from the scale's mean token, the rest take the last unpruned "
                       "scale's block output, upsampled; only kept keys are stored. Fewer FLOPs and keys at the "
                       "large scales; trades detail in flat regions. E.g. 8:0.5,9:0.75")
    group.add_argument("--kv-window", default=None, metavar="C,W",
                       help="scale s attends to scales [0, C) and [s-W, s] only and the KV cache holds only those: "
                       "less cache memory and attention work; trades long-range context. E.g. 1,2")


def accelerators_from_args(args, model_config: dict):
    """The sample.accelerate.Accelerators of the options above, checked against the model's config.json (and the
    refiner's) before anything loads; a CommandError in one line otherwise."""
    from var_jax.checkpoints import CheckpointError, read_model_config
    from var_jax.sample.accelerate import Accelerators, check_refiner_config, parse_kv_window, parse_prune
    from var_jax.transformer.config import VARConfig
    try:
        accel = Accelerators(cfg_stop_scale=args.cfg_stop_scale, draft_scales=args.draft_scales,
                             prune=() if args.prune is None else parse_prune(args.prune),
                             kv_window=None if args.kv_window is None else parse_kv_window(args.kv_window))
        var_cfg = VARConfig.from_dict(model_config["var"])
        try:
            accel.validate(var_cfg.num_scales, guided=args.cfg != 0, refiner=args.refiner is not None,
                           order=var_cfg.order)
        except ValueError as e:   # the settings' names as this command spells them
            option = lambda m: "--" + m.group(0).replace("_", "-")
            raise ValueError(re.sub(r"\b(cfg_stop_scale|draft_scales|prune|kv_window|cfg)\b", option, str(e))) from None
        if args.refiner is not None:
            try:
                check_refiner_config(model_config, read_model_config(args.refiner))
            except (CheckpointError, OSError, ValueError) as e:
                raise ValueError(f"--refiner {args.refiner}: {e}") from None
    except ValueError as e:
        raise CommandError(str(e)) from None
    return accel
