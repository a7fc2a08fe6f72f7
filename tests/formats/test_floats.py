"""Float and lookup formats: exact grids, nearest rounding, the specs' scale rules, and
compressed-tensors' own quantizer and reader agreeing with ours."""

from __future__ import annotations

import math

import pytest
import torch

from modelpress.errors import UserError
from modelpress.formats import grids
from modelpress.formats.floats import FP8Format, MXFP4Format, NF4Format, NVFP4Format, parse_format
from modelpress.formats.integer import IntFormat

ALL_FP8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
FP8_VALUES = ALL_FP8[~ALL_FP8.isnan()]  # every finite E4M3FN value (254: +-0 included)
E2M1_VALUES = torch.cat([grids.E2M1_MAGNITUDES, -grids.E2M1_MAGNITUDES])


def _assert_nearest(rounded: torch.Tensor, x: torch.Tensor, levels: torch.Tensor) -> None:
    """Brute force: no level is strictly closer to any x than the rounded value."""
    best = (x[:, None] - levels[None, :]).abs().amin(dim=1)
    assert torch.isin(rounded, levels).all()
    torch.testing.assert_close((rounded - x).abs(), best, rtol=0, atol=0)


# -- element grids -----------------------------------------------------------------------------


def test_every_e2m1_and_nf4_level_round_trips_exactly():
    assert torch.equal(grids.round_e2m1(E2M1_VALUES), E2M1_VALUES)
    codes = grids.e2m1_codes(E2M1_VALUES)
    assert sorted(codes.tolist()) == list(range(16))  # all 16 codes, sign in bit 3
    assert torch.equal(grids.e2m1_values(codes), E2M1_VALUES)
    assert torch.equal(grids.round_nf4(grids.NF4_LEVELS), grids.NF4_LEVELS)
    assert grids.nf4_codes(grids.NF4_LEVELS).tolist() == list(range(16))


def test_nf4_table_is_the_papers_construction():
    torch.testing.assert_close(grids.nf4_levels_from_quantiles().to(torch.float32), grids.NF4_LEVELS,
                               rtol=0, atol=2e-7)
    assert grids.NF4_LEVELS[7] == 0 and grids.NF4_LEVELS.min() == -1 and grids.NF4_LEVELS.max() == 1


def test_random_values_round_to_the_nearest_level():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(20000, generator=g) * 16 - 8, torch.randn(5000, generator=g)])
    _assert_nearest(grids.round_e2m1(x), x, E2M1_VALUES)
    x = torch.rand(20000, generator=g) * 2.4 - 1.2
    _assert_nearest(grids.round_nf4(x), x, grids.NF4_LEVELS)


def test_e2m1_ties_go_to_the_even_mantissa_and_negatives_keep_their_sign():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert grids.round_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert grids.round_e2m1(-ties).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert grids.e2m1_codes(torch.tensor([-0.1, 0.1, 100.0, -100.0])).tolist() == [8, 0, 7, 15]


def test_fp8_rounding_is_nearest_even_saturating_with_subnormals():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-12, 9, (20000,), generator=g).float())
    _assert_nearest(grids.round_fp8_e4m3(x), x, FP8_VALUES)
    assert grids.round_fp8_e4m3(torch.tensor([1000.0, -1e9])).tolist() == [448.0, -448.0]  # saturate
    sub = 2.0**-9  # smallest subnormal
    assert grids.round_fp8_e4m3(torch.tensor([sub, 0.4 * sub, 0.6 * sub, 1.5 * sub])).tolist() == [sub, 0, sub, 2 * sub]
    pos = FP8_VALUES[FP8_VALUES >= 0].sort().values.unique()
    mids = (pos[1:] + pos[:-1]) / 2  # exact ties: the even code wins
    codes = grids.round_fp8_e4m3(mids).to(torch.float8_e4m3fn).view(torch.uint8)
    assert (codes % 2 == 0).all()


def test_pack_nibbles_even_column_low():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert grids.pack_nibbles(codes).tolist() == [[0x21, 0x0F]]
    assert torch.equal(grids.unpack_nibbles(grids.pack_nibbles(codes)), codes)


# -- formats -----------------------------------------------------------------------------------


def test_fp8_values_are_torchs_cast_of_the_scaled_weight():
    W = torch.randn(32, 64) * torch.logspace(-2, 1, 64)
    for fmt in (FP8Format(), FP8Format(granularity="channel")):
        qt = fmt.quantize(W)
        amax = W.abs().amax() if fmt.granularity == "tensor" else W.abs().amax(dim=1, keepdim=True)
        torch.testing.assert_close(qt.scale.reshape(-1, 1).squeeze(), (amax / 448).reshape(-1, 1).squeeze(),
                                   rtol=0, atol=0)
        expected = (W / qt.scale.reshape(-1, 1)).to(torch.float8_e4m3fn).to(torch.float32)
        assert torch.equal(qt.q, expected)
        assert qt.q.abs().max() == 448  # the largest weight lands on the top of the grid


def test_mxfp4_scales_are_the_specs_powers_of_two():
    W = torch.randn(16, 128) * torch.logspace(-3, 2, 128)
    W[0, :32] = 0  # an all-zero block
    qt = MXFP4Format().quantize(W)
    amax = W.abs().reshape(16, 4, 32).amax(-1)
    for s, a in zip(qt.scale.flatten().tolist(), amax.flatten().tolist()):
        expected = 2.0 ** (math.floor(math.log2(a)) - 2) if a > 0 else 2.0**-127
        assert s == expected  # power of two: floor(log2(amax)) - emax_elem (OCP MX v1.0, 6.3)
    assert qt.q.abs().max() <= 6 and torch.isin(qt.q, E2M1_VALUES).all()


def test_nvfp4_scales_follow_the_global_and_block_definition():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    qt = NVFP4Format().quantize(W)
    g = 448 * 6 / W.abs().max().item()
    assert qt.global_scale == pytest.approx(g, rel=1e-6)
    block = qt.scale * qt.global_scale  # the stored block scale, up to float32 rounding of scale
    torch.testing.assert_close(block.to(torch.float8_e4m3fn).to(torch.float32), block, rtol=1e-6, atol=0)
    torch.testing.assert_close(block, W.abs().reshape(8, 4, 16).amax(-1) / 6 * qt.global_scale, rtol=0.07, atol=0)
    assert block.max() == pytest.approx(448, rel=1e-6)  # the block holding the tensor's amax


def test_nvfp4_bytes_equal_compressed_tensors_own_quantization():
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    from modelpress.export.compressed_tensors_floats import checkpoint_tensors

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=g) * torch.logspace(-4, 0, 256)  # blocks far below the tensor max
    W[3, :16] = 0
    ours = checkpoint_tensors("m", NVFP4Format().quantize(W))

    scheme = QuantizationScheme(targets=["Linear"], **NVFP4A16)
    gs = generate_gparam(W.min(), W.max())
    Wg = W.reshape(64, 16, 16)
    scale, _ = calculate_qparams(Wg.amin(-1), Wg.amax(-1), scheme.weights, global_scale=gs)
    theirs = NVFP4PackedCompressor.compress({"weight": W, "weight_scale": scale, "weight_global_scale": gs}, scheme)
    assert torch.equal(ours["m.weight_packed"], theirs["weight_packed"])
    assert torch.equal(ours["m.weight_scale"].view(torch.uint8), theirs["weight_scale"].view(torch.uint8))
    assert torch.equal(ours["m.weight_global_scale"], gs)


@pytest.mark.parametrize("spec", ["nvfp4", "mxfp4", "fp8", "fp8-channel"])
def test_compressed_tensors_reader_gets_our_values(spec):
    """compressed-tensors' own decompressor, fed our tensors, returns our dequantized weight."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from modelpress.export.compressed_tensors_floats import checkpoint_tensors, quantization_args, storage_format

    fmt = parse_format(spec)
    qt = fmt.quantize(torch.randn(16, 64) * 0.05)
    scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(fmt))
    stored = {k.removeprefix("m."): v for k, v in checkpoint_tensors("m", qt).items()}
    W = BaseCompressor.get_value_from_registry(storage_format(fmt)).decompress(stored, scheme)["weight"]
    # the fp4 decompressors return bfloat16, rounding q * scale (FP8 and MX products are exact)
    expected = qt.dequantize()
    torch.testing.assert_close(W.to(torch.float32), expected.to(W.dtype).to(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["fp8", "fp8-channel", "nf4", "mxfp4", "nvfp4"])
def test_one_column_with_its_scales_rounds_like_the_whole_tensor(spec):
    """GPTQ rounds one column at a time: ``fake_quantize_grouped(w_col, s_col, None)``."""
    fmt = parse_format(spec).for_tensor(W := torch.randn(24, 64))
    scale, zero = fmt.qparams_from_range(*(lambda Wg: (Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)))(fmt.grouped(W)))
    assert zero is None
    full = fmt.fake_quantize_grouped(fmt.grouped(W), scale, None).reshape(W.shape)
    s = scale.squeeze(-1)
    g = fmt.group_size_for(64)
    for col in (0, 17, 63):
        s_col = s[:, col // g] if s.shape[0] > 1 else s[:, 0]
        assert torch.equal(fmt.fake_quantize_grouped(W[:, col], s_col, None), full[:, col])


def test_bits_per_weight_include_the_scales():
    assert parse_format("nvfp4").bits_per_weight() == 4.5
    assert parse_format("nvfp4").bits_per_weight(numel=4096) == 4.5 + 32 / 4096
    assert parse_format("mxfp4").bits_per_weight() == 4.25
    assert parse_format("nf4").bits_per_weight() == 4.25
    assert parse_format("nf4-g128").bits_per_weight() == 4.125
    assert parse_format("fp8-channel").bits_per_weight(in_features=512) == 8 + 32 / 512
    qt = parse_format("nvfp4").quantize(torch.randn(32, 64))
    assert qt.nbytes == (32 * 64 * 4 + 32 * 4 * 8 + 32) // 8


def test_parse_format_specs_and_errors():
    assert parse_format("fp8") == FP8Format(granularity="tensor")
    assert parse_format("FP8-channel") == FP8Format(granularity="channel")
    assert parse_format("nf4") == NF4Format(group_size=64)
    assert parse_format("nf4-g128", observer="mse") == NF4Format(group_size=128, observer="mse")
    assert parse_format("mxfp4") == MXFP4Format() and parse_format("nvfp4") == NVFP4Format()
    assert parse_format("int4-g64", observer="mse") == IntFormat(bits=4, group_size=64, observer="mse")
    for bad in ("nvfp4-g32", "mxfp4-channel", "fp8-g128", "nf4-channel", "fp4", "int9", "nf4-g0"):
        with pytest.raises(UserError):
            parse_format(bad)
    with pytest.raises(UserError, match="16 weights"):
        NVFP4Format(group_size=8)
    with pytest.raises(UserError, match="do not divide"):
        MXFP4Format().quantize(torch.randn(4, 48))
    with pytest.raises(UserError, match="NaN"):
        NVFP4Format().quantize(torch.full((2, 16), float("nan")))
