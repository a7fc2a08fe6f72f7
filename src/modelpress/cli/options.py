"""Options shared by several subcommands, defined once so they cannot drift apart."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modelpress.data import CALIB_128X512, PPL_512
from modelpress.errors import UserError

logger = logging.getLogger("modelpress")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_and_output(parser: argparse.ArgumentParser, output: str = "output folder (must not exist)") -> None:
    """The model every verb reads, and the output it writes (``-o``)."""
    parser.add_argument("model", help="checkpoint folder, .gguf file or hub id")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help=output)


def check_new_output(path: str) -> None:
    """Refuse an existing output before any work: nothing a user has is ever overwritten."""
    if Path(path).exists():
        raise UserError(f"output {path} already exists; choose a new name or remove it")


def add_damp(group) -> None:
    group.add_argument("--damp", type=float, default=0.01,
                       help="GPTQ: damping as a fraction of the mean Hessian diagonal (default 0.01)")


def make_config(config_class, fields: dict):
    """``config_class(**fields)``, its validation errors as one :class:`UserError` line naming the field."""
    from pydantic import ValidationError

    try:
        return config_class(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise UserError((f"{where}: " if where else "") + str(err["msg"]).removeprefix("Value error, ")) from None


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


def add_calibration(parser: argparse.ArgumentParser, title: str):
    """The calibration-text options (protocol calib-128x512 by default); returns their group."""
    g = parser.add_argument_group(title)
    g.add_argument("--calib", metavar="SOURCE",
                   help="calibration text: .txt, .jsonl, .parquet, a saved dataset folder, or hf:NAME[:CONFIG][@SPLIT]; "
                        "default: modelpress's built-in text")
    g.add_argument("--calib-field", default="text", metavar="FIELD", help="text column of a dataset or .jsonl (default text)")
    g.add_argument("--calib-samples", type=positive_int, default=CALIB_128X512.n_windows, metavar="N",
                   help=f"calibration windows (default {CALIB_128X512.n_windows}, protocol calib-128x512)")
    g.add_argument("--calib-seq-len", type=positive_int, default=CALIB_128X512.seq_len, metavar="T",
                   help=f"tokens per window (default {CALIB_128X512.seq_len})")
    g.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="windows per forward pass (default 8)")
    return g


def calibration_fields(args: argparse.Namespace) -> dict:
    """The :class:`~modelpress.compress.CalibrationConfig` fields the options of :func:`add_calibration` give."""
    return {"text": args.calib, "text_field": args.calib_field, "samples": args.calib_samples,
            "seq_len": args.calib_seq_len, "batch_size": args.batch_size}


def check_calibration_source(args: argparse.Namespace) -> None:
    if args.calib is not None and not args.calib.startswith("hf:") and not Path(args.calib).exists():
        raise UserError(f"calibration text not found: {args.calib}")


def add_report(parser: argparse.ArgumentParser, what: str) -> None:
    """``--report``: one self-contained HTML page (``OUT/report.html``), the same on every command."""
    parser.add_argument("--report", action="store_true",
                        help=f"also write OUT/report.html, one self-contained page (opens offline): {what}")


def write_command_report(args: argparse.Namespace, evaluation: dict | None = None) -> None:
    """With ``--report``: the page of the command's output folder, with its evaluation when it ran one."""
    if not getattr(args, "report", False):
        return
    from modelpress.report.verb import write_verb_report

    out = write_verb_report(args.output, Path(args.output) / "report.html", evaluation)
    logger.info("wrote %s", out)


def add_speed(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    """``--speed``: decode tokens/s measured on this machine beside its memory-bound ceiling."""
    parser.add_argument("--speed", action="store_true",
                        help=f"also measure the decode tokens/s of {what} (llama.cpp for .gguf, transformers "
                             "otherwise) beside this machine's memory-bound ceiling (its read bandwidth, measured)")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
