"""IntFormat: codes in range, exact dequantization, error ordering by granularity and bits."""

import pytest
import torch

from modelpress.errors import UserError
from modelpress.formats import IntFormat, parse_int_format


def rel_err(W, fmt):
    return ((fmt.fake_quantize(W) - W).pow(2).sum() / W.pow(2).sum()).item()


@pytest.fixture
def W():
    torch.manual_seed(0)
    W = torch.randn(96, 256)
    W[:, 7] *= 20  # an outlier column, as real LLM weights have
    return W


@pytest.mark.parametrize("spec", ["int2-g32", "int3-g64-asym", "int4-g128", "int4-channel", "int8-tensor", "int5-g32-asym"])
def test_codes_are_b_bit_and_dequantize_is_exact(W, spec):
    fmt = parse_int_format(spec)
    qt = fmt.quantize(W)
    assert qt.q.dtype == torch.int8 and qt.q.shape == W.shape
    assert qt.q.min() >= fmt.qmin and qt.q.max() <= fmt.qmax
    rows = 1 if fmt.granularity == "tensor" else W.shape[0]
    groups = W.shape[1] // fmt.group_size if fmt.granularity == "group" else 1
    assert qt.scale.shape == (rows, groups)
    assert (qt.zero_point is None) == fmt.symmetric
    # Scales are exactly representable in the storage dtype.
    assert torch.equal(qt.scale, qt.scale.half().float())
    # dequantize == (q - z) * s computed by hand, group by group.
    g = fmt.group_size_for(W.shape[1]) if fmt.granularity != "tensor" else W.numel()
    q = qt.q.float().reshape(rows, groups, -1)
    z = 0 if qt.zero_point is None else qt.zero_point.float()[..., None]
    ref = ((q - z) * qt.scale[..., None]).reshape(W.shape)
    assert torch.equal(qt.dequantize(), ref)
    assert g > 0


def test_error_shrinks_with_bits_and_finer_groups(W):
    errs = [rel_err(W, IntFormat(bits=b, granularity="group", group_size=64)) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    tensor = rel_err(W, IntFormat(bits=4, granularity="tensor", group_size=None))
    channel = rel_err(W, IntFormat(bits=4, granularity="channel", group_size=None))
    group = rel_err(W, IntFormat(bits=4, granularity="group", group_size=32))
    assert group < channel < tensor


def test_int8_sqnr_above_40db():
    W = torch.randn(96, 256)
    err = rel_err(W, IntFormat(bits=8, granularity="channel", group_size=None))
    assert -10 * torch.log10(torch.tensor(err)) > 40


def test_asymmetric_beats_symmetric_on_shifted_weights():
    torch.manual_seed(1)
    W = torch.rand(64, 128)  # all positive: a symmetric grid wastes half its levels
    sym = rel_err(W, IntFormat(bits=4, group_size=32))
    asym = rel_err(W, IntFormat(bits=4, group_size=32, symmetric=False))
    assert asym < 0.5 * sym


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_clipping_observers_beat_minmax_on_heavy_tails(observer):
    torch.manual_seed(2)
    W = torch.distributions.Laplace(0.0, 1.0).sample((64, 1024))  # heavy tails: clipping pays
    base = rel_err(W, IntFormat(bits=3, granularity="channel", group_size=None))
    clipped = rel_err(W, IntFormat(bits=3, granularity="channel", group_size=None, observer=observer))
    assert clipped < 0.8 * base


def test_bits_per_weight_counts_scales_and_zero_points():
    assert IntFormat(bits=4, group_size=128).bits_per_weight() == 4.125
    assert IntFormat(bits=4, group_size=128, symmetric=False).bits_per_weight() == 4 + 24 / 128
    assert IntFormat(bits=8, granularity="channel", group_size=None).bits_per_weight(in_features=4096) == 8 + 16 / 4096
    fmt = IntFormat(bits=3, group_size=64)
    qt = fmt.quantize(torch.randn(128, 256))
    assert qt.nbytes == (128 * 256 * 3 + 128 * 4 * 16) // 8


@pytest.mark.parametrize(
    "kwargs",
    [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(group_size=0), dict(granularity="channel"),
     dict(observer="max"), dict(scale_dtype="int8"), dict(granularity="row", group_size=None)],
)
def test_bad_formats_are_user_errors(kwargs):
    with pytest.raises(UserError):
        IntFormat(**kwargs)


def test_non_finite_weights_and_bad_groups_are_user_errors():
    W = torch.randn(8, 64)
    W[3, 5] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        IntFormat(bits=4, group_size=32).quantize(W)
    with pytest.raises(UserError, match="does not divide"):
        IntFormat(bits=4, group_size=48).quantize(torch.randn(8, 64))


def test_parse_round_trips_names():
    for spec in ["int4-g128", "int8-channel", "int2-tensor-asym", "int3-g64-asym"]:
        assert parse_int_format(spec).name == spec
    with pytest.raises(UserError):
        parse_int_format("fp4")


def test_zero_weights_do_not_divide_by_zero():
    qt = IntFormat(bits=4, group_size=32).quantize(torch.zeros(4, 64))
    assert torch.equal(qt.dequantize(), torch.zeros(4, 64))


@pytest.mark.parametrize("rule", ["exact-negative", "full"])
def test_symmetric_group_uses_all_16_codes_and_keeps_every_error_within_half_a_step(rule):
    W = torch.linspace(-1.0, 0.9, 64).reshape(1, 64)  # negative extreme: it takes the code -8
    qt = IntFormat(bits=4, group_size=64, symmetric_range=rule).quantize(W)
    assert sorted(qt.q.unique().tolist()) == list(range(-8, 8))
    step = qt.scale.item()
    assert (qt.dequantize() - W).abs().max() <= step / 2 * (1 + 16 * 2**-11)  # fp16 rounding of the scale
    restricted = IntFormat(bits=4, group_size=64, symmetric_range="restricted").quantize(W)
    assert restricted.q.min() == -7 and restricted.scale.item() > 1.1 * step  # max|w| / 7 against / 8 or / 8.5


def test_the_default_rule_is_exact_negative():
    assert IntFormat().symmetric_range == "exact-negative" == parse_int_format("int4-g128").symmetric_range


@pytest.mark.parametrize("bits", [3, 4])
def test_exact_negative_puts_a_negative_extreme_on_the_lowest_code(bits):
    W = torch.linspace(-1.0, 0.8, 64).reshape(1, 64)
    full, exact = (IntFormat(bits=bits, group_size=64, symmetric_range=r).quantize(W) for r in ("full", "exact-negative"))
    assert exact.dequantize()[0, 0].item() == -1.0 and exact.q.min() == -(2 ** (bits - 1))
    assert full.dequantize()[0, 0].item() > -0.97  # the full rule's finer step clips it by up to half a step
    assert (exact.dequantize() - W).abs().max() <= exact.scale.item() / 2 * (1 + 16 * 2**-11)
    W = torch.linspace(-0.5, 1.0, 64).reshape(1, 64)  # a positive extreme: both rules agree
    full, exact = (IntFormat(bits=bits, group_size=64, symmetric_range=r).quantize(W) for r in ("full", "exact-negative"))
    assert torch.equal(full.q, exact.q) and torch.equal(full.scale, exact.scale)


@pytest.mark.parametrize("bits", [3, 4])
def test_full_range_is_never_coarser_and_has_lower_error_than_the_restricted_rule(bits):
    torch.manual_seed(0)
    W = torch.randn(256, 512)
    restricted = IntFormat(bits=bits, group_size=64, symmetric_range="restricted")
    for rule in ("exact-negative", "full"):
        fmt = IntFormat(bits=bits, group_size=64, symmetric_range=rule)
        assert (fmt.quantize(W).scale <= restricted.quantize(W).scale).all()
        assert rel_err(W, fmt) < 0.9 * rel_err(W, restricted)


def test_restricted_rule_is_a_named_spec():
    fmt = parse_int_format("int4-g128-restricted")
    assert fmt.symmetric_range == "restricted" and parse_int_format(fmt.name) == fmt
    full = parse_int_format("int4-g128-full")
    assert full.symmetric_range == "full" and full.name == "int4-g128-full" and parse_int_format(full.name) == full
    exact = parse_int_format("int3-g64-exact-negative")  # the default: its name needs no suffix
    assert exact.symmetric_range == "exact-negative" and exact.name == "int3-g64" and parse_int_format("int3-g64") == exact
    with pytest.raises(UserError):
        parse_int_format("int4-g128-asym-restricted")  # the rule is for symmetric formats
