"""`python -m var_jax <command>` / `var-jax <command>`.

Each command lives in its own module of this package, exposing `add_arguments(parser)` and `run(args)`, and
`take_extra_arguments(args, extra)` if it accepts arguments argparse cannot declare (train's `--config.KEY`).
The command modules import their heavy dependencies inside `run`, so `--help` is quick and one command's heavy
imports never slow another; the options they share are in `common.py`.
"""
import argparse
import sys

from var_jax.cli import convert, demo, edit, reconstruct, sample, scaling, tokenize, train
from var_jax.cli import eval as eval_command   # not `eval`: that would shadow the builtin here
from var_jax.cli.common import exit_on_command_error

# command name -> (its module, one-line help)
COMMANDS = {
    "convert": (convert, "convert reference PyTorch checkpoints (VQVAE, VAR) into a var-jax checkpoint directory"),
    "reconstruct": (reconstruct, "tokenize and decode images with a tokenizer checkpoint; prints PSNR"),
    "tokenize": (tokenize, "encode images once into the per-scale token ids the VAR stage trains from"),
    "train": (train, "train the tokenizer or the VAR transformer from a config file"),
    "sample": (sample, "class-conditional sampling into an ADM-evaluator .npz and a PNG grid"),
    "edit": (edit, "zero-shot in-painting, out-painting and class-conditional editing"),
    "eval": (eval_command, "FID, sFID, Inception Score, precision and recall of samples against references (ADM evaluator)"),
    "scaling": (scaling, "power-law fits of loss against parameters and compute over a sweep (launch/sweep.py)"),
    "demo": (demo, "train both stages on the embedded digits dataset and sample from the result"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command` is given its arguments."""
    parser = argparse.ArgumentParser(prog="var-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        cmd = sub.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, _take_extra=getattr(module, "take_extra_arguments", None))
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra and args._take_extra is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return exit_on_command_error(f"var-jax {args.command}", _run, args, extra)


def _run(args, extra):
    if args._take_extra is not None:
        args._take_extra(args, extra)
    return args._run(args)
