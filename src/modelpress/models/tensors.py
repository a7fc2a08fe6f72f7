"""Which tensors get quantized, and a stream of a checkpoint's tensors one at a time.

The model is instantiated on the ``meta`` device (no memory) to learn every Linear's name and
shape; the weights then stream from the safetensors shards one tensor at a time, so RTN's peak
memory is about one tensor whatever the model's size.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn

from modelpress.errors import UserError
from modelpress.formats.integer import IntFormat
from modelpress.models import loading
from modelpress.models.arch import arch_for

logger = logging.getLogger("modelpress")


@dataclass
class Targets:
    """The quantization plan for each Linear: plain data, recorded with the run.

    Attributes:
        formats: module name -> the format its weight is stored in.
        kept: module name -> why it stays unquantized.
        in_features: module name -> input dimension, for every Linear considered.
    """

    formats: dict[str, IntFormat] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    in_features: dict[str, int] = field(default_factory=dict)

    def output_config(self, hf_config) -> dict:
        return loading.clean_config(hf_config).to_dict()


def _fallback_format(fmt: IntFormat, in_features: int, fallback: str) -> IntFormat | None:
    """The format for a layer whose input dimension the group size does not divide."""
    if fallback == "keep":
        return None
    group = math.gcd(in_features, fmt.group_size)  # largest divisor of both: still a power of 2 for 2^k groups
    return replace(fmt, group_size=group)


def head_name(model: nn.Module) -> str | None:
    """Module name of ``model``'s output head (``lm_head`` in most models), or ``None``."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None) if isinstance(head, nn.Linear) else None


def head_is_tied(model: nn.Module) -> bool:
    """Whether ``model``'s output head is the input embedding's tensor: by identity on a loaded
    model, by ``tie_word_embeddings`` on a meta model (whose ties ``init_empty_weights`` leaves undone)."""
    head = model.get_output_embeddings()
    return head.weight is model.get_input_embeddings().weight or getattr(model.config, "tie_word_embeddings", False)


def _candidates(meta: nn.Module, exclude: list[str], targets: Targets, head: bool = False) -> Iterator[tuple[str, int]]:
    """``(name, in_features)`` of the decoder Linears a method may change, and with ``head`` the
    output head last; the others (excluded, MoE routers, a tied head) go into ``targets.kept``
    with the reason.

    The head is a target only when no ``exclude`` pattern matches it (llm-compressor's ``ignore``
    convention: the default list excludes it) and it is a tensor of its own: a head tied to the
    input embedding stays in float, since quantizing it would store a second copy of the table.
    """
    arch = arch_for(meta.config)
    for name, module in meta.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(arch.layers + "."):
            continue
        targets.in_features[name] = module.in_features
        if any(re.search(p, name) for p in exclude):
            targets.kept[name] = "excluded"
        elif arch.moe and any(name.endswith("." + k) for k in arch.moe.kept):
            targets.kept[name] = "gate of a mixture-of-experts branch"
        else:
            yield name, module.in_features
    name = head_name(meta) if head else None
    if name is None or any(re.search(p, name) for p in exclude):
        return
    module = meta.get_submodule(name)
    targets.in_features[name] = module.in_features
    if head_is_tied(meta):
        targets.kept[name] = "tied to the input embedding (a quantized head would be a second copy of it)"
        logger.info("%s is tied to the input embedding: it stays in float", name)
    else:
        yield name, module.in_features


def prune_targets(meta: nn.Module, config) -> Targets:
    """Each decoder Linear a pruning ``config`` applies to, with its sparsity pattern as its "format".

    Raises:
        UserError: an N:M pattern's M does not divide some layers' inputs, or nothing is left.
    """
    pattern = config.sparsity_pattern()
    targets = Targets()
    misfits = []
    for name, in_features in _candidates(meta, config.exclude, targets):
        if pattern.m is not None and in_features % pattern.m:
            misfits.append(f"{name} ({in_features})")
        targets.formats[name] = pattern
    if misfits:
        raise UserError(f"the {pattern.name} pattern needs input widths that are multiples of {pattern.m}: "
                        f"{', '.join(misfits[:3])}{' and more' if len(misfits) > 3 else ''}; --exclude them")
    if not targets.formats:
        raise UserError("no Linear layer is left to prune; check the exclude patterns")
    return targets


def plan_targets(meta: nn.Module, config) -> Targets:
    """Decide each decoder Linear's format under ``config`` (exclusions, group-size fallbacks).

    Raises:
        UserError: the group size does not divide some layers' inputs and ``group_fallback`` is
            ``"error"`` (the message names the layers and the options).
    """
    targets = Targets()
    misfits = []
    for name, in_features in _candidates(meta, config.exclude, targets, head=True):
        fmt = config.format_for(name)
        if fmt is None:
            targets.kept[name] = "kept in float by an override"
        elif not fmt.divides(in_features):
            misfits.append(name)
            layer_fmt = _fallback_format(fmt, in_features, config.group_fallback)
            if layer_fmt is None:
                targets.kept[name] = f"group size {fmt.group_size} does not divide {in_features}"
            else:
                targets.formats[name] = layer_fmt
        else:
            targets.formats[name] = fmt
    if misfits and config.group_fallback == "error":
        dims = sorted({targets.in_features[n] for n in misfits})
        shown = ", ".join(misfits[:3]) + (f" and {len(misfits) - 3} more" if len(misfits) > 3 else "")
        fmt = config.format_for(misfits[0])
        raise UserError(
            f"group size {fmt.group_size} does not divide the input dimension ({', '.join(map(str, dims))}) "
            f"of {shown}; choose a group size that divides it, or --group-fallback keep|shrink"
        )
    if misfits:
        logger.warning("%d layers use the group-size fallback %r", len(misfits), config.group_fallback)
    for parent, parts in split_fused_layers(targets).items():
        logger.warning("%s: %s are one fused layer in vLLM, which needs one scheme for all of them and refuses "
                       "or misreads this checkpoint (transformers and llama.cpp take it); give them one format",
                       parent, ", ".join(f"{p} {f}" for p, f in parts.items()))
    if not targets.formats:
        if misfits:
            group = config.format_for(misfits[0]).group_size
            raise UserError(f"no Linear layer is left to quantize: group size {group} divides none of "
                            "the layers --group-fallback keep would keep; choose a group size that divides them")
        raise UserError("no Linear layer is left to quantize; check the exclude patterns")
    return targets


# The Linears that vLLM's models fuse into one layer (their ``packed_modules_mapping``): q/k/v into
# qkv_proj, gate/up into gate_up_proj. vLLM runs a fused layer under one compressed-tensors scheme.
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def split_fused_layers(targets: Targets) -> dict[str, dict[str, str]]:
    """The fused layers (as vLLM fuses them) whose parts ``targets`` gives different formats:
    ``{parent module: {part: format name or "float"}}``.

    Example:
        >>> from modelpress.formats.integer import parse_int_format
        >>> t = Targets(formats={"a.q_proj": parse_int_format("int8"), "a.k_proj": parse_int_format("int4-g64"),
        ...                      "a.v_proj": parse_int_format("int4-g64"), "a.o_proj": parse_int_format("int8")})
        >>> split_fused_layers(t)
        {'a': {'q_proj': 'int8-channel', 'k_proj': 'int4-g64', 'v_proj': 'int4-g64'}}
    """
    chosen = {n: f.name for n, f in targets.formats.items()} | {n: "float" for n in targets.kept}
    out = {}
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        for fused in VLLM_FUSED:
            if leaf != fused[0]:
                continue
            parts = {p: chosen[f"{parent}.{p}"] for p in fused if f"{parent}.{p}" in chosen}
            if len(set(parts.values())) > 1:
                out[parent] = parts
    return out


def _stream_safetensors(files) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of ``files``, read from a handle of its own: a tensor safetensors returns is
    backed by the file's memory map, whose pages stay in the process's resident memory while
    the handle is open, so one handle per file would grow to the whole shard (1.1 GB of
    Gemma-3-270M's 1.1 GB file by the last tensor); per tensor, its pages go with it."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name)
            yield name, loading.checked(name, tensor)


def _stream_loaded(source) -> Iterator[tuple[str, torch.Tensor]]:
    model = loading.load_model(source)  # checks every tensor is finite
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): stored once
            continue
        seen.add(tensor.data_ptr())
        yield name, tensor


def unique_state_keys(model: nn.Module) -> set[str]:
    """State-dict names with each shared (tied) tensor counted once, under its first name."""
    seen: set[int] = set()
    keys = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keys.add(name)
    return keys


def streamable(source, expected: dict[str, tuple[int, ...] | None]) -> dict[str, str] | None:
    """The shard index (tensor name -> shard) when ``source``'s tensors can be read one at a time
    under the model's names, or ``None`` when the model must be loaded whole.

    Streaming needs the checkpoint's names to be exactly ``expected``'s; their shapes (where
    ``expected`` gives one) are checked from the shard headers before any work. Otherwise (GGUF, or
    names transformers remaps on load) :func:`~modelpress.models.loading.load_model` loads it and
    refuses any tensor transformers could not place, so a missing or extra tensor is an error
    on both paths.

    Raises:
        UserError: a shard is unreadable, or a tensor's shape is not the config's.
    """
    index = loading.shard_index(source)
    if not index or set(index) != set(expected):
        return None
    loading.check_shapes(index, {k: v for k, v in expected.items() if v is not None})
    return index


def meta_shapes(meta: nn.Module, names) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of the named tensors of a (meta) model."""
    state = meta.state_dict(keep_vars=True)
    return {n: tuple(state[n].shape) for n in names}


def tensor_stream(source, meta: nn.Module) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """``(iterator of (name, tensor), count)`` over the model's weights in checkpoint order.

    Streams straight from the shards when their tensor names are the model's own; otherwise
    (GGUF, or a checkpoint whose names transformers remaps on load) loads the model once. Either
    way a missing, extra or misshapen tensor is refused (see :func:`streamable`).
    """
    expected = unique_state_keys(meta)
    index = streamable(source, meta_shapes(meta, expected))
    if index is not None:
        return _stream_safetensors(source.safetensors_files()), len(index)
    logger.info("loading %s whole (its tensor names are not the model's)", source.path)
    return _stream_loaded(source), len(expected)
