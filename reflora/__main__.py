"""``python -m reflora``: the command-line entry point (also installed as ``reflora``).

``reflora bench`` runs the benchmark suite (``make demo``); ``reflora demo`` is the quick
matrix-factorization comparison alone (:mod:`reflora.bench.demo`); ``reflora --version`` prints
the version.
"""

from __future__ import annotations

import argparse
import math
import sys

from reflora import __version__
from reflora.bench.demo import run_demo

__all__ = ["main", "positive_lr"]


def positive_lr(text: str) -> float:
    """Argparse ``type`` for a learning rate: a positive, finite number.

    Args:
        text: The command-line value.

    Returns:
        The value as a float.

    Raises:
        argparse.ArgumentTypeError: If ``text`` is not a number, or is zero, negative, inf or nan
            (argparse turns this into ``error: argument --lr: ...`` and exit code 2).
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"expected a positive finite number; got {text!r} (pass a step size such as 0.01)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reflora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="LoRA vs RefLoRA on the paper's matrix-factorization problem")
    d.add_argument("--lr", type=positive_lr, nargs="+", default=[0.01, 0.03],
                   help="step sizes, positive (default 0.01 0.03)")
    d.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    d.add_argument("--iters", type=int, default=100, help="iterations (default 100)")
    d.set_defaults(func=run_demo)
    b = sub.add_parser("bench", help="RefLoRA vs LoRA and its neighbours on mf, text, vision and graph tasks")
    from reflora.bench.cli import add_arguments, bench

    add_arguments(b)
    b.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("seeds", "steps", "iters", "rank"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"reflora: --{name} must be >= 1; got {value}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
