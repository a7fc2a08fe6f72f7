"""Integer activation formats (the ``A8`` of W8A8): what a Linear's input is rounded to at run time.

Two granularities, the ones vLLM's int8 kernels run (and compressed-tensors describes):

- **dynamic per-token** (``strategy="token"``, ``dynamic=True``): each token's row ``x_t`` gets its
  own scale ``max_j |x_tj| / 127``, computed at run time; nothing is stored.
- **static per-tensor** (``strategy="tensor"``, ``dynamic=False``): one scale per Linear input,
  calibrated offline and stored as ``M.input_scale`` (shape ``(1,)``).

Both are symmetric: ``x ~ clamp(round(x / s), -128, 127) * s``. The scale maps the absolute
maximum to 127 (what vLLM's dynamic int8 kernel computes). compressed-tensors' own Python
fake-quant divides by 127.5 instead (its ``calculate_qparams``: range 255 / 2), a 0.4% larger step
that clips the single largest value of each token by half a step; our numbers follow the engine.

Example:
    >>> import torch
    >>> fmt = ActFormat(dynamic=True)
    >>> x = torch.randn(2, 5, 64)
    >>> err = (fmt.fake_quantize(x) - x).abs().amax(-1)
    >>> bool((err <= x.abs().amax(-1) / 127 / 2 + 1e-7).all())
    True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from modelpress.errors import UserError
from modelpress.formats.integer import SCALE_DTYPES


@dataclass(frozen=True)
class ActFormat:
    """A symmetric integer activation format (an immutable value).

    Args:
        bits: bits per activation (8: the only width int8 GEMM kernels take).
        dynamic: per-token scales at run time; else one calibrated per-tensor scale.
        scale_dtype: storage dtype of a static scale.
    """

    bits: int = 8
    dynamic: bool = True
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise UserError(f"activation quantization supports 8 bits (int8 kernels), got {self.bits}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise UserError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def strategy(self) -> str:
        """The compressed-tensors strategy name: ``"token"`` (dynamic) or ``"tensor"`` (static)."""
        return "token" if self.dynamic else "tensor"

    @property
    def name(self) -> str:
        """``int8-dynamic`` or ``int8-static``."""
        return f"int{self.bits}-{'dynamic' if self.dynamic else 'static'}"

    def static_scale(self, absmax: torch.Tensor | float) -> torch.Tensor:
        """The stored per-tensor scale for a calibrated ``max |x|``: ``absmax / 127`` rounded to
        ``scale_dtype`` (then held as float32), shape ``(1,)``."""
        dtype = SCALE_DTYPES[self.scale_dtype]
        s = torch.as_tensor(absmax, dtype=torch.float32).reshape(1) / self.qmax
        s = s.clamp(min=torch.finfo(dtype).tiny, max=torch.finfo(dtype).max)
        return s.to(dtype).to(torch.float32)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``dequantize(quantize(x))`` in ``x``'s dtype.

        Args:
            x: activations ``(..., in_features)``; the last dimension is one token's row.
            scale: the static per-tensor scale (required when not ``dynamic``, ignored otherwise).
        """
        xf = x.to(torch.float32)
        if self.dynamic:
            s = xf.abs().amax(dim=-1, keepdim=True) / self.qmax
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays zero
        elif scale is None:
            raise ValueError("static activation quantization needs its calibrated scale")
        else:
            s = scale.to(device=x.device, dtype=torch.float32)
        return (torch.round(xf / s).clamp_(self.qmin, self.qmax) * s).to(x.dtype)


@dataclass(frozen=True)
class InputQuant:
    """How one Linear's input is quantized: its format and, when static, its calibrated scale."""

    fmt: ActFormat
    scale: torch.Tensor | None = None  # (1,), float32 holding a ``fmt.scale_dtype`` value

    def __post_init__(self) -> None:
        if (self.scale is None) != self.fmt.dynamic:
            raise ValueError("a static activation format needs a scale, a dynamic one has none")


def check_w8a8(weights) -> None:
    """Raise a :class:`UserError` unless ``weights`` (an ``IntFormat``) is what int8 W8A8 kernels
    take: 8-bit symmetric, per channel or per tensor."""
    if weights.bits != 8 or not weights.symmetric or weights.granularity == "group":
        raise UserError(f"quantized activations need int8 symmetric per-channel or per-tensor weights "
                        f"(what W8A8 kernels run), got {weights.name}; use --bits 8 --granularity channel")


@contextmanager
def activation_fake_quant(root: nn.Module, inputs: dict[str, InputQuant]) -> Iterator[None]:
    """Fake-quantize the inputs of ``root``'s submodules named in ``inputs`` while inside.

    Args:
        root: the module the names are relative to (a model, or one decoder layer).
        inputs: submodule name -> how its input is quantized.
    """
    handles, disabled = [], []
    try:
        for name, quant in inputs.items():
            module = root.get_submodule(name)
            if getattr(module, "quantization_scheme", None) is not None:  # compressed-tensors' own QDQ
                disabled.append((module, getattr(module, "quantization_enabled", True)))
                module.quantization_enabled = False
            handles.append(module.register_forward_pre_hook(_input_hook(quant)))
        yield
    finally:
        for h in handles:
            h.remove()
        for module, enabled in disabled:
            module.quantization_enabled = enabled


def _input_hook(quant: InputQuant):
    def hook(module, args):
        return (quant.fmt.fake_quantize(args[0], quant.scale), *args[1:])

    return hook
