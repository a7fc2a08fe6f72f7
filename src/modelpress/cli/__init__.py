"""The ``modelpress`` command: one module per subcommand, dispatched from one visible table.

Each subcommand module has ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

# Our progress lines are the ones users read; the libraries' bars are noise next to them.
# tqdm reads this once, when first imported, so it is set before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")

import modelpress
from modelpress import __version__
from modelpress.cli import compress, evaluate, export, plan
from modelpress.errors import UserError

SUBCOMMANDS = {
    "plan": plan,
    "compress": compress,
    "eval": evaluate,
    "export": export,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description=modelpress.__doc__.strip())
    parser.add_argument("--version", action="version", version=f"modelpress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        doc = (module.__doc__ or "").strip()
        sub = subparsers.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _quiet_third_party() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    _quiet_third_party()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C: no half-written output
    try:
        return args.handler(args)
    except UserError as e:
        print(f"modelpress {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modelpress {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
