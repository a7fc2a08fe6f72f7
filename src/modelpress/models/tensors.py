"""Which tensors get quantized, and a stream of a checkpoint's tensors one at a time.

The model is instantiated on the ``meta`` device (no memory) to learn every Linear's name and
shape; the weights then stream from the safetensors shards one tensor at a time, so RTN's peak
memory is about one tensor whatever the model's size.
"""

from __future__ import annotations

import copy
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


def clean_config(hf_config):
    """A copy of the config without a GGUF ``quantization_config`` (the weights we write are ours)."""
    hf_config = copy.deepcopy(hf_config)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    return hf_config


def meta_model(hf_config) -> nn.Module:
    """The model's module tree on the ``meta`` device: names and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(clean_config(hf_config))


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
        return clean_config(hf_config).to_dict()


def _fallback_format(fmt: IntFormat, in_features: int, fallback: str) -> IntFormat | None:
    """The format for a layer whose input dimension the group size does not divide."""
    if fallback == "keep":
        return None
    group = math.gcd(in_features, fmt.group_size)  # largest divisor of both: still a power of 2 for 2^k groups
    return replace(fmt, group_size=group)


def plan_targets(meta: nn.Module, config) -> Targets:
    """Decide each decoder Linear's format under ``config`` (exclusions, group-size fallbacks).

    Raises:
        UserError: the group size does not divide some layers' inputs and ``group_fallback`` is
            ``"error"`` (the message names the layers and the options).
    """
    arch = arch_for(meta.config)
    fmt = config.int_format()
    targets = Targets()
    misfits = []
    for name, module in meta.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(arch.layers + "."):
            continue
        targets.in_features[name] = module.in_features
        if any(re.search(p, name) for p in config.exclude):
            targets.kept[name] = "excluded"
        elif arch.moe and any(name.endswith("." + k) for k in arch.moe.kept):
            targets.kept[name] = "gate of a mixture-of-experts branch"
        elif not fmt.divides(module.in_features):
            misfits.append(name)
            layer_fmt = _fallback_format(fmt, module.in_features, config.group_fallback)
            if layer_fmt is None:
                targets.kept[name] = f"group size {fmt.group_size} does not divide {module.in_features}"
            else:
                targets.formats[name] = layer_fmt
        else:
            targets.formats[name] = fmt
    if misfits and config.group_fallback == "error":
        dims = sorted({targets.in_features[n] for n in misfits})
        shown = ", ".join(misfits[:3]) + (f" and {len(misfits) - 3} more" if len(misfits) > 3 else "")
        raise UserError(
            f"group size {fmt.group_size} does not divide the input dimension ({', '.join(map(str, dims))}) "
            f"of {shown}; choose a group size that divides it, or --group-fallback keep|shrink"
        )
    if misfits:
        logger.warning("%d layers use the group-size fallback %r", len(misfits), config.group_fallback)
    if not targets.formats:
        raise UserError("no Linear layer is left to quantize; check the exclude patterns")
    return targets


def _checked(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise UserError(f"tensor {name} contains NaN or inf; the checkpoint is corrupt")
    return tensor


def _stream_safetensors(files) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, _checked(name, f.get_tensor(name))


def _stream_loaded(source) -> Iterator[tuple[str, torch.Tensor]]:
    model = loading.load_model(source)
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): stored once
            continue
        seen.add(tensor.data_ptr())
        yield name, _checked(name, tensor)


def unique_state_keys(model: nn.Module) -> set[str]:
    """State-dict names with each shared (tied) tensor counted once, under its first name."""
    seen: set[int] = set()
    keys = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keys.add(name)
    return keys


def shard_index(source) -> dict[str, str]:
    """Tensor name -> the safetensors shard holding it (empty for a GGUF file or a hub id).

    Raises:
        UserError: a shard cannot be read (corrupt or truncated).
    """
    from safetensors import SafetensorError, safe_open

    index: dict[str, str] = {}
    for path in source.safetensors_files():
        try:
            with safe_open(str(path), framework="pt") as f:
                index.update(dict.fromkeys(f.keys(), str(path)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path}: {e}; the file is corrupt or truncated") from None
    return index


def tensor_stream(source, meta: nn.Module) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """``(iterator of (name, tensor), count)`` over the model's weights in checkpoint order.

    Streams straight from the shards when their tensor names are the model's own; otherwise
    (GGUF, or a checkpoint whose names transformers remaps on load) loads the model once.
    """
    expected = unique_state_keys(meta)
    index = shard_index(source)
    if index and set(index) == expected:
        return _stream_safetensors(source.safetensors_files()), len(index)
    if index:
        logger.info("checkpoint tensor names differ from the model's; loading it whole")
    logger.info("loading %s", source.path)
    return _stream_loaded(source), len(expected)
