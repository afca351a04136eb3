"""`python -m var_jax <command>` / `var-jax <command>`.

Each command lives in its own module of this package, exposing `add_arguments(parser)` and `run(args)`.
Modules are imported only when their command runs, so `--help` is quick and one command's heavy imports
never slow another.
"""
import argparse
import importlib
import sys

# command name -> (module under var_jax.cli, one-line help)
COMMANDS = {
    "convert": ("convert", "convert reference PyTorch checkpoints (VQVAE, VAR) into a var-jax checkpoint directory"),
    "reconstruct": ("reconstruct", "tokenize and decode images with a tokenizer checkpoint; prints PSNR"),
    "train": ("train", "train the tokenizer or the VAR transformer from a config file"),
    "sample": ("sample", "class-conditional sampling into an ADM-evaluator .npz and a PNG grid"),
    "edit": ("edit", "zero-shot in-painting, out-painting and class-conditional editing"),
    "demo": ("demo", "train both stages on the embedded digits dataset and sample from the result"),
}


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3); an error naming the option `what` when it is not a non-empty integer list."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CommandError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CommandError(f"{what} is empty")
    return values


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported and given its arguments."""
    parser = argparse.ArgumentParser(prog="var-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"var_jax.cli.{module_name}")
        cmd = sub.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return args._run(args)
    except CommandError as e:
        print(f"var-jax {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
