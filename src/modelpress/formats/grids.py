"""Element codebooks of the float and lookup formats, and rounding onto them.

- **FP8 E4M3** (``torch.float8_e4m3fn``, the OCP 8-bit float "E4M3FN": no infinities, max 448,
  subnormals down to 2^-9). Rounding is torch's own cast (round to nearest, ties to even), after
  saturating at +-448, so values agree with every engine that casts the same way.
- **FP4 E2M1** (OCP Microscaling spec v1.0, Sec. 5.3.3): 1 sign, 2 exponent, 1 mantissa bit;
  magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (0.5 is the one subnormal). A 4-bit code is
  ``sign << 3 | index`` of the magnitude, the layout compressed-tensors and vLLM pack.
  Rounding is to nearest, ties to the even code (even mantissa), saturating at +-6; a negative
  value that rounds to zero keeps its sign (code ``0b1000``), as an IEEE cast would.
- **NF4** (NormalFloat, Dettmers et al., "QLoRA", arXiv:2305.14314, Sec. 3 and Appendix E): 16
  levels in [-1, 1], quantiles of N(0, 1) with an exact zero. :data:`NF4_LEVELS` are the published
  float32 values (bitsandbytes' table); :func:`nf4_levels_from_quantiles` rebuilds them from the
  paper's construction, and the tests check the two agree.

Example:
    >>> import torch
    >>> round_e2m1(torch.tensor([0.2, 0.25, 0.3, 2.5, 2.6, 7.0, -0.1])).tolist()
    [0.0, 0.0, 0.5, 2.0, 3.0, 6.0, -0.0]
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
NF4_OFFSET = 0.9677083  # QLoRA's outermost quantile: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def nf4_levels_from_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The NF4 levels from the paper's construction (float64): 8 positive and 7 negative
    quantiles of N(0, 1) plus an exact zero, normalized to [-1, 1]."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.abs().max()


def round_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest FP8 E4M3 value (ties to even), saturating at +-448; float32."""
    return x.to(torch.float32).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _nearest_index(a: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level of sorted ``levels`` nearest to each ``a`` (a tie goes to the lower
    level). Values beyond the ends go to the end levels (saturation)."""
    return torch.bucketize(a, (levels[1:] + levels[:-1]) / 2, right=False)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest FP4 E2M1 value (ties to even, saturating at +-6); float32.

    Within a binade the E2M1 values are evenly spaced (0.5 below 2, which covers the subnormal
    0.5; 1 in [2, 4); 2 in [4, 6]), so rounding is ``round(a / q) * q`` with ``torch.round``'s
    ties-to-even, which is the even mantissa: the same as a lookup of the nearest level.
    """
    x = x.to(torch.float32)
    a = x.abs().clamp(max=E2M1_MAX)
    q = torch.where(a >= 4, 2.0, torch.where(a >= 2, 1.0, 0.5))  # the spacing of a's binade
    return torch.copysign(torch.round(a / q) * q, x)


_E2M1_INDEX = torch.tensor([0, 1, 2, 3, 4, -1, 5, -1, 6, -1, -1, -1, 7])  # 2 * magnitude -> index


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (``sign << 3 | magnitude index``, uint8) of ``x`` rounded to nearest."""
    r = round_e2m1(x)
    idx = _E2M1_INDEX.to(r.device)[(2 * r.abs()).to(torch.int64)]
    return (idx | (torch.signbit(r).to(torch.int64) << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of 4-bit E2M1 codes."""
    codes = codes.to(torch.int64)
    mag = E2M1_MAGNITUDES.to(codes.device)[codes & 7]
    return torch.where(codes >= 8, -mag, mag)


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Index (0-15, uint8) of the NF4 level nearest to ``x`` (already divided by its block's absmax)."""
    return _nearest_index(x.to(torch.float32), NF4_LEVELS.to(x.device)).to(torch.uint8)


def round_nf4(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest NF4 level, saturating at +-1; float32."""
    return NF4_LEVELS.to(x.device)[nf4_codes(x).to(torch.int64)]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last axis, the even column in the low nibble
    (compressed-tensors' ``weight_packed`` layout). ``codes: (rows, 2k)`` -> ``(rows, k)`` uint8."""
    if codes.shape[-1] % 2:
        raise ValueError("packing 4-bit codes needs an even number of columns")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
