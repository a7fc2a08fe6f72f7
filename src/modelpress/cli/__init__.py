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
from modelpress.cli import compress, distill, evaluate, export, fit, heal, plan, prune, report, run
from modelpress.errors import UserError

SUBCOMMANDS = {
    "plan": plan,
    "compress": compress,
    "prune": prune,
    "distill": distill,
    "heal": heal,
    "eval": evaluate,
    "export": export,
    "run": run,
    "fit": fit,
    "report": report,
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the usage block is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelpress", description=modelpress.__doc__.strip())
    parser.add_argument("--version", action="version", version=f"modelpress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        doc = (module.__doc__ or "").strip()
        sub = subparsers.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    return parser


def interrupt(signum, frame):
    raise KeyboardInterrupt


def quiet_third_party() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("gguf", "datasets", "compressed_tensors", "accelerate"):  # their warnings repeat what our one line says
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    quiet_third_party()
    signal.signal(signal.SIGTERM, interrupt)  # `kill` cleans up like Ctrl-C: no half-written output
    try:
        return args.handler(args)
    except UserError as e:
        print(f"modelpress {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modelpress {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the disk or the file system refused: full, read-only, not a folder
        print(f"modelpress {args.command}: error: {os_error(e)}", file=sys.stderr)
        return 2


def os_error(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write or read{where}: {e.strerror or e}; check the path, its permissions and free space"


if __name__ == "__main__":
    sys.exit(main())
