"""The layer-by-layer runner, written once: capture, calibrate, compress, propagate, free.

For a model of any size: the skeleton is built with parameters on the ``meta`` device (no
memory) and buffers real (rotary tables, embedding scales: what ``__init__`` computes); only
the parts outside the decoder layers (embeddings, final norm) are loaded. Then:

1. **Capture.** Every decoder layer is swapped for a catcher and the calibration batches run
   through the model once: the catchers record the first layer's input hidden states and the
   keyword arguments *each* layer receives (masks and position embeddings differ per layer in
   models that mix sliding-window and global attention), then stop the forward.
2. **Per layer.** Load its weights from the shards, run the calibration batches through it with
   the method's hooks (Hessians, activation statistics), let the method compress it, run it
   again so the next layer sees the *compressed* layer's outputs, hand its tensors to the
   writer, and free it.

The runner never names an algorithm or a model family: methods plug in as stages
(:mod:`modelpress.pipeline.runner`), and architecture knowledge comes from :mod:`modelpress.models.arch`.
"""

from __future__ import annotations

import functools
import gc
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from modelpress.errors import UserError
from modelpress.models import loading
from modelpress.models.arch import arch_for
from modelpress.models.loading import clean_config, meta_model
from modelpress.models.moe import unfuse_experts
from modelpress.models.tensors import meta_shapes, streamable, unique_state_keys

logger = logging.getLogger("modelpress")


class WeightReader:
    """Tensors by checkpoint name, read on demand from the safetensors shards.

    A GGUF file (or a checkpoint whose names transformers remaps) is loaded whole once, since
    its tensors cannot be read one at a time under the model's names. Either way a missing,
    extra or misshapen tensor is refused before any work (:func:`~modelpress.models.tensors.streamable`).

    Args:
        source: the checkpoint.
        expected: checkpoint name -> shape (``None``: not checked) of every tensor the model has.
        moe: a mixture-of-experts model, readable only from shards under per-expert names.
    """

    def __init__(self, source: loading.ModelSource, expected: dict[str, tuple[int, ...] | None], moe: bool = False):
        self._state: dict[str, torch.Tensor] | None = None
        self._files = streamable(source, expected)
        if self._files is None:
            if moe:
                raise UserError(f"{source.path}: a mixture-of-experts model is read expert by expert from "
                                "safetensors shards with the per-expert names transformers saves; this "
                                "checkpoint (GGUF, other tensor names, or missing or extra tensors) is not "
                                "supported")
            logger.info("loading %s whole (its tensor names are not the model's)", source.path)
            model = loading.load_model(source)
            self._state = {k: v for k, v in model.state_dict().items() if k in expected}
            self._files = {}
        self.names = set(expected)

    @property
    def whole(self) -> bool:
        """Whether the checkpoint was loaded whole (a tensor, once released, cannot be read again)."""
        return self._state is not None

    def get(self, name: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[name]  # load_model checked every tensor
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as f:
            return loading.checked(name, f.get_tensor(name))

    def release(self, names) -> None:
        """Drop tensors already consumed (only matters for a model loaded whole)."""
        if self._state is not None:
            for n in names:
                self._state.pop(n, None)


def release_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps large freed blocks in its arenas, so a
    long layer loop's resident size creeps up with each layer's temporaries; ``malloc_trim``
    gives them back (a no-op elsewhere).

    The survivors of each full collection are frozen (``gc.freeze``): they are the long-lived
    model skeleton and libraries, and the next collection need not walk them again (a full
    collection with transformers loaded takes about 0.2 s, once per layer).
    :meth:`LayerwiseModel.free_layer` unfreezes them after the last layer.
    """
    gc.collect()
    gc.freeze()
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:  # not glibc
            pass


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")  # runs ldconfig: once, not per layer
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer ``idx``: records its inputs, passes hidden states through."""

    def __init__(self, layer: nn.Module, idx: int, record: Capture, last: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: attribute fallback only
        self.idx, self.last = idx, last
        object.__setattr__(self, "_record", record)

    def __getattr__(self, name):  # the model may read layer attributes (e.g. ``attention_type``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise UserError("this model passes positional arguments to its decoder layers; it is not supported yet")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        if self.idx == 0:
            self._record.hidden.append(hidden_states.detach())
        self._record.kwargs[self.idx].append(kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


class _Skip(nn.Module):
    """Stands in for a decoder layer whose output is not needed: passes hidden states through."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class TailForward:
    """Whole-model forwards on fixed ``ids`` that start at decoder layer ``i``.

    One float forward records every decoder layer's input; :meth:`logits_from` then runs the
    model with the layers before ``i`` skipped and layer ``i`` fed its recorded input, so the
    model's own embedding, masks, position embeddings, final norm and head are used unchanged
    (no architecture knowledge here) and a change made to layers ``>= i`` costs only the layers
    it can affect. With nothing changed, the logits equal a full forward's.
    """

    def __init__(self, model: nn.Module, layers: str, ids: torch.Tensor):
        self.model, self.ids = model, ids
        self.layer_list: nn.ModuleList = model.get_submodule(layers)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layer_list)

        def record(i):
            def hook(module, args, kwargs):
                self.inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            return hook

        handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(self.layer_list)]
        try:
            with torch.no_grad():
                self.logits = model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def logits_from(self, i: int) -> torch.Tensor:
        originals = list(self.layer_list)
        cached = self.inputs[i]

        def feed(module, args, kwargs):
            return ((cached, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": cached})

        for j in range(i):
            self.layer_list[j] = _Skip(originals[j])
        handle = originals[i].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            return self.model(input_ids=self.ids, use_cache=False).logits
        finally:
            handle.remove()
            for j in range(i):
                self.layer_list[j] = originals[j]


@dataclass
class Capture:
    """What the catchers saw: layer-0 inputs per batch, and each layer's keyword args per batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[list[dict]] = field(default_factory=list)


class LayerwiseModel:
    """A causal LM whose decoder layers are loaded one at a time.

    Example::

        lm = LayerwiseModel(loading.resolve("smollm2-135m/"))
        capture = lm.capture(calibration_ids)
        for i, layer in lm.layers():
            ...  # calibrate, compress, propagate
    """

    def __init__(self, source: loading.ModelSource, dtype: torch.dtype = torch.float32):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.source = source
        self.config = loading.load_config(source)
        self.arch = arch_for(self.config)
        self.prefix = self.arch.layers
        self.dtype = dtype
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(clean_config(self.config)).eval()
        meta = meta_model(self.config)
        if self.arch.moe:  # fused 3-D experts -> one Linear per expert and projection
            unfuse_experts(self.model, self.arch.layers, self.arch.moe)
            unfuse_experts(meta, self.arch.layers, self.arch.moe)
        self.names = unique_state_keys(meta)  # ties applied: a tied head is stored once
        self._source_dtypes: dict[str, torch.dtype] = {}
        shapes = meta_shapes(meta, self.names)
        self.reader = WeightReader(source, {self.checkpoint_name(n): shapes[n] for n in self.names},
                                   moe=self.arch.moe is not None)
        self.layer_list: nn.ModuleList = self.model.get_submodule(self.arch.layers)
        self.deferred: set[str] = set()  # outside tensors written after the layer pass (a quantized head)
        self._tail: list[str] = []  # the modules between the last decoder layer and the head
        self._stash: dict[str, torch.Tensor] = {}
        self._materialize([n for n in self.names if not n.startswith(self.prefix + ".")])

    def checkpoint_name(self, name: str) -> str:
        """The name a tensor or module of the model has in checkpoints (differs for renamed MoE blocks)."""
        if self.arch.moe is None or not name.startswith(self.prefix + "."):
            return name
        layer, _, relative = name.removeprefix(self.prefix + ".").partition(".")
        return f"{self.prefix}.{layer}.{self.arch.moe.checkpoint_name(relative)}"

    def source_dtype(self, name: str) -> torch.dtype:
        """The dtype ``name`` has in the checkpoint (what the output keeps for unquantized tensors)."""
        return self._source_dtypes[name]

    @property
    def n_layers(self) -> int:
        return len(self.layer_list)

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def _materialize(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            tensor = self.reader.get(self.checkpoint_name(name))
            self._source_dtypes[name] = tensor.dtype
            set_module_tensor_to_device(self.model, name, "cpu", value=tensor.to(self.dtype) if tensor.is_floating_point() else tensor)
        self.reader.release([self.checkpoint_name(n) for n in names])

    def layer_tensor_names(self, i: int) -> list[str]:
        p = self.layer_prefix(i) + "."
        return sorted(n for n in self.names if n.startswith(p))

    def load_layer(self, i: int) -> nn.Module:
        self._materialize(self.layer_tensor_names(i))
        return self.layer_list[i]

    def free_layer(self, i: int) -> None:
        self.layer_list[i].to("meta")
        release_memory()
        if i == self.n_layers - 1:  # the loop is over: hand the collector back what release_memory froze
            gc.unfreeze()

    def free_outside_layers(self) -> None:
        """Drop the tensors outside the decoder layers (embeddings, head) once the layer inputs
        are captured and those tensors written: the layer loop never needs them again (but for
        the small modules before a head that :meth:`prepare_head` set aside)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self.names:
            if name.startswith(self.prefix + ".") or any(name.startswith(t + ".") for t in self._tail):
                continue
            if name in self.deferred and self.reader.whole:  # the reader cannot give it again
                self._stash[name] = self.model.get_parameter(name).data
            set_module_tensor_to_device(self.model, name, "meta")
        release_memory()

    def outside_layers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors outside the decoder layers (embeddings, final norm, untied head),
        but for the ``deferred`` ones."""
        state = self.model.state_dict()
        for name in sorted(self.names):
            if not name.startswith(self.prefix + ".") and name not in self.deferred:
                yield name, state[name]

    @torch.no_grad()
    def prepare_head(self, head: str) -> None:
        """Set the output head ``head`` aside for quantizing after the layer pass: its weight is
        ``deferred`` (not written with the other outside tensors), and the modules the model runs
        between its last decoder layer and the head (the final norm) are found and kept, so that
        :meth:`head_inputs` can turn the last layer's outputs into what the head receives.

        The modules are found with no architecture knowledge: one short forward with every layer
        passing its input through records which leaf modules run after the last layer and before
        the head, and their composition is checked to give the head's real input.

        Raises:
            UserError: the head's input is not those modules applied to the last layer's output.
        """
        order: list[str] = []
        seen: dict[str, torch.Tensor] = {}
        leaves = {m: n for n, m in self.model.named_modules()
                  if not n.startswith(self.prefix + ".") and n != head and not any(True for _ in m.children())}

        def done(module, args, output):
            order.append(leaves[module])

        def last(module, args, output):
            order.append("<last layer>")
            seen["last"] = output[0] if isinstance(output, tuple) else output

        def stop(module, args):
            seen["head"] = args[0]
            raise _StopForward

        originals = list(self.layer_list)
        for i, layer in enumerate(originals):
            self.layer_list[i] = _Skip(layer)
        handles = [m.register_forward_hook(done) for m in leaves]
        handles += [self.layer_list[-1].register_forward_hook(last),
                    self.model.get_submodule(head).register_forward_pre_hook(stop)]
        try:
            ids = torch.arange(4).remainder(self.config.get_text_config().vocab_size)[None]
            try:
                self.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
        finally:
            for h in handles:
                h.remove()
            for i, layer in enumerate(originals):
                self.layer_list[i] = layer
        tail = order[order.index("<last layer>") + 1:] if "<last layer>" in order else []
        x = seen.get("last")
        for name in tail:
            x = self.model.get_submodule(name)(x)
        if x is None or "head" not in seen or not torch.allclose(x, seen["head"], rtol=1e-5, atol=1e-6):
            raise UserError(f"cannot tell what this model applies between its last decoder layer and {head}, so "
                            f"{head} cannot be calibrated; --exclude {head} to keep it in float")
        self._tail = tail
        self.deferred.add(f"{head}.weight")

    @torch.no_grad()
    def head_inputs(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the output head receives for each batch of the last decoder layer's outputs
        (after :meth:`prepare_head`)."""
        out = []
        for x in hidden:
            for name in self._tail:
                x = self.model.get_submodule(name)(x)
            out.append(x)
        return out

    def deferred_tensor(self, name: str) -> torch.Tensor:
        """A ``deferred`` tensor as the checkpoint stores it, read again after the layer pass."""
        return self._stash.pop(name) if name in self._stash else self.reader.get(self.checkpoint_name(name))

    @torch.no_grad()
    def capture(self, batches: list[torch.Tensor]) -> Capture:
        """Run ``batches`` of token ids to the first decoder layer, recording every layer's inputs."""
        record = Capture(kwargs=[[] for _ in range(self.n_layers)])
        originals = list(self.layer_list)
        for i, layer in enumerate(originals):
            self.layer_list[i] = _Catcher(layer, i, record, last=i == self.n_layers - 1)
        try:
            for ids in batches:
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
        finally:
            for i, layer in enumerate(originals):
                self.layer_list[i] = layer
        if len(record.hidden) != len(batches) or any(len(k) != len(batches) for k in record.kwargs):
            raise UserError("the model did not call its decoder layers once per forward; this architecture is not supported")
        return record


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], where: str = "a decoder layer") -> list[torch.Tensor]:
    """The layer's outputs for each batch (the hidden states the next layer receives).

    Raises:
        UserError: an output is NaN or inf (``where`` names the layer in the message).
    """
    outs = []
    for h, kw in zip(hidden, kwargs):
        out = layer(h, **kw)
        out = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(out).all():
            raise UserError(f"{where} produced NaN or inf activations on the calibration data; the weights "
                            "overflow in this dtype (try float32) or the checkpoint is damaged")
        outs.append(out)
    return outs
