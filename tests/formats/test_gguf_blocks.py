"""GGUF block formats: bytes against gguf-py and llama.cpp, exact decoding, grid rounding, error levels."""

import hashlib

import gguf.quants
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES

from modelpress.errors import UserError
from modelpress.formats.gguf_blocks import GGUF_FORMATS, BlockParams, gguf_format

ALL = sorted(GGUF_FORMATS)
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]  # the types gguf-py 0.19 can encode
K_QUANTS = [name for name in ALL if name.endswith("_k")]

# SQNR (dB) of llama.cpp's reference encoders on randn(64, 1024), seed 0: our bytes equal theirs.
EXPECTED_SQNR = {
    "q8_0": 45.47, "q4_0": 21.35, "q4_1": 22.13, "q5_0": 27.40, "q5_1": 28.44,
    "q2_k": 10.54, "q3_k": 16.45, "q4_k": 22.91, "q5_k": 28.88, "q6_k": 35.05,
}  # fmt: skip

# sha256 (first 32 hex digits) of the bytes llama.cpp's quantize_row_*_ref (ggml-quants.c, ggml
# commit d99724f, gcc -O2) writes for golden_weights(); gguf-py has no k-quant encoder to compare with.
LLAMA_CPP_DIGESTS = {
    "q8_0": "a3a774295cd648f059a188109426fe81",
    "q4_0": "3d352837f3dcd46c1db99d5e49a0fcc1",
    "q4_1": "a2f9164e5afd6bded7fd1cec35003530",
    "q5_0": "af0d3f0a804357e30ad8ba363c5031c4",
    "q5_1": "bf60f41f48da58a85ebea108cad3bab7",
    "q2_k": "51bd9885f2715d705c178c45e4d58f3e",
    "q3_k": "dcc432109db1d3d47987529cbc67d337",
    "q4_k": "1a12c7a4f1b53ed92c40b3abcd9d8183",
    "q5_k": "0566178698bd79471b20bf4d2cb27c7c",
    "q6_k": "cfb057fe43e797630e58564eabdffb85",
}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:32]


def golden_weights() -> torch.Tensor:
    """(64, 2048) weights from integer hashing and exact float32 sums: the same bits on any platform."""
    i = torch.arange(64 * 2048 * 4, dtype=torch.int64)
    for _ in range(2):
        i = ((i >> 16) ^ i) * 0x45D9F3B % 2**32
    u = (((i >> 16) ^ i) >> 8).to(torch.float32) * 2.0**-24  # 24-bit uniforms in [0, 1)
    W = (u.reshape(64, 2048, 4).sum(-1) - 2) * 1.75  # Irwin-Hall(4): near Gaussian, unit variance
    W[:, 5::67] *= 6  # outlier columns
    W[60:] += 0.75  # shifted rows
    return W


def weight_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    outliers = randn(6, 512)
    outliers[:, 5] *= 50
    outliers[3, ::37] = 300
    zero_tiny = randn(6, 512)
    zero_tiny[0] = 0
    zero_tiny[1, :256] = 0  # a zero super-block next to a normal one
    zero_tiny[1, 300:320] = 0  # a zero sub-block inside a normal super-block
    zero_tiny[2] *= 1e-6  # fp16 scales become subnormal
    zero_tiny[3] *= 1e-9  # fp16 scales underflow to 0
    zero_tiny[4] = -0.0
    ties = torch.randint(-8, 8, (6, 512), generator=g).float()  # equal |max| of both signs
    ties[1] = torch.arange(512) % 15 - 7.5
    ties[1, ::32], ties[1, 1::32] = -8, 7  # Q4_0 and Q4_1 get d = 1: codes at exact halves
    ties[2] = torch.arange(512) % 60 - 29.5
    ties[2, ::32] = 127  # Q8_0 gets d = 1: exact halves
    ties[3:] = torch.randint(-3, 4, (3, 512), generator=g).float() * 0.25
    ties[5] = ties[5].sign() * 7
    one_signed = randn(6, 512)
    one_signed[0], one_signed[1], one_signed[2] = 0.5, -one_signed[1].abs(), one_signed[2].abs() + 3
    return {
        "randn_3_superblocks": randn(5, 768),
        "outliers": outliers,
        "zero_and_tiny": zero_tiny,
        "ties": ties,
        "one_signed_and_constant": one_signed,
        "wide_dynamic_range": randn(4, 512) * torch.logspace(-4, 2, 512),
    }


CASES = weight_cases()


def gguf_dequantize(fmt, data: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), fmt.ggml_type))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns, so that comparisons see -0.0 and NaN payloads."""
    return t.contiguous().view(torch.int32)


def sqnr_db(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return (10 * torch.log10(W.pow(2).sum() / (W_hat - W).pow(2).sum())).item()


# -- the table ----------------------------------------------------------------------------------


def test_table_agrees_with_gguf_sizes_and_known_bits_per_weight():
    bpw = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0,
           "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}  # fmt: skip
    assert sorted(bpw) == ALL
    for name, fmt in GGUF_FORMATS.items():
        assert (fmt.block_size, fmt.type_bytes) == GGML_QUANT_SIZES[fmt.ggml_type]
        assert fmt.ggml_type.name.lower() == name
        assert fmt.bits_per_weight == bpw[name]
        assert fmt.block_size % fmt.group_size == 0
        assert fmt.quantize(torch.zeros(3, 512)).shape == (3, 512 // fmt.block_size * fmt.type_bytes)


def test_gguf_format_is_case_insensitive_and_lists_names_when_unknown():
    assert gguf_format(" Q4_K ") is GGUF_FORMATS["q4_k"]
    with pytest.raises(UserError, match="q2_k.*q6_k") as err:
        gguf_format("q4_k_m")
    assert "'q4_k_m'" in str(err.value)


# -- bytes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_encoding_equals_gguf_quantize_byte_for_byte(name, case):
    fmt, W = GGUF_FORMATS[name], CASES[case]
    ref = torch.from_numpy(gguf.quants.quantize(W.numpy(), fmt.ggml_type))
    assert torch.equal(fmt.quantize(W), ref)


@pytest.mark.parametrize("name", ALL)
def test_encoding_equals_llama_cpp_reference_bytes(name):
    W = golden_weights()
    assert digest(W) == "b8f3f7395049cffb2d91440cd7cd2227"  # the inputs themselves are unchanged
    assert digest(GGUF_FORMATS[name].quantize(W)) == LLAMA_CPP_DIGESTS[name]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ALL)
def test_gguf_decodes_our_bytes_to_what_the_encoder_meant_bit_for_bit(name, case):
    fmt, W = GGUF_FORMATS[name], CASES[case]
    params = fmt.choose_params(W)
    codes = fmt.quantize_with(W, params)
    data = fmt.pack(codes, params)
    assert torch.equal(data, fmt.quantize(W))
    meant = fmt.grid_dequant(codes, params)
    assert torch.equal(bits(fmt.dequantize(data, W.shape)), bits(meant))
    assert torch.equal(bits(gguf_dequantize(fmt, data)), bits(meant))
    assert torch.isfinite(meant).all()


def random_params(fmt, rows: int, n_blocks: int, g: torch.Generator) -> BlockParams:
    """Parameters anywhere in their stored ranges, negative fp16 scales included."""
    def fp16(*shape):
        return (torch.randn(*shape, generator=g) * 0.01).half().float()

    def ints(lo, hi):
        shape = (rows, n_blocks, fmt.block_size // fmt.group_size)
        return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int32)

    d = fp16(rows, n_blocks)
    if fmt.name in ("q4_1", "q5_1"):
        return BlockParams(d=d, m=fp16(rows, n_blocks))
    if fmt.name in ("q2_k", "q4_k", "q5_k"):
        top = 15 if fmt.name == "q2_k" else 63
        return BlockParams(d=d, dmin=fp16(rows, n_blocks), scales=ints(0, top), mins=ints(0, top))
    if fmt.name == "q3_k":
        return BlockParams(d=d, scales=ints(-32, 31))
    if fmt.name == "q6_k":
        return BlockParams(d=d, scales=ints(-128, 127))
    return BlockParams(d=d)


@pytest.mark.parametrize("name", ALL)
def test_every_code_and_param_value_decodes_like_gguf_and_unpacks_back(name):
    fmt, g = GGUF_FORMATS[name], torch.Generator().manual_seed(1)
    rows, cols = 3, 1024
    params = random_params(fmt, rows, cols // fmt.block_size, g)
    codes = torch.randint(fmt.qmin, fmt.qmax + 1, (rows, cols), generator=g, dtype=torch.int32).to(torch.int8)
    data = fmt.pack(codes, params)
    assert torch.equal(bits(gguf_dequantize(fmt, data)), bits(fmt.grid_dequant(codes, params)))
    codes_back, params_back = fmt.unpack(data, (rows, cols))
    assert torch.equal(codes_back, codes)
    for field in ("d", "m", "dmin", "scales", "mins"):
        a, b = getattr(params, field), getattr(params_back, field)
        if a is None:
            assert b is None
        else:
            assert torch.equal(bits(a), bits(b)) if a.is_floating_point() else torch.equal(a, b)


def test_k_quants_store_all_zero_weights_as_zero_bytes_like_llama_cpp():
    for name in K_QUANTS:
        assert not GGUF_FORMATS[name].quantize(torch.zeros(2, 512)).any()


# -- the grid -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_params_are_stored_values_and_codes_stay_in_range(name):
    fmt, W = GGUF_FORMATS[name], CASES["outliers"]
    params = fmt.choose_params(W)
    for value in (params.d, params.m, params.dmin):
        assert value is None or torch.equal(value, value.half().float())
    codes = fmt.quantize_with(W, params)
    assert codes.dtype == torch.int8 and codes.shape == W.shape
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    step, offset = fmt.grid(params)
    assert step.shape == (W.shape[0], W.shape[1] // fmt.group_size)
    assert (offset is None) == (name in ("q8_0", "q4_0", "q5_0", "q3_k", "q6_k"))


@pytest.mark.parametrize("name", ALL)
def test_quantize_with_rounds_moved_weights_to_the_nearest_grid_point(name):
    # GPTQ rounds weights it has updated on a grid chosen before: every code must be the nearest one.
    fmt, g = GGUF_FORMATS[name], torch.Generator().manual_seed(2)
    W = torch.randn(8, 512, generator=g)
    W[0, :256] = 0  # a grid of step 0
    params = fmt.choose_params(W)
    moved = W + 0.5 * torch.randn(W.shape, generator=g)
    codes = fmt.quantize_with(moved, params).to(torch.int32)
    step = fmt.grid(params)[0].abs().repeat_interleave(fmt.group_size, dim=1)

    def err(q):
        return (fmt.grid_dequant(q.clamp(fmt.qmin, fmt.qmax).to(torch.int8), params) - moved).abs()

    # Legacy types round with 1/d before its fp16 rounding (as llama.cpp does): off by |q| fp16 ulps.
    slack = step * ((codes.abs() + 1) * 2.0**-10 if name in LEGACY else 1e-5) + 1e-7
    assert (err(codes) <= err(codes + 1) + slack).all()
    assert (err(codes) <= err(codes - 1) + slack).all()
    if name in K_QUANTS:
        assert (step == 0).any() and (codes[step == 0] == fmt.qmin).all()


# -- error levels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_sqnr_on_gaussian_weights_is_llama_cpps(name):
    fmt, W = GGUF_FORMATS[name], torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    sqnr = sqnr_db(W, fmt.dequantize(fmt.quantize(W), W.shape))
    assert sqnr == pytest.approx(EXPECTED_SQNR[name], abs=0.5)


def test_k_quants_beat_legacy_types_of_as_many_or_more_bits():
    W = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    W[:, 11] *= 10
    sqnr = {name: sqnr_db(W, fmt.dequantize(fmt.quantize(W), W.shape)) for name, fmt in GGUF_FORMATS.items()}
    assert sqnr["q4_k"] > max(sqnr["q4_0"], sqnr["q4_1"])  # 4.5 bpw vs 4.5 and 5.0
    assert sqnr["q5_k"] > max(sqnr["q5_0"], sqnr["q5_1"])  # 5.5 bpw vs 5.5 and 6.0
    assert sqnr["q3_k"] < sqnr["q4_k"] < sqnr["q5_k"] < sqnr["q6_k"] < sqnr["q8_0"]
    assert sqnr["q2_k"] < sqnr["q3_k"]


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q4_0", "q4_k"])
def test_columns_not_divisible_by_the_block_size_are_a_one_line_user_error(name):
    fmt = GGUF_FORMATS[name]
    with pytest.raises(UserError) as err:
        fmt.quantize(torch.randn(4, fmt.block_size + 16))
    message = str(err.value)
    assert "\n" not in message
    assert f"(4, {fmt.block_size + 16})" in message and f"block size {fmt.block_size}" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_a_user_error(bad):
    W = torch.randn(2, 256)
    W[1, 7] = bad
    for fmt in GGUF_FORMATS.values():
        with pytest.raises(UserError, match="NaN or inf"):
            fmt.quantize(W)


def test_other_misuse_is_reported():
    fmt = GGUF_FORMATS["q4_k"]
    with pytest.raises(UserError, match="2-D"):
        fmt.quantize(torch.randn(256))
    with pytest.raises(UserError, match="overflow the fp16 scales"):
        fmt.quantize(torch.full((1, 256), 1e9))
    data = fmt.quantize(torch.randn(2, 256))
    with pytest.raises(UserError, match="576 uint8 bytes, got 288"):
        fmt.dequantize(data, (2, 512))
    with pytest.raises(UserError, match="uint8"):
        fmt.dequantize(data.to(torch.int16), (2, 256))
    with pytest.raises(ValueError, match="do not fit"):
        fmt.quantize_with(torch.randn(4, 256), fmt.choose_params(torch.randn(2, 256)))
    with pytest.raises(ValueError, match="0..15"):
        fmt.pack(torch.full((2, 256), 16, dtype=torch.int8), fmt.choose_params(torch.randn(2, 256)))
