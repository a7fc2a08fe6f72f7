"""Quantization-aware training: the forward pass sees the deployment format's weights (EQ 7.6).

Each targeted Linear's weight is replaced, through ``torch.nn.utils.parametrize``, by its fake
quantization ``Ŵ = s·(clamp(round(W/s) + z, qmin, qmax) − z)`` under *the format that will be
stored*: the same :class:`~modelpress.formats.integer.IntFormat` ``compress`` writes, its
scales rounded to their storage dtype. The backward pass is the straight-through estimator with
the clipping indicator (Bengio et al. 2013; EQ 7.6): ``∂L/∂W = ∂L/∂Ŵ · 1[lo ≤ W ≤ hi]``,
``[lo, hi]`` the group's representable range. Writing the result encodes ``Ŵ`` with the scales
trained with, so exporting adds no rounding: the compressed-tensors checkpoint holds exactly the
weights the last forward pass used.

Scales start from a post-training result (the format's own observer on the starting weights,
i.e. RTN, or the scales stored in a compressed-tensors checkpoint being healed) and either stay
fixed (the default) or are learned with LSQ (Esser et al. 2020, arXiv:1902.08153):
``∂Ŵ/∂s = Ŵ/s − 1[lo ≤ W ≤ hi]·W/s`` (``round(W/s) − W/s`` inside the range, the clamped code
outside), scaled by ``g = 1/sqrt(group·qmax)`` as the paper does so that scale and weight steps
are of comparable size.

**GGUF block types** (``q4_0``, ``q4_k_m``...: llama.cpp file types) go the same way on each
tensor's block grid: the layout ``export --to gguf`` would write gives every quantized tensor its
type (embeddings and output included, as llama.cpp quantizes them), llama.cpp's own reference
search picks each matrix's block parameters on the starting weights, and those stay fixed while
training (:class:`FakeGGUF`); the forward pass is ``grid_dequant(quantize_with(W))``, bit for bit
what llama.cpp decodes, and the file is written from the same codes (:func:`save_gguf`). Learned
scales are integer formats only (a k-quant's scales are jointly searched 6-bit sub-scales).

Float formats (NVFP4, FP8...) are refused with a clear message.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.errors import UserError
from modelpress.formats.gguf_blocks import BlockParams, GGUFBlockFormat
from modelpress.formats.integer import SCALE_DTYPES, IntFormat, QuantizedTensor


class _FakeQuantSTE(torch.autograd.Function):
    """Ŵ = fake_quant(W; s, z); backward: STE with the clipping indicator, LSQ for ``s``."""

    @staticmethod
    def forward(ctx, W, scale, zero, fmt: IntFormat, grad_scale: float):
        Wg = fmt.grouped(W)  # (rows, n_groups, group)
        s = scale.to(SCALE_DTYPES[fmt.scale_dtype]).to(W.dtype).unsqueeze(-1)  # the stored scale
        z = None if zero is None else zero.unsqueeze(-1).to(W.dtype)
        W_hat = fmt.fake_quantize_grouped(Wg, s, z)
        lo = (fmt.qmin - (0 if z is None else z)) * s
        hi = (fmt.qmax - (0 if z is None else z)) * s
        inside = (Wg >= lo) & (Wg <= hi)
        ctx.save_for_backward(inside, W_hat, Wg, s)
        ctx.grad_scale, ctx.learn = grad_scale, scale.requires_grad
        return W_hat.reshape(W.shape)

    @staticmethod
    def backward(ctx, grad):
        inside, W_hat, Wg, s = ctx.saved_tensors
        g = grad.reshape(Wg.shape)
        grad_W = (g * inside).reshape(grad.shape)
        grad_s = None
        if ctx.learn:
            grad_s = (g * (W_hat - inside * Wg) / s).sum(-1) * ctx.grad_scale
        return grad_W, grad_s, None, None, None


def fake_quantize_ste(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: IntFormat,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """``fmt``'s fake quantization of ``W: (out, in)`` with scales ``(rows, n_groups)``, STE backward.

    Example (the gradient passes where W is representable, and stops where it was clipped):
        >>> fmt = IntFormat(bits=4, granularity="channel", group_size=None)
        >>> W = torch.tensor([[0.1, -0.5, 2.0]], requires_grad=True)
        >>> scale = torch.tensor([[0.1]])
        >>> fake_quantize_ste(W, scale, None, fmt).sum().backward()
        >>> W.grad
        tensor([[1., 1., 0.]])
    """
    return _FakeQuantSTE.apply(W, scale, zero, fmt, grad_scale)


class _StraightThrough(torch.autograd.Function):
    """Forward ``W_hat`` (computed without grad); backward the upstream gradient where ``inside``."""

    @staticmethod
    def forward(ctx, W, W_hat, inside):
        ctx.save_for_backward(inside)
        return W_hat

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class FakeGGUF(nn.Module):
    """The parametrization ``W -> Ŵ`` on one matrix's GGUF block grid, its block parameters fixed."""

    def __init__(self, fmt: GGUFBlockFormat, params: BlockParams):
        super().__init__()
        self.fmt, self.params = fmt, params

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            Wf = W.detach().float()
            W_hat = self.fmt.grid_dequant(self.fmt.quantize_with(Wf, self.params), self.params).to(W.dtype)
            step, offset = self.fmt.grid(self.params)  # (rows, n_groups)
            g = Wf.reshape(W.shape[0], step.shape[1], -1)
            lo = (step * self.fmt.qmin + (0 if offset is None else offset))[..., None]
            hi = (step * self.fmt.qmax + (0 if offset is None else offset))[..., None]
            lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
            inside = ((g >= lo) & (g <= hi)).reshape(W.shape)
        return _StraightThrough.apply(W, W_hat, inside)

    def stored(self, W: torch.Tensor) -> torch.Tensor:
        """The GGUF bytes of ``Ŵ``: the same codes the forward pass used, packed."""
        return self.fmt.pack(self.fmt.quantize_with(W.detach().float(), self.params), self.params)


class FakeQuant(nn.Module):
    """The parametrization ``W -> Ŵ`` of one Linear: its format, scales and zero points.

    ``scale`` is a parameter (trained when ``learn_scale``); ``zero`` a buffer (asymmetric formats).
    """

    def __init__(self, fmt: IntFormat, qt: QuantizedTensor, learn_scale: bool = False):
        super().__init__()
        self.fmt = fmt
        self.scale = nn.Parameter(qt.scale.clone().float(), requires_grad=learn_scale)
        self.register_buffer("zero", None if qt.zero_point is None else qt.zero_point.float())
        group = fmt.group_size_for(qt.q.shape[1]) if fmt.granularity != "tensor" else qt.q.numel()
        self.grad_scale = 1.0 / math.sqrt(group * fmt.qmax)  # LSQ's g

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return fake_quantize_ste(W, self.scale, self.zero, self.fmt, self.grad_scale)

    def stored(self, W: torch.Tensor) -> QuantizedTensor:
        """What the checkpoint stores for ``W``: the codes of ``Ŵ`` under the scales trained with."""
        s = self.scale.detach().to(SCALE_DTYPES[self.fmt.scale_dtype]).float()
        W_hat = self.fmt.fake_quantize_grouped(self.fmt.grouped(W.detach().float()), s.unsqueeze(-1),
                                               None if self.zero is None else self.zero.unsqueeze(-1))
        return self.fmt.encode(W_hat.reshape(W.shape), s, self.zero)


def attach(model: nn.Module, formats: dict[str, IntFormat], scales: Literal["fixed", "learned"] = "fixed",
           start: dict[str, QuantizedTensor] | None = None) -> dict[str, FakeQuant]:
    """Fake-quantize each Linear named in ``formats``; returns module name -> its :class:`FakeQuant`.

    Args:
        formats: module name -> format (from :func:`~modelpress.models.tensors.plan_targets`).
        scales: keep the starting scales, or learn them (LSQ).
        start: module name -> a stored weight whose scales to start from (a checkpoint being
            healed); by default the format's observer on the current weight (RTN's scales).
    """
    out = {}
    for name, fmt in formats.items():
        if not isinstance(fmt, IntFormat):
            raise UserError(f"QAT fake-quantizes integer formats (int4-g128, int8-channel...) and GGUF types; "
                            f"{fmt.name} is not supported yet")
        linear = model.get_submodule(name)
        qt = (start or {}).get(name) or fmt.quantize(linear.weight.detach())
        fq = FakeQuant(fmt, qt, learn_scale=scales == "learned").to(linear.weight.device)
        parametrize.register_parametrization(linear, "weight", fq, unsafe=True)
        out[name] = fq
    return out


def attach_gguf(model: nn.Module, layout, start: dict | None = None) -> dict[str, FakeGGUF]:
    """Fake-quantize every tensor a GGUF ``layout`` stores in a block type (Linear and embedding
    weights), with the block params llama.cpp picks for the current weight, or those of ``start``
    (checkpoint name -> params read from a GGUF file, :func:`read_gguf_params`);
    returns module name -> its :class:`FakeGGUF`."""
    from modelpress.formats.gguf_blocks import GGUF_FORMATS, gguf_format

    out = {}
    for e in layout.entries:
        module = e.name.removesuffix(".weight")
        if e.type not in GGUF_FORMATS or not e.name.endswith(".weight"):
            continue
        target = model.get_submodule(module)
        if not isinstance(target, (nn.Linear, nn.Embedding)):
            continue
        fmt = gguf_format(e.type)
        weight = target.weight
        params = start[e.name] if start and e.name in start else fmt.choose_params(weight.detach().float())
        fq = FakeGGUF(fmt, params)
        parametrize.register_parametrization(target, "weight", fq, unsafe=True)
        out[module] = fq
        head = model.get_output_embeddings()
        if isinstance(target, nn.Embedding) and head is not None and head.weight is weight:
            # tied output: llama.cpp multiplies by the same quantized token_embd
            parametrize.register_parametrization(head, "weight", fq, unsafe=True)
    return out


def original_weight(linear: nn.Module) -> torch.Tensor:
    """The trained (unquantized) weight behind a fake-quantized Linear."""
    return linear.parametrizations.weight.original


def save_compressed(model: nn.Module, fakes: dict[str, FakeQuant], folder, dtype: torch.dtype,
                    stored_names: set[str], tokenizer=None, side_files=None) -> None:
    """Write ``model`` as a compressed-tensors checkpoint: each fake-quantized Linear as the codes
    and scales it trained with (:meth:`FakeQuant.stored`), every other tensor of ``stored_names``
    (the source checkpoint's names: a tied output embedding is not written twice) in ``dtype``."""
    from modelpress.export.compressed_tensors import CompressedCheckpointWriter
    from modelpress.models.loading import clean_config

    with CompressedCheckpointWriter(folder) as writer:
        for name, fq in fakes.items():
            writer.add_quantized(name, fq.stored(original_weight(model.get_submodule(name))))
        for name, tensor in model.state_dict().items():
            if ".parametrizations." not in name and name in stored_names:
                writer.add_tensor(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        config = clean_config(model.config)
        config.dtype = str(dtype).removeprefix("torch.")
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in fakes]
        writer.finish(config=config.to_dict(), ignore=ignore, tokenizer=tokenizer, copy_files_from=side_files)


def plain_state(model: nn.Module, fakes: dict) -> dict[str, torch.Tensor]:
    """The model's tensors under their own names, each fake-quantized weight as ``Ŵ``."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name in fakes:
        state[name + ".weight"] = model.get_submodule(name).weight.detach()
    return state


def save_gguf(model: nn.Module, fakes: dict[str, FakeGGUF], folder, layout, tokenizer, side_files=None) -> None:
    """Write ``folder/model.gguf`` in ``layout`` (the one the fakes were attached with): each
    fake-quantized tensor as the bytes of the codes it trained with, every other tensor as
    ``export --to gguf`` encodes it (through a float copy beside it)."""
    import shutil
    from pathlib import Path

    from modelpress.export.checkpoint import copy_side_files, has_tokenizer
    from modelpress.export.gguf import export_gguf

    folder = Path(folder)
    floats = folder.with_name(folder.name + ".float")
    if floats.exists():
        shutil.rmtree(floats)
    model.save_pretrained(floats, state_dict=plain_state(model, fakes))
    if side_files is not None:
        copy_side_files(side_files, floats)
    if not has_tokenizer(floats):
        tokenizer.save_pretrained(floats)
    encoded = {name + ".weight": fq.stored(original_weight(model.get_submodule(name))) for name, fq in fakes.items()}
    folder.mkdir(parents=True)
    try:
        export_gguf(str(floats), str(folder / "model.gguf"), layout.ftype, encoded=encoded, layout=layout)
    finally:
        shutil.rmtree(floats)
