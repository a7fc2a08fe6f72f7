"""Carry an FP8 KV cache in the checkpoint: calibrated key and value scales and the
``kv_cache_scheme`` vLLM reads.

vLLM stores keys and values in E4M3 when a checkpoint's compressed-tensors config declares a
``kv_cache_scheme`` (8-bit float, symmetric, one scale per layer: the ``tensor`` strategy), and
reads each layer's scales from ``<attention>.k_scale`` / ``v_scale``; it divides by them before
the cast. Without calibrated scales it uses 1.0, which clips any key beyond +-448 and spends the
format's range badly on small ones.

Calibration: the model (dequantized when it is quantized) runs over the calibration windows with
a recording cache (:class:`KVRange`): the cache's ``update`` is where every transformers
attention hands over its keys after RoPE and any k-norm, which is what an engine caches. Each
layer's scale is ``max |k| / 448`` over every calibration token and head, and the same for ``v``
(the static min/max observer llm-compressor uses for this strategy). A float checkpoint is
calibrated layer by layer on the one runner (:class:`KVRangeStage`, an observer: each layer's
attention is handed a recording cache during the forward that feeds the next layer), so memory is
one layer plus the activations. *Simplification:* a quantized checkpoint, which the layer reader
cannot decode, is loaded whole and dequantized for this pass, as the pipeline's own measurement
loads it anyway.

The output is the source checkpoint (its shards hard-linked where the file system allows, else
copied, under an index) plus one shard of scales and ``config.json`` with the scheme, so vLLM runs
it with an FP8 cache and no flag; ``modelpress eval`` measures it with those scales
(:mod:`modelpress.eval.kv_cache`).

Only ``fp8`` is carried: vLLM's compressed-tensors reader accepts no other KV scheme
(``CompressedTensorsKVCacheMethod``: ``num_bits=8, type=float``), and llama.cpp takes its cache
type from the command line (``-ctk``/``-ctv``), not the file.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from modelpress.errors import UserError
from modelpress.eval.kv_cache import FP8_MAX, cache_kwargs
from modelpress.export.checkpoint import copy_side_files
from modelpress.models import loading
from modelpress.progress import track
from modelpress.record import to_json

logger = logging.getLogger("modelpress")

SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
SCALES_FILE = "kv-cache-scales.safetensors"
SCALE_BYTES_PER_LAYER = 2 * 4  # one float32 k_scale and one v_scale per attention layer


class KVRange(DynamicCache):
    """A ``DynamicCache`` that raises ``amax[layer]`` to the largest ``|key|`` and ``|value|`` it is
    handed (``amax`` may be shared by the fresh cache of each batch)."""

    def __init__(self, config=None, amax: dict[int, list[float]] | None = None):
        super().__init__(config=config)
        self.amax = {} if amax is None else amax

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = key_states.detach().abs().amax().item(), value_states.detach().abs().amax().item()
        seen = self.amax.setdefault(layer_idx, [0.0, 0.0])
        seen[0], seen[1] = max(seen[0], k), max(seen[1], v)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def kv_amax(model, batches: list[torch.Tensor]) -> list[tuple[float, float]]:
    """``(max |k|, max |v|)`` of every decoder layer over ``batches``, in layer order."""
    amax: dict[int, list[float]] = {}
    with torch.no_grad():
        for batch in track(batches, total=len(batches), what="calibration batch"):  # a fresh cache per batch
            model(input_ids=batch, **cache_kwargs(model, KVRange(model.config, amax)))
    return _in_layer_order(amax, model.config.get_text_config().num_hidden_layers)


def _in_layer_order(amax: dict[int, list[float]], n_layers: int) -> list[tuple[float, float]]:
    """``amax`` as a list by layer, refused unless the cache saw every layer."""
    if sorted(amax) != list(range(n_layers)):
        raise UserError(f"the KV cache saw layers {sorted(amax)} of {n_layers}: this architecture does not hand every "
                        "layer's keys to the cache, so its scales cannot be calibrated")
    return [(amax[i][0], amax[i][1]) for i in range(n_layers)]


def _is_attention(module) -> bool:
    """A decoder layer's attention module: it knows its layer and owns the key projection."""
    return getattr(module, "layer_idx", None) is not None and (hasattr(module, "k_proj") or hasattr(module, "qkv_proj"))


class KVRangeStage:
    """A layer-runner observer recording each layer's ``max |k|`` and ``max |v|``: while the layer
    runs the forward that feeds the next one, its attention module is handed a fresh
    :class:`KVRange` per call, as a model's own forward with a cache would hand it (the keys after
    RoPE and any k-norm). The cache returns the keys it was given, so the outputs are unchanged."""

    needs = frozenset()

    def __init__(self):
        self.amax: dict[int, list[float]] = {}

    @contextlib.contextmanager
    def probe(self, layer):
        attention = next((m for m in layer.modules() if _is_attention(m)), None)
        if attention is None:
            raise UserError("found no attention module (one with k_proj or qkv_proj) in a decoder layer; this "
                            "architecture's KV cache cannot be calibrated")
        params = inspect.signature(attention.forward).parameters
        arg = next((a for a in ("past_key_values", "cache", "past_key_value") if a in params), None)
        if arg is None:
            raise UserError(f"{type(attention).__name__}.forward takes no cache; its KV cache cannot be calibrated")

        def hand_cache(module, args, kwargs):
            return args, {**kwargs, arg: KVRange(None, self.amax)}

        handle = attention.register_forward_pre_hook(hand_cache, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def run(self, layer, prefix, modules, formats, stats) -> dict:
        return {}


def streamed_kv_amax(source, ids: torch.Tensor, batch_size: int) -> tuple[list[str], list[tuple[float, float]]]:
    """:func:`kv_amax` of a float checkpoint, one decoder layer at a time, and each layer's
    attention path (:func:`attention_paths`)."""
    from modelpress.models.layers import LayerwiseModel
    from modelpress.pipeline.runner import run_layers
    from modelpress.pipeline.sinks import ObserveSink

    lm = LayerwiseModel(source)
    paths = attention_paths(lm.model)
    stage = KVRangeStage()
    run_layers(lm, [stage], {}, ObserveSink(), ids, batch_size)
    return paths, _in_layer_order(stage.amax, len(paths))


def attention_paths(model) -> list[str]:
    """The state-dict prefix of each decoder layer's attention module (which owns ``k_scale``), in layer order."""
    found = {}
    for name, module in model.named_modules():
        if _is_attention(module):
            found.setdefault(module.layer_idx, name)
    n_layers = model.config.get_text_config().num_hidden_layers
    if sorted(found) != list(range(n_layers)):
        raise UserError("could not find every decoder layer's attention module (one with k_proj or qkv_proj); "
                        "this architecture's KV cache cannot be carried in the checkpoint")
    return [found[i] for i in range(n_layers)]


def carry_kv_cache(model: str, out_dir: str, ids: torch.Tensor, batch_size: int = 4) -> dict:
    """Calibrate FP8 key and value scales for ``model`` on ``ids`` and write ``model`` with them
    and a ``kv_cache_scheme`` to ``out_dir`` (which appears only when complete).

    Returns:
        The run record (also written as ``out_dir/modelpress.json``).
    """
    source = loading.resolve(model)
    if source.kind != "folder" or not source.safetensors_files():
        raise UserError(f"{model}: a KV-cache scheme is carried in a safetensors checkpoint folder; put the kv-cache "
                        "stage before any GGUF export (llama.cpp takes its cache type as -ctk/-ctv flags instead)")
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"output {out} already exists; choose a new folder or remove it")
    if loading.compressed_tensors_config(source):  # quantized: whole, dequantized (see the module doc)
        loaded = loading.load_model(source, dequantize=True)
        paths = attention_paths(loaded)
        amax = kv_amax(loaded, list(torch.split(ids, batch_size)))
        del loaded
    else:
        paths, amax = streamed_kv_amax(source, ids, batch_size)
    scales = {}
    for path, (k, v) in zip(paths, amax):
        scales[f"{path}.k_scale"] = torch.tensor([max(k, 1e-12) / FP8_MAX], dtype=torch.float32)
        scales[f"{path}.v_scale"] = torch.tensor([max(v, 1e-12) / FP8_MAX], dtype=torch.float32)
    record = {"command": "kv-cache", "source": model, "kv_cache_scheme": SCHEME,
              "calibration": {"windows": len(ids), "tokens_per_window": ids.shape[1]},
              "layers": [{"k_amax": k, "v_amax": v} for k, v in amax]}
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(source, tmp, scales, record)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s: FP8 KV-cache scales for %d layers", out, len(paths))
    return record


def _write(source, tmp: Path, scales: dict[str, torch.Tensor], record: dict) -> None:
    src = Path(source.path)
    weight_map = dict(loading.shard_index(source))
    shards = sorted(set(weight_map.values()))
    n = len(shards) + 1
    renamed = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(shards)}
    for old, new in renamed.items():  # renamed: transformers reads a lone model.safetensors and no index
        try:
            os.link(src / old, tmp / new)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src / old, tmp / new)
    last = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(scales, tmp / last, metadata={"format": "pt"})
    weight_map = {name: renamed[shard] for name, shard in weight_map.items()}
    weight_map.update(dict.fromkeys(scales, last))
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(
        to_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = json.loads((src / "config.json").read_text())
    qc = config.get("quantization_config") or {"quant_method": "compressed-tensors", "format": "dense",
                                                 "config_groups": {}, "ignore": [], "quantization_status": "compressed"}
    if qc.get("quant_method") != "compressed-tensors":
        raise UserError(f"{src} is quantized with {qc.get('quant_method')!r}; a KV-cache scheme is carried only in "
                        "float or compressed-tensors checkpoints")
    config["quantization_config"] = {**qc, "kv_cache_scheme": SCHEME}
    (tmp / "config.json").write_text(to_json(config, indent=2, sort_keys=True))
    (tmp / "modelpress.json").write_text(to_json(record, indent=2))
    copy_side_files(src, tmp)


def checkpoint_kv_scales(source: loading.ModelSource) -> dict[int, tuple[float, float]] | None:
    """Layer index -> ``(k_scale, v_scale)`` that a checkpoint carries with an FP8
    ``kv_cache_scheme``, or ``None`` when it declares none."""
    scheme = loading.compressed_tensors_config(source).get("kv_cache_scheme")
    if not scheme:
        return None
    if scheme.get("type") != "float" or scheme.get("num_bits") != 8 or scheme.get("strategy") != "tensor":
        raise UserError(f"{source.path}: kv_cache_scheme {scheme} is not one modelpress evaluates (8-bit float, one "
                        "scale per layer)")
    from safetensors import safe_open

    found: dict[str, float] = {}
    for path in source.safetensors_files():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith((".k_scale", ".v_scale")):
                    found[name] = float(f.get_tensor(name).float().reshape(-1)[0])
    layers: dict[int, dict[str, float]] = {}
    for name, value in found.items():
        idx = next((int(p) for p in reversed(name.split(".")) if p.isdigit()), None)
        if idx is not None:
            layers.setdefault(idx, {})[name.rpartition(".")[2]] = value
    incomplete = [i for i, kv in layers.items() if len(kv) != 2]
    if not layers or incomplete:
        raise UserError(f"{source.path} declares a kv_cache_scheme but its k_scale/v_scale tensors are missing"
                        f"{f' for layers {incomplete}' if incomplete else ''}; rewrite it with a kv-cache stage")
    return {i: (kv["k_scale"], kv["v_scale"]) for i, kv in sorted(layers.items())}
