"""llama.cpp's GGUF block formats in pure torch: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants.

Encoders are llama.cpp's reference C code, ``ggml/src/ggml-quants.c`` (``quantize_row_*_ref``,
the path ``llama-quantize`` takes without an importance matrix; k-quants from llama.cpp PR #1684),
vectorized over all blocks; byte layouts are those of ``ggml-common.h`` that ``gguf.quants``
decodes. Each type stores ``block_size`` weights (32, or a ``QK_K = 256`` super-block) in
``type_bytes`` bytes and decodes weight ``i`` as ``w_i = step * q_i + offset``, an integer code
``q_i`` in ``[qmin, qmax]`` and one ``step`` (and ``offset``) per group of ``group_size`` weights
(d, m, dmin: fp16; sc, mn: small integers)::

    type  group  q          step  offset        type  group  q          step  offset
    q8_0  32     -128..127  d     -             q2_k  16     0..3       d*sc  -dmin*mn
    q4_0  32     -8..7      d     -             q3_k  16     -4..3      d*sc  -
    q4_1  32     0..15      d     m             q4_k  32     0..15      d*sc  -dmin*mn
    q5_0  32     -16..15    d     -             q5_k  32     0..31      d*sc  -dmin*mn
    q5_1  32     0..31      d     m             q6_k  16     -32..31    d*sc  -

Quantizing is three steps, kept apart so that calibrated methods (GPTQ) can round onto the same
grid: ``choose_params`` (block scales at their stored precision) -> ``quantize_with`` (codes) ->
``pack`` (bytes). ``grid_dequant`` does the decoder's float32 operations, so it equals
``gguf.quants.dequantize`` of the packed bytes bit for bit.

- Legacy types encode byte for byte like ``gguf.quants.quantize`` (and llama.cpp, but for the sign
  of ``d`` in a block of -0.0): both round with the float32 ``1/d`` (and block minimum) taken before
  fp16 storage rounds them, which ``BlockParams.enc_id`` / ``enc_min`` keep.
- k-quants run the reference searches, ``make_qkx2_quants`` (Q2_K, Q4_K, Q5_K), ``make_qx_quants``
  (Q6_K) and ``make_q3_quants`` (Q3_K), with every sum in C's order and float32 rounding. Against
  ``ggml-quants.c`` built with ``gcc -O2`` (no FMA) the bytes are identical except for the codes of
  groups whose step is 0: any code decodes the same there, llama.cpp keeps its search's codes and
  we store ``qmin`` (all bits 0, as llama.cpp does for all-zero blocks). gguf-py has no k-quant
  encoder; the tests pin digests of llama.cpp's bytes.

Example:
    >>> import torch
    >>> from modelpress.formats.gguf_blocks import gguf_format
    >>> fmt = gguf_format("Q4_K")
    >>> fmt.bits_per_weight
    4.5
    >>> W = torch.randn(4, 512)
    >>> data = fmt.quantize(W)
    >>> data.shape, data.dtype
    (torch.Size([4, 288]), torch.uint8)
    >>> err = (fmt.dequantize(data, W.shape) - W).pow(2).sum() / W.pow(2).sum()
    >>> bool(err < 0.02)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from modelpress.errors import UserError

QK_K = 256  # weights per k-quant super-block (ggml-common.h)
GROUP_MAX_EPS = 1e-15  # a k-quant group with max |w| below this is all zero (ggml-quants.c)

_CHUNK_WEIGHTS = 1 << 20  # weights searched per pass: the k-quant searches' temporaries then stay in cache

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlockParams:
    """Per-block parameters of one matrix, at the precision they are stored in.

    Field names are those of llama.cpp's block structs. Shapes: ``(rows, n_blocks)`` for the fp16
    fields (held as float32), ``(rows, n_blocks, n_sub)`` (int32) for the k-quant sub-block fields.

    Attributes:
        d: block scale (legacy types) or super-block scale (k-quants).
        m: Q4_1 / Q5_1 block minimum, else None.
        dmin: Q2_K / Q4_K / Q5_K scale of the sub-block mins, else None.
        scales: k-quant sub-block scales: Q2_K 0..15, Q4_K/Q5_K 0..63, Q3_K -32..31, Q6_K -128..127.
        mins: Q2_K / Q4_K / Q5_K sub-block mins, 0..15 or 0..63, else None.
        enc_id: float32 ``1/d`` of the legacy encoders, taken before ``d`` is rounded to fp16.
        enc_min: float32 block minimum of Q4_1 / Q5_1, taken before ``m`` is rounded to fp16.
            With ``enc_*`` None, ``quantize_with`` rounds on the stored ``d`` and ``m``.
    """

    d: Tensor
    m: Tensor | None = None
    dmin: Tensor | None = None
    scales: Tensor | None = None
    mins: Tensor | None = None
    enc_id: Tensor | None = None
    enc_min: Tensor | None = None


@dataclass(frozen=True)
class GGUFBlockFormat:
    """One GGML block quantization type (an immutable value).

    Args:
        name: lower-case type name, e.g. ``"q4_k"``.
        ggml_type: the ``gguf.GGMLQuantizationType`` written to a GGUF file.
        block_size: weights per stored block (32, or ``QK_K = 256`` for k-quants).
        type_bytes: bytes per stored block.
        group_size: weights sharing one ``step`` (and ``offset``) of the grid.
        qmin, qmax: range of the integer codes ``q`` in ``w = step * q + offset``.
    """

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int
    type_bytes: int
    group_size: int
    qmin: int
    qmax: int

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, block headers included: ``8 * type_bytes / block_size``."""
        return 8 * self.type_bytes / self.block_size

    def divides(self, in_features: int) -> bool:
        """Whether a row of ``in_features`` weights is whole blocks of this type."""
        return in_features % self.block_size == 0

    def nbytes(self, numel: int) -> int:
        """Bytes a tensor of ``numel`` weights (whole rows of blocks) takes in this type."""
        return numel // self.block_size * self.type_bytes

    def choose_params(self, W: Tensor) -> BlockParams:
        """Block scales (and mins) for a weight, as llama.cpp's reference encoder picks them.

        Args:
            W: ``(rows, cols)`` float weight, ``cols`` a multiple of ``block_size``.

        Returns:
            The parameters, rounded to their stored precision (fp16 scales, integer sub-scales).
        """
        x = _blocks(self, W)  # (rows, n_blocks, block_size)
        chunk = max(1, _CHUNK_WEIGHTS // x[0].numel())
        params = _cat_params([_CHOOSE[self.name](x[r : r + chunk]) for r in range(0, x.shape[0], chunk)])
        for name in ("d", "m", "dmin"):
            value = getattr(params, name)
            if value is not None and not torch.isfinite(value).all():
                big = W.abs().max().item()
                raise UserError(f"weights up to |w| = {big:.3g} overflow the fp16 scales of {self.name}")
        return params

    def grid(self, params: BlockParams) -> tuple[Tensor, Tensor | None]:
        """The grid of each group: weight ``j`` of a row may take ``step * q + offset``, ``q`` in qmin..qmax.

        A column-by-column method (GPTQ) rounds column ``j`` on group ``j // group_size``.

        Returns:
            ``step`` and ``offset`` (None where it is always 0), both ``(rows, cols // group_size)``.
        """
        if params.scales is None:
            step, offset = params.d, params.m
        else:
            step = params.d[..., None] * params.scales.to(torch.float32)
            offset = None if params.mins is None else -(params.dmin[..., None] * params.mins.to(torch.float32))
        rows = step.shape[0]
        return step.reshape(rows, -1), None if offset is None else offset.reshape(rows, -1)

    def _grid_for(self, shape: tuple[int, int], params: BlockParams) -> tuple[Tensor, Tensor | None]:
        """``grid(params)`` checked against a ``(rows, cols)`` matrix, as ``(rows, n_groups, 1)``."""
        step, offset = self.grid(params)
        if step.shape != (shape[0], shape[1] // self.group_size):
            raise ValueError(f"{self.name} params of shape {tuple(params.d.shape)} do not fit a {tuple(shape)} matrix")
        return step[..., None], None if offset is None else offset[..., None]

    def quantize_with(self, W: Tensor, params: BlockParams) -> Tensor:
        """Round each weight to the nearest code on the grid of ``params``, clamped to qmin..qmax.

        Ties go as in llama.cpp: away from zero (Q8_0), up (other legacy types), to even (k-quants).

        Args:
            W: ``(rows, cols)`` float weight, e.g. after GPTQ's updates.
            params: from ``choose_params`` (or ``unpack``) for a matrix of this shape.

        Returns:
            int8 codes ``q``, ``(rows, cols)``.
        """
        rows, cols = _check_weight(self, W).shape
        x = W.to(torch.float32).reshape(rows, -1, self.group_size)
        step, offset = self._grid_for((rows, cols), params)
        if params.scales is None:
            q = _legacy_codes(self, x, params)
        else:
            q = torch.round((x if offset is None else x - offset) / step)
            q = torch.where(step == 0, float(self.qmin), q)  # any code decodes the same; C stores 0 bits
        q = torch.nan_to_num(q, nan=0.0).clamp(self.qmin, self.qmax)
        return q.reshape(rows, cols).to(torch.int8)

    def grid_dequant(self, codes: Tensor, params: BlockParams) -> Tensor:
        """``step * q + offset`` as float32 ``(rows, cols)``, in the decoder's operations (bit-exact with it)."""
        rows, cols = codes.shape
        step, offset = self._grid_for((rows, cols), params)
        w = step * codes.to(torch.float32).reshape(rows, -1, self.group_size)
        return (w if offset is None else w + offset).reshape(rows, cols)

    def pack(self, codes: Tensor, params: BlockParams) -> Tensor:
        """The GGUF bytes of a quantized matrix.

        Args:
            codes: ``(rows, cols)`` integer codes in qmin..qmax.
            params: the matrix's parameters.

        Returns:
            uint8 ``(rows, cols // block_size * type_bytes)``: each row's blocks, as a GGUF tensor stores them.
        """
        rows, cols = codes.shape
        if codes.numel() and (codes.min() < self.qmin or codes.max() > self.qmax):
            raise ValueError(f"{self.name} codes must lie in {self.qmin}..{self.qmax}")
        stored = _pack_header(self.name, params)
        stored.update(_pack_codes(self, codes.reshape(-1, self.block_size)))
        data = torch.cat([stored[name] for name, _ in _LAYOUT[self.name]], dim=1)
        return data.reshape(rows, cols // self.block_size * self.type_bytes)

    def unpack(self, data: Tensor, shape: tuple[int, int]) -> tuple[Tensor, BlockParams]:
        """The inverse of ``pack``: int8 codes ``shape = (rows, cols)`` and params from GGUF bytes."""
        rows, cols = _check_bytes(self, data, shape)
        names, sizes = zip(*_LAYOUT[self.name])
        stored = dict(zip(names, data.reshape(-1, self.type_bytes).split(sizes, dim=1)))
        codes = _unpack_codes(self, stored).reshape(rows, cols).to(torch.int8)
        return codes, _unpack_header(self.name, stored, rows)

    def quantize(self, W: Tensor) -> Tensor:
        """llama.cpp's reference encoding of a weight: ``pack(quantize_with(W, choose_params(W)))``.

        Args:
            W: ``(rows, cols)`` float weight, ``cols`` a multiple of ``block_size``, all finite.

        Returns:
            The GGUF bytes, uint8 ``(rows, cols // block_size * type_bytes)``.

        Example:
            >>> import torch
            >>> from modelpress.formats.gguf_blocks import gguf_format
            >>> gguf_format("q8_0").quantize(torch.ones(2, 64)).shape
            torch.Size([2, 68])
        """
        params = self.choose_params(W)
        return self.pack(self.quantize_with(W, params), params)

    def dequantize(self, data: Tensor, shape: tuple[int, int]) -> Tensor:
        """Decode GGUF bytes of a ``shape = (rows, cols)`` matrix to float32, exactly as ggml does."""
        return self.grid_dequant(*self.unpack(data, shape))

    def fake_quantize(self, W: Tensor) -> Tensor:
        """``dequantize(quantize(W))`` in ``W``'s dtype (llama.cpp's round trip of the weight)."""
        return self.dequantize(self.quantize(W), tuple(W.shape)).to(W.dtype)


def _cat_params(parts: list[BlockParams]) -> BlockParams:
    """Params of consecutive row chunks, joined along the rows."""
    columns = {f.name: [getattr(p, f.name) for p in parts] for f in fields(BlockParams)}
    return BlockParams(**{name: None if ts[0] is None else torch.cat(ts) for name, ts in columns.items()})


# -- input checks -------------------------------------------------------------------------------


def _check_weight(fmt: GGUFBlockFormat, W: Tensor) -> Tensor:
    if W.ndim != 2:
        raise UserError(f"{fmt.name} quantizes 2-D (rows, cols) weights, got shape {tuple(W.shape)}")
    if W.shape[1] % fmt.block_size:
        raise UserError(
            f"{fmt.name} needs a column count divisible by its block size {fmt.block_size}, got shape {tuple(W.shape)}"
        )
    if not torch.isfinite(W).all():
        raise UserError(f"weight of shape {tuple(W.shape)} contains NaN or inf values; it cannot be quantized")
    return W


def _blocks(fmt: GGUFBlockFormat, W: Tensor) -> Tensor:
    """``W: (rows, cols)`` as float32 ``(rows, n_blocks, block_size)``."""
    rows = _check_weight(fmt, W).shape[0]
    return W.to(torch.float32).reshape(rows, -1, fmt.block_size)


def _check_bytes(fmt: GGUFBlockFormat, data: Tensor, shape: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    if cols % fmt.block_size:
        raise UserError(
            f"{fmt.name} shape {tuple(shape)} has a column count not divisible by its block size {fmt.block_size}"
        )
    n_bytes = rows * (cols // fmt.block_size) * fmt.type_bytes
    if data.dtype != torch.uint8 or data.numel() != n_bytes:
        raise UserError(
            f"{fmt.name} data for shape {tuple(shape)} must be {n_bytes} uint8 bytes, got {data.numel()} {data.dtype}"
        )
    return rows, cols


# -- shared arithmetic --------------------------------------------------------------------------


def _fp16(x: Tensor) -> Tensor:
    """Round to fp16 (nearest even, as GGML_FP32_TO_FP16), held as float32."""
    return x.to(torch.float16).to(torch.float32)


def _recip(x: Tensor) -> Tensor:
    """``1/x``, with 0 where ``x`` is 0 (the legacy encoders' ``id``)."""
    return torch.where(x == 0, 0.0, torch.ones_like(x) / x)


def _f32(v: float) -> Tensor:
    """A float32 constant, so that arithmetic on it rounds like C's ``float``."""
    return torch.tensor(v, dtype=torch.float32)


def _div(num: float | Tensor, den: Tensor) -> Tensor:
    """``num / den`` rounded once, as C divides (torch's ``float / tensor`` is ``float * (1 / tensor)``)."""
    return torch.as_tensor(num, dtype=torch.float32) / den


def _signed_absmax(x: Tensor) -> Tensor:
    """The element of largest ``|x|`` along the last axis, sign kept (first one on ties, like C)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _round_half_away(v: Tensor) -> Tensor:
    """C ``roundf``, in the exact float32 steps of ``gguf.quants.np_roundf``."""
    a = v.abs()
    floor = a.floor()
    return torch.sign(v) * (floor + torch.floor(2 * (a - floor)))


# -- legacy types: gguf.quants / quantize_row_q{8,4,5}_{0,1}_ref ------------------------------


def _choose_q8_0(x: Tensor) -> BlockParams:
    d = x.abs().amax(-1) / 127
    return BlockParams(d=_fp16(d), enc_id=_recip(d))


def _choose_symmetric(x: Tensor, nmax: int) -> BlockParams:
    d = _signed_absmax(x) / -nmax  # the largest |w| lands on code -nmax
    return BlockParams(d=_fp16(d), enc_id=_recip(d))


def _choose_affine(x: Tensor, levels: int) -> BlockParams:
    lo, hi = x.amin(-1), x.amax(-1)
    d = (hi - lo) / levels
    return BlockParams(d=_fp16(d), m=_fp16(lo), enc_id=_recip(d), enc_min=lo)


def _legacy_codes(fmt: GGUFBlockFormat, x: Tensor, p: BlockParams) -> Tensor:
    """Codes of the legacy encoders, float32 step for step as gguf.quants computes them."""
    inv = (p.enc_id if p.enc_id is not None else _recip(p.d))[..., None]
    if fmt.name == "q8_0":
        return _round_half_away(x * inv)
    if p.m is None:  # Q4_0, Q5_0: trunc(x * id + nmax + 0.5) - nmax, floor == trunc once clamped
        return torch.floor(x * inv + (0.5 - fmt.qmin)) + fmt.qmin
    lo = (p.enc_min if p.enc_min is not None else p.m)[..., None]
    return torch.floor((x - lo) * inv + 0.5)


# -- k-quants: the reference searches of ggml-quants.c, over all sub-blocks at once -------------
# Sub-blocks are columns of ``x: (n, n_sub_blocks)`` and every sum runs in C's order and float32
# rounding (``_csum``), so near-ties resolve as in llama.cpp's reference build.


def _sub_blocks(x: Tensor, n: int) -> Tensor:
    """``x: (rows, n_blocks, QK_K)`` as ``(n, rows * n_blocks * QK_K // n)``, one column per sub-block."""
    return x.reshape(-1, n).T.contiguous()


def _csum(t: Tensor) -> Tensor:
    """Sum over the first axis, in order, in float32: the rounding of the C ``for`` loops."""
    total = t[0]
    for row in t[1:]:
        total = total + row
    return total


def _make_qkx2(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor]:
    """``make_qkx2_quants``: scale and min of ``w_hat = scale * L + min``, L in 0..nmax, min <= 0.

    Rounds ``x`` with ``iscale = (nmax + rmin + rdelta * i) / (max - min)`` for i = 0..nstep, fits
    scale and min to each rounding by weighted least squares, and keeps a fit that lowers the
    weighted error (squared, or absolute with ``use_mad``). As in the C code, each rounding starts
    from the best ``min`` so far, so the steps run in order. x, w: ``(n, S)``; returns
    ``(scale, -min)``, both ``(S,)``.
    """
    hi, lo = x.amax(0), x.amin(0)
    lo = torch.where(lo > 0, 0.0, lo)
    flat = hi == lo  # a constant sub-block <= 0: exactly ``min``, with scale 0
    sum_w, sum_x = _csum(w), _csum(w * x)

    def rounded(levels: float | Tensor, mn: Tensor) -> Tensor:
        return torch.round(_div(levels, torch.where(flat, 1.0, hi - mn)) * (x - mn)).clamp(0, nmax)

    def error(scale: Tensor, mn: Tensor, L: Tensor) -> Tensor:
        diff = scale * L + mn - x
        return _csum(w * (diff.abs() if use_mad else diff * diff))

    best_scale, best_min = _div(1.0, _div(nmax, torch.where(flat, 1.0, hi - lo))), lo
    best = error(best_scale, best_min, rounded(nmax, lo))
    for i in range(nstep + 1):
        L = rounded(_f32(rmin) + _f32(rdelta) * i + nmax, best_min)
        wL = w * L
        sum_l, sum_l2, sum_xl = _csum(wL), _csum(wL * L), _csum(wL * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        scale = (sum_w * sum_xl - sum_x * sum_l) / D
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / D
        scale = torch.where(mn > 0, sum_xl / sum_l2, scale)  # a positive min is not storable: refit without
        mn = torch.where(mn > 0, 0.0, mn)
        err = error(scale, mn, L)
        better = (D > 0) & (err < best)
        best_scale, best_min = torch.where(better, scale, best_scale), torch.where(better, mn, best_min)
        best = torch.where(better, err, best)
    return torch.where(flat, 0.0, best_scale), -best_min


def _make_qx(x: Tensor, nmax: int) -> Tensor:
    """``make_qx_quants`` with ``rmse_type = 1``: the scale of codes -nmax..nmax-1, weights ``x^2``.

    Tries ``iscale = -(nmax + 0.1 * k) / max`` for k = 0, -9..9 and keeps the rounding of best
    weighted least-squares fit, ``sum(w x L)^2 / sum(w L^2)``. x: ``(n, S)``; returns ``(S,)``.
    """
    mx = _signed_absmax(x.T)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    w = x * x
    for k in (0, *range(-9, 0), *range(1, 10)):
        L = torch.round(_div(-(nmax + _f32(0.1) * k), mx) * x).clamp(-nmax, nmax - 1)
        sum_lx, sum_l2 = _csum(w * x * L), _csum(w * L * L)
        if k == 0:
            scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, 0.0)
            best = scale * sum_lx
            continue
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        scale = torch.where(better, sum_lx / sum_l2, scale)
        best = torch.where(better, scale * sum_lx, best)
    return torch.where(zero, 0.0, scale)


def _make_q3(x: Tensor, nmax: int = 4, n_try: int = 5) -> Tensor:
    """``make_q3_quants`` with ``do_rmse``: codes -nmax..nmax-1 refined one at a time, weights ``x^2``.

    Each pass moves each code to the value that the fit of all others asks for, when that raises
    ``sum(w x L)^2 / sum(w L^2)``. x: ``(n, S)``; returns the least-squares scale, ``(S,)``.
    """
    mx = _signed_absmax(x.T)
    zero = mx.abs() < GROUP_MAX_EPS
    L = torch.round(_div(-nmax, torch.where(zero, 1.0, mx)) * x).clamp(-nmax, nmax - 1)
    w = x * x
    sum_lx, sum_l2 = _csum(w * x * L), _csum(w * L * L)
    for _ in range(n_try):
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], L[i]
            rest_lx, rest_l2 = sum_lx - wi * xi * li, sum_l2 - wi * li * li  # the fit without code i
            new = torch.round(xi * rest_l2 / torch.where(rest_lx > 0, rest_lx, 1.0)).clamp(-nmax, nmax - 1)
            slx, sl2 = rest_lx + wi * xi * new, rest_l2 + wi * new * new
            better = (rest_lx > 0) & (new != li) & (sl2 > 0) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            L[i] = torch.where(better, new, li)
            sum_lx, sum_l2 = torch.where(better, slx, sum_lx), torch.where(better, sl2, sum_l2)
    return torch.where(zero | (sum_l2 <= 0), 0.0, sum_lx / sum_l2)


def _unsigned_subscales(v: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Sub-block values ``v >= 0: (..., n_sub)`` as ``d * s``: fp16 ``d (...)``, ints ``s`` 0..levels."""
    vmax = v.amax(-1, keepdim=True)
    vmax = torch.where(vmax > 0, vmax, 0.0)  # C starts its running max at +0
    inv = torch.where(vmax > 0, _div(levels, torch.where(vmax > 0, vmax, 1.0)), 0.0)
    return _fp16(vmax.squeeze(-1) / levels), torch.round(inv * v).clamp(0, levels).to(torch.int32)


def _signed_subscales(v: Tensor, lo: int, hi: int, eps: float, empty: int) -> tuple[Tensor, Tensor]:
    """Signed sub-block scales as ``d * s``, s in lo..hi, the largest ``|v|`` mapped to ``lo``.

    A super-block whose largest ``|v|`` is not above ``eps`` gets ``d = 0`` and ``s = empty``.
    """
    vmax = _signed_absmax(v)[..., None]
    ok = vmax.abs() > eps
    iscale = _div(lo, torch.where(ok, vmax, 1.0))
    d = torch.where(ok, _div(1.0, iscale), 0.0)
    s = torch.where(ok, torch.round(iscale * v).clamp(lo, hi), empty)
    return _fp16(d.squeeze(-1)), s.to(torch.int32)


def _choose_q2_k(x: Tensor) -> BlockParams:
    xs = _sub_blocks(x, 16)
    scale, mn = _make_qkx2(xs, xs.abs(), nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
    (d, scales), (dmin, mins) = (_unsigned_subscales(v.reshape(*x.shape[:-1], -1), 15) for v in (scale, mn))
    return BlockParams(d=d, dmin=dmin, scales=scales, mins=mins)


def _choose_q45_k(x: Tensor, nmax: int, rmin: float, nstep: int) -> BlockParams:
    xs = _sub_blocks(x, 32)
    # rms of the sub-block + |x|; sqrt in float64, rounded once (torch's float32 sqrt is not exact)
    w = torch.sqrt((_csum(xs * xs) / 32).double()).float() + xs.abs()
    scale, mn = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep, use_mad=False)
    (d, scales), (dmin, mins) = (_unsigned_subscales(v.reshape(*x.shape[:-1], -1), 63) for v in (scale, mn))
    return BlockParams(d=d, dmin=dmin, scales=scales, mins=mins)


def _choose_q3_k(x: Tensor) -> BlockParams:
    scale = _make_q3(_sub_blocks(x, 16)).reshape(*x.shape[:-1], -1)
    d, scales = _signed_subscales(scale, -32, 31, eps=0.0, empty=-32)  # empty: stored bytes 0, like C's memset
    return BlockParams(d=d, scales=scales)


def _choose_q6_k(x: Tensor) -> BlockParams:
    scale = _make_qx(_sub_blocks(x, 16), 32).reshape(*x.shape[:-1], -1)
    d, scales = _signed_subscales(scale, -128, 127, eps=GROUP_MAX_EPS, empty=0)
    return BlockParams(d=d, scales=scales)


_CHOOSE = {
    "q8_0": _choose_q8_0,
    "q4_0": partial(_choose_symmetric, nmax=8),
    "q4_1": partial(_choose_affine, levels=15),
    "q5_0": partial(_choose_symmetric, nmax=16),
    "q5_1": partial(_choose_affine, levels=31),
    "q2_k": _choose_q2_k,
    "q3_k": _choose_q3_k,
    "q4_k": partial(_choose_q45_k, nmax=15, rmin=-1.0, nstep=20),
    "q5_k": partial(_choose_q45_k, nmax=31, rmin=-0.5, nstep=15),
    "q6_k": _choose_q6_k,
}

# -- byte layouts (ggml-common.h block structs) -------------------------------------------------

# The fields of one block, in stored order, with their sizes in bytes.
_LAYOUT = {
    "q8_0": (("d", 2), ("qs", 32)),
    "q4_0": (("d", 2), ("qs", 16)),
    "q4_1": (("d", 2), ("m", 2), ("qs", 16)),
    "q5_0": (("d", 2), ("qh", 4), ("qs", 16)),
    "q5_1": (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)),
    "q2_k": (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)),
    "q3_k": (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)),
    "q4_k": (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)),
    "q5_k": (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)),
    "q6_k": (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)),
}

# Where the bits of the stored code ``u = q - qmin`` go: (field, lowest bit of u, bits, u's block
# viewed as ``shape``, axis of ``shape`` whose codes share one byte, lowest bits first). E.g. Q4_0's
# ("qs", 0, 4, (2, 16), 0): byte j holds codes j and 16 + j in its low and high nibble. Q8_0
# stores q itself as int8.
_CODE_FIELDS = {
    "q4_0": (("qs", 0, 4, (2, 16), 0),),
    "q4_1": (("qs", 0, 4, (2, 16), 0),),
    "q5_0": (("qh", 4, 1, (4, 8), 1), ("qs", 0, 4, (2, 16), 0)),
    "q5_1": (("qh", 4, 1, (4, 8), 1), ("qs", 0, 4, (2, 16), 0)),
    "q2_k": (("qs", 0, 2, (2, 4, 32), 1),),
    "q3_k": (("hmask", 2, 1, (8, 32), 0), ("qs", 0, 2, (2, 4, 32), 1)),
    "q4_k": (("qs", 0, 4, (4, 2, 32), 1),),
    "q5_k": (("qh", 4, 1, (8, 32), 0), ("qs", 0, 4, (4, 2, 32), 1)),
    "q6_k": (("ql", 0, 4, (2, 2, 64), 1), ("qh", 4, 2, (2, 4, 32), 1)),
}


def _shifts(shape: tuple[int, ...], axis: int, bits: int) -> Tensor:
    view = [1] * (len(shape) + 1)
    view[axis + 1] = shape[axis]
    return (torch.arange(shape[axis], dtype=torch.int32) * bits).reshape(view)


def _pack_bits(v: Tensor, shape: tuple[int, ...], axis: int, bits: int) -> Tensor:
    """Values ``v: (B, prod(shape))`` of ``bits`` bits, those along ``axis`` OR-ed into one byte."""
    v = v.to(torch.int32).reshape(v.shape[0], *shape)
    return (v << _shifts(shape, axis, bits)).sum(axis + 1).reshape(v.shape[0], -1).to(torch.uint8)


def _unpack_bits(b: Tensor, shape: tuple[int, ...], axis: int, bits: int) -> Tensor:
    """Inverse of ``_pack_bits``: int32 ``(B, prod(shape))`` from bytes ``b: (B, n)``."""
    kept = [n for i, n in enumerate(shape) if i != axis]
    b = b.to(torch.int32).reshape(b.shape[0], *kept).unsqueeze(axis + 1)
    return ((b >> _shifts(shape, axis, bits)) & ((1 << bits) - 1)).reshape(b.shape[0], -1)


def _pack_codes(fmt: GGUFBlockFormat, q: Tensor) -> dict[str, Tensor]:
    if fmt.name == "q8_0":
        return {"qs": q.to(torch.int8).view(torch.uint8)}
    u = q.to(torch.int32) - fmt.qmin
    return {
        f: _pack_bits((u >> low) & ((1 << bits) - 1), shape, axis, bits)
        for f, low, bits, shape, axis in _CODE_FIELDS[fmt.name]
    }


def _unpack_codes(fmt: GGUFBlockFormat, stored: dict[str, Tensor]) -> Tensor:
    if fmt.name == "q8_0":
        return stored["qs"].contiguous().view(torch.int8)
    u = sum(_unpack_bits(stored[f], shape, axis, bits) << low for f, low, bits, shape, axis in _CODE_FIELDS[fmt.name])
    return u + fmt.qmin


def _pack_header(name: str, p: BlockParams) -> dict[str, Tensor]:
    halves = {f: getattr(p, f) for f in ("d", "m", "dmin") if getattr(p, f) is not None}
    out = {f: t.reshape(-1, 1).to(torch.float16).view(torch.uint8) for f, t in halves.items()}
    if p.scales is None:
        return out
    sc = p.scales.reshape(-1, p.scales.shape[-1])
    mn = None if p.mins is None else p.mins.reshape(sc.shape)
    if name == "q2_k":  # byte j: scale j in the low nibble, min j in the high one
        out["scales"] = (sc | (mn << 4)).to(torch.uint8)
    elif name == "q3_k":  # 6-bit sc + 32: low nibbles in bytes 0-7, high 2 bits in bytes 8-11
        u = sc + 32
        out["scales"] = torch.cat([_pack_bits(u & 15, (2, 8), 0, 4), _pack_bits(u >> 4, (4, 4), 0, 2)], dim=1)
    elif name == "q6_k":
        out["scales"] = sc.to(torch.int8).view(torch.uint8)
    else:  # Q4_K, Q5_K (get_scale_min_k4): sc[0:4], mn[0:4] in 6 bits, sc[4:8], mn[4:8] split 4 + 2
        hi_sc, hi_mn = sc[:, 4:], mn[:, 4:]
        parts = (sc[:, :4] | (hi_sc >> 4) << 6, mn[:, :4] | (hi_mn >> 4) << 6, (hi_sc & 15) | (hi_mn & 15) << 4)
        out["scales"] = torch.cat(parts, dim=1).to(torch.uint8)
    return out


def _unpack_header(name: str, stored: dict[str, Tensor], rows: int) -> BlockParams:
    fp16 = {
        f: stored[f].contiguous().view(torch.float16).to(torch.float32).reshape(rows, -1)
        for f in ("d", "m", "dmin")
        if f in stored
    }
    if "scales" not in stored:
        return BlockParams(**fp16)
    b = stored["scales"].to(torch.int32)
    mn = None
    if name == "q2_k":
        sc, mn = b & 15, b >> 4
    elif name == "q3_k":
        sc = (_unpack_bits(b[:, :8], (2, 8), 0, 4) | _unpack_bits(b[:, 8:], (4, 4), 0, 2) << 4) - 32
    elif name == "q6_k":
        sc = stored["scales"].contiguous().view(torch.int8).to(torch.int32)
    else:
        lo_sc, lo_mn, hi = b[:, :4], b[:, 4:8], b[:, 8:]
        sc = torch.cat([lo_sc & 63, (hi & 15) | (lo_sc >> 6) << 4], dim=1)
        mn = torch.cat([lo_mn & 63, (hi >> 4) | (lo_mn >> 6) << 4], dim=1)
    n_blocks = fp16["d"].shape[1]
    mins = None if mn is None else mn.reshape(rows, n_blocks, -1)
    return BlockParams(**fp16, scales=sc.reshape(rows, n_blocks, -1), mins=mins)


# -- the table ----------------------------------------------------------------------------------


def _format(name: str, group_size: int, qmin: int, qmax: int) -> GGUFBlockFormat:
    ggml_type = GGMLQuantizationType[name.upper()]
    block_size, type_bytes = GGML_QUANT_SIZES[ggml_type]
    return GGUFBlockFormat(name, ggml_type, block_size, type_bytes, group_size, qmin, qmax)


GGUF_FORMATS: dict[str, GGUFBlockFormat] = {
    f.name: f
    for f in (
        _format("q8_0", 32, -128, 127),
        _format("q4_0", 32, -8, 7),
        _format("q4_1", 32, 0, 15),
        _format("q5_0", 32, -16, 15),
        _format("q5_1", 32, 0, 31),
        _format("q2_k", 16, 0, 3),
        _format("q3_k", 16, -4, 3),
        _format("q4_k", 32, 0, 15),
        _format("q5_k", 32, 0, 31),
        _format("q6_k", 16, -32, 31),
    )
}


def gguf_format(name: str) -> GGUFBlockFormat:
    """The format called ``name`` (case-insensitive), e.g. ``"Q4_K"``.

    Example:
        >>> gguf_format("Q6_K").bits_per_weight
        6.5625
    """
    try:
        return GGUF_FORMATS[name.strip().lower()]
    except KeyError:
        raise UserError(f"unknown GGUF block format {name!r}; known: {', '.join(GGUF_FORMATS)}") from None
