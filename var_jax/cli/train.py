"""Train the tokenizer or the VAR transformer from a config file; rerun with the same --workdir to resume.

    python -m var_jax train --config configs/digits_var.py --workdir workdirs/digits_var \\
        --config.tokenizer_checkpoint=workdirs/digits_tokenizer
    python -m var_jax train --config configs/imagenet_var.py:depth=16,data_path=/data/imagenet/train \\
        --workdir runs/d16 --config.tokenizer_checkpoint=checkpoints/vae --config.total_steps=4 --config.mesh=2,2,2

--config FILE[:ARG]: a python file with get_config(ARG) (var_jax/train/config_base.py explains ARG).
--config.KEY=VALUE (or --config.KEY VALUE) overrides any field, type-checked; an unknown KEY is an error; the
mesh is written as on every command (--config.mesh=2,2,2 or '(2,2,2)'). Multi-host: pass --distributed (TPU
pods: everything auto-detected) or --coordinator_address/--num_processes/--process_id (see launch/README.md).
"""
import argparse
import ast
import importlib.util
import os

from var_jax.cli.common import CommandError, add_distributed_arguments, parse_mesh

OVERRIDE_PREFIX = "--config."


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True, metavar="FILE[:ARG]", help="config file, e.g. configs/digits_var.py")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, samples, model/")
    add_distributed_arguments(parser)
    parser.add_argument("--print_config", action="store_true", help="print the final config and exit")


def take_extra_arguments(args, extra):
    """The `--config.KEY=VALUE` overrides, which argparse cannot declare one by one, from what it left over."""
    args.config_overrides = config_overrides(extra)


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv):
    """parser's options from argv, with what argparse left over read as `--config.KEY=VALUE` overrides into
    args.overrides (anything else: the parser's usage error)."""
    args, extra = parser.parse_known_args(list(argv))
    try:
        args.overrides = config_overrides(extra)
    except CommandError as e:
        parser.error(str(e))
    return args


def config_overrides(args):
    """['KEY=VALUE', ...] from `--config.KEY=VALUE` / `--config.KEY VALUE` arguments; anything else is an error."""
    overrides, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(OVERRIDE_PREFIX):
            raise CommandError(f"unrecognized argument {arg}")
        key = arg[len(OVERRIDE_PREFIX):]
        if "=" not in key:
            if i + 1 >= len(args):
                raise CommandError(f"{arg} needs a value")
            key, i = f"{key}={args[i + 1]}", i + 1
        overrides.append(key)
        i += 1
    return overrides


def load_config(spec: str):
    """Import FILE, call get_config(ARG) (or get_config())."""
    path, _, arg = spec.partition(":")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise CommandError(f"--config: no config file {path}")
    name = os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(f"_var_jax_config_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise CommandError(f"--config: {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError, TypeError) as e:
        raise CommandError(f"--config {spec}: {e}") from None


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides):
    """Set KEY=VALUE pairs on a locked ConfigDict; unknown keys and wrong types are errors naming the key."""
    config.lock()
    for item in overrides:
        key, _, text = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        try:
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(leaf)
            old = node[leaf]
            value = parse_mesh(text, f"--config.{key}") if key == "mesh" else _parse_value(text)
            if isinstance(old, str) and not isinstance(value, str):
                value = text                     # e.g. a numeric-looking path
            if isinstance(old, tuple) and isinstance(value, list):
                value = tuple(value)
            if isinstance(old, tuple) and isinstance(value, (int, float)):
                value = (value,)
            node[leaf] = value
        except KeyError:
            raise CommandError(f"--config.{key}: no such config field") from None
        except (TypeError, ValueError) as e:
            raise CommandError(f"--config.{key}={text}: {e}") from None
    return config


def maybe_initialize_distributed(args):
    import jax
    explicit = any(v is not None for v in (args.coordinator_address, args.num_processes, args.process_id))
    if explicit:
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def run(args):
    config = apply_overrides(load_config(args.config), getattr(args, "config_overrides", []))
    if args.print_config:
        print(config)
        return 0
    maybe_initialize_distributed(args)

    from var_jax.checkpoints import CheckpointError
    from var_jax.train.checkpointing import CheckpointMismatch
    from var_jax.train.stage import ConfigError, TrainingError
    from var_jax.train.trainer import train
    try:
        train(config, args.workdir)
    except (ConfigError, CheckpointMismatch, CheckpointError, TrainingError) as e:
        raise CommandError(str(e)) from None
    return 0
