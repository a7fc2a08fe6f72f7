"""Deployment arithmetic before any compression: size per format, KV cache, fit, decode speed of light.

Example:
    modelpress plan 70B --hardware H100
    modelpress plan path/to/config.json --hardware "RTX 4090" --context 8192 --batch 4 --json
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

from modelpress.cli import options
from modelpress.errors import UserError
from modelpress.plan import hardware as hw_catalogue
from modelpress.plan.formats import DEFAULT_FORMATS, plan_format
from modelpress.plan.memory import (
    KV_BYTES,
    RUNTIME_RESERVE,
    ModelShape,
    PlanFormat,
    activation_bytes,
    bits_per_weight,
    fit,
    human_count,
    kv_cache_bytes,
    parse_size,
    weight_bytes,
)
from modelpress.plan.roofline import (
    decode_roofline,
    flops_per_token,
    prefill_tokens_per_s,
)
from modelpress.record import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a size such as 70B or 135M, a config.json, a checkpoint folder, a .gguf file or a hub id")
    parser.add_argument("--hardware", default="H100", metavar="NAME",
                        help="device for the speed-of-light numbers (default H100); see --list-hardware")
    parser.add_argument("--context", type=options.positive_int, default=4096, metavar="N", help="tokens of context per sequence (default 4096)")
    parser.add_argument("--batch", type=options.positive_int, default=1, metavar="N", help="concurrent sequences (default 1)")
    parser.add_argument("--kv-dtype", choices=sorted(KV_BYTES), default="fp16", help="KV-cache element type (default fp16)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS), metavar="LIST",
                        help=f"comma-separated formats (default {','.join(DEFAULT_FORMATS)})")
    parser.add_argument("--list-hardware", action="store_true", help="print the hardware catalogue and exit")
    options.add_json(parser)


def load_shape(spec: str) -> ModelShape:
    """A :class:`ModelShape` from a size (``70B``), a config.json, a folder, a GGUF file or a hub id."""
    return load_model(spec)[0]


def load_model(spec: str) -> tuple[ModelShape, object | None]:
    """``(shape, config)``; the config is ``None`` for a bare size."""
    params = parse_size(spec)
    if params is not None:
        return ModelShape.from_param_count(params, name=spec.strip()), None
    from modelpress.models.shape import shape_from_config

    config, name = load_config(spec)
    shape = shape_from_config(config, name)
    note = _sparsity_note(Path(spec).expanduser())
    return (replace(shape, notes=(*shape.notes, note)) if note else shape), config


def _sparsity_note(folder: Path) -> str | None:
    """What a checkpoint ``prune`` wrote gains from its zeros (its record says how many): nothing
    in memory, which is what the plan counts."""
    from modelpress.prune import what_it_buys_from_record
    from modelpress.record import read_record

    return what_it_buys_from_record(read_record(folder))


def load_config(spec: str):
    """``(config, name)`` of a config.json, a folder, a GGUF file or a hub id (not a bare size)."""
    from modelpress.models import loading

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json" or path.is_dir() and (path / "config.json").is_file():
        file = path if path.is_file() else path / "config.json"
        config = loading.load_config_file(file)
        name = path.parent.name if path.is_file() else path.name
    else:
        config = loading.load_config(loading.resolve(spec))
        name = path.name
    return config, name


def plan_formats(names: list[str], config=None) -> list[PlanFormat]:
    """The planner's formats; with a ``config``, GGUF file types are sized tensor by tensor."""
    return [(_exact_gguf(name, config) if config is not None else None) or plan_format(name) for name in names]


def _exact_gguf(name: str, config) -> PlanFormat | None:
    """A GGUF file type sized with the exporter's own per-tensor types (llama.cpp's rules, over the
    meta-device shapes): the plan's bytes are the tensor data ``export --to gguf`` writes.
    ``None`` for a name that is not a quantized GGUF file type, or an architecture the GGUF
    exporter does not support (the averaged estimate of :func:`plan_format` is used then)."""
    from modelpress.export.gguf import GGUFLayout
    from modelpress.export.gguf_mix import ALIASES, FILE_TYPES, FLOAT_TYPES

    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in FILE_TYPES or key in FLOAT_TYPES:
        return None
    try:
        entries = GGUFLayout(config, key).entries
    except UserError:
        return None
    quantized = [e for e in entries if e.type not in FLOAT_TYPES]
    rest = [e for e in entries if e.type in FLOAT_TYPES]

    def bits(es) -> float:
        numel = sum(math.prod(e.shape) for e in es)
        return 8 * sum(e.nbytes for e in es) / numel if numel else 0.0

    return PlanFormat(name.strip().lower(), bits(quantized), rest_bits=bits(rest),
                      exact_bytes=sum(e.nbytes for e in entries))


def build_plan(shape: ModelShape, hardware_name: str, formats: list[str], context: int, batch: int, kv_dtype: str,
               config=None) -> dict:
    """The whole plan as plain data (what ``--json`` prints and the table shows); ``config``
    (when the model has one) sizes GGUF file types exactly."""
    chosen = hw_catalogue.find_hardware(hardware_name)
    fmts = plan_formats(formats, config)
    kv = kv_cache_bytes(shape, context, batch, kv_dtype)
    act = activation_bytes(shape, context, batch)
    rows = []
    for fmt in fmts:
        wb = weight_bytes(shape, fmt)
        needed = wb + (kv or 0.0) + act
        roof1 = decode_roofline(shape, fmt, chosen, context=0, batch=1, kv_dtype=kv_dtype)
        roof = decode_roofline(shape, fmt, chosen, context=context, batch=batch, kv_dtype=kv_dtype)
        fits = {hw.name: fit(needed, hw.memory) for hw in hw_catalogue.CATALOGUE}
        rows.append({
            "name": fmt.name,
            "bits_per_weight": round(bits_per_weight(shape, fmt), 4),
            "linear_bits_per_weight": fmt.bits,
            "weight_bytes": wb,
            "weight_bytes_exact": fmt.exact_bytes is not None,
            "weight_gb": wb / 1e9,
            "weight_gib": wb / 2**30,
            "needed_bytes": needed,
            "decode_tokens_per_s": roof1.tokens_per_s,
            "decode_tokens_per_s_at_context": roof.tokens_per_s,
            "arithmetic_intensity": roof1.intensity,
            "bound": roof1.bound,
            "batch_to_compute_bound": roof1.batch_to_compute_bound,
            "prefill_tokens_per_s": prefill_tokens_per_s(shape, fmt, chosen, context),
            "fits": {name: f.fits for name, f in fits.items()},
            "devices_needed": {name: f.devices for name, f in fits.items()},
        })
    hardware = []
    for hw in hw_catalogue.CATALOGUE:
        hardware.append({
            "name": hw.name,
            "short": hw.short,
            "memory_bytes": hw.memory,
            "bandwidth_bytes_per_s": hw.bandwidth,
            "peak_flops": hw.flops,
            "fits": {r["name"]: r["fits"][hw.name] for r in rows},
            "devices_needed": {r["name"]: r["devices_needed"][hw.name] for r in rows},
        })
    return {
        "model": {
            "name": shape.name,
            "params": shape.total_params,
            "active_params": shape.params_per_token,
            "quantizable_params": sum(shape.linear_params.values()),
            "layers": shape.n_layers or None,
            "flops_per_token": flops_per_token(shape, context),
        },
        "hardware": {"name": chosen.name, "memory_bytes": chosen.memory, "bandwidth_bytes_per_s": chosen.bandwidth,
                     "peak_flops": chosen.flops, "ridge_point_fp16": chosen.ridge_point("fp16")},
        "context": context,
        "batch": batch,
        "kv_dtype": kv_dtype,
        "notes": list(shape.notes),
        "kv_cache_bytes": kv,
        "activation_bytes": act,
        "runtime_reserve_fraction": RUNTIME_RESERVE,
        "formats": rows,
        "hardware_fit": hardware,
    }


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def wide_console(width: int = 150):
    """A rich console; ``width`` columns wide when writing to a pipe or file, so tables do not wrap."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=width)


def print_plan(plan: dict) -> None:
    from rich.table import Table

    console = wide_console()
    m, hw = plan["model"], plan["hardware"]
    active = f", {human_count(m['active_params'])} active per token" if m["active_params"] != m["params"] else ""
    console.print(f"[bold]{m['name']}[/]: {human_count(m['params'])} parameters{active}; "
                  f"context {plan['context']} x batch {plan['batch']}, KV cache in {plan['kv_dtype']}")
    for note in plan["notes"]:
        console.print(f"note: {note}")
    if plan["kv_cache_bytes"] is None:
        console.print("KV cache: unknown for a bare size (pass a config.json); fit counts weights only")
    else:
        console.print(f"KV cache: {_gb(plan['kv_cache_bytes'])}; activations ~{_gb(plan['activation_bytes'])}; "
                      f"engines keep {plan['runtime_reserve_fraction']:.0%} of device memory free")
    t = Table(title=f"weights and decode speed of light on {hw['name']} "
                    f"({hw['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, ridge {hw['ridge_point_fp16']:.0f} FLOP/byte)")
    for col in ("format", "bits/weight", "weights", "GiB", "tok/s b=1", f"tok/s @{plan['context']} b={plan['batch']}",
                "FLOP/byte", "bound", "compute-bound from b="):
        t.add_column(col, justify="left" if col == "format" else "right")
    for r in plan["formats"]:
        t.add_row(r["name"], f"{r['bits_per_weight']:.3f}", _gb(r["weight_bytes"]), f"{r['weight_gib']:,.1f}",
                  f"{r['decode_tokens_per_s']:,.1f}", f"{r['decode_tokens_per_s_at_context']:,.1f}",
                  f"{r['arithmetic_intensity']:.1f}", r["bound"], str(r["batch_to_compute_bound"]))
    console.print(t)
    f = Table(title="devices needed: weights + KV + activations (1 = fits on one)")
    f.add_column("hardware")
    f.add_column("memory", justify="right")
    for r in plan["formats"]:
        f.add_column(r["name"], justify="right")
    for h in plan["hardware_fit"]:
        cells = [("[green]1[/]" if n == 1 else str(n)) for n in h["devices_needed"].values()]
        f.add_row(h["short"], f"{h['memory_bytes'] / 1e9:.0f} GB", *cells)
    console.print(f)


def print_catalogue() -> None:
    from rich.table import Table

    t = Table(title="hardware catalogue (dense peak)")
    for col in ("name", "aliases", "memory", "bandwidth", "fp16 TFLOP/s", "fp8/int8 TFLOP/s"):
        t.add_column(col)
    for hw in hw_catalogue.CATALOGUE:
        low = hw.flops.get("fp8") or hw.flops.get("int8")
        t.add_row(hw.name, ", ".join(hw.aliases), f"{hw.memory / 1e9:.0f} GB", f"{hw.bandwidth / 1e12:.3g} TB/s",
                  f"{hw.flops['fp16'] / 1e12:.0f}", f"{low / 1e12:.0f}" if low else "-")
    wide_console().print(t)


def main(args: argparse.Namespace) -> int:
    if args.list_hardware:
        print_catalogue()
        return 0
    if args.model is None:
        raise UserError("name a model: a size such as 70B, a config.json, a checkpoint folder or a .gguf file")
    formats = [f for f in (s.strip() for s in args.formats.split(",")) if f]
    if not formats:
        raise UserError("--formats is empty; name at least one format, e.g. fp16,int4-g128")
    hw_catalogue.find_hardware(args.hardware)  # an unknown name fails before any model is read
    shape, config = load_model(args.model)
    plan = build_plan(shape, args.hardware, formats, args.context, args.batch, args.kv_dtype, config=config)
    if args.json:
        print(to_json(plan, indent=2))
    else:
        print_plan(plan)
    return 0
