"""Options shared by several subcommands, defined once so they cannot drift apart."""

from __future__ import annotations

import argparse

from modelpress.data import PPL_512


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_eval_text(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation (protocol ppl-512)")
    group.add_argument("--text", metavar="FILE", help="UTF-8 text (.txt) or JSONL with a 'text' field to evaluate on")
    group.add_argument(
        "--windows",
        type=positive_int,
        default=PPL_512.n_windows,
        metavar="N",
        help=f"number of {PPL_512.seq_len}-token windows (default {PPL_512.n_windows}, the ppl-512 protocol)",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
