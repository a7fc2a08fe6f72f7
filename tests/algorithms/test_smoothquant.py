"""SmoothQuant: smoothing is exact in float, and it is what makes W8A8 work on outlier channels."""

from __future__ import annotations

import pytest
from conftest import austen
import torch
from transformers import AutoModelForCausalLM

from modelpress.algorithms.hessian import HessianCollector
from modelpress.algorithms.smoothquant import smoothing_scales, static_input_absmax
from modelpress.compress import CalibrationConfig, RTNConfig, SmoothQuantConfig, compress
from modelpress.errors import UserError
from modelpress.eval.fake_quant import activation_fake_quant, checkpoint_input_quant
from modelpress.formats.activations import ActFormat
from modelpress.formats.integer import parse_int_format
from modelpress.pipeline.scale_stages import SmoothQuantStage
from modelpress.models.arch import arch_for

def _calib():
    return CalibrationConfig(text=str(austen("emma.txt")), samples=8, seq_len=64, batch_size=4)

INT8 = parse_int_format("int8-channel")


def _outlier_inputs(n=512, d=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, torch.randperm(d, generator=g)[:4]] *= 60  # a few channels 60x larger, as in LLMs (Fig. 4)
    return X


def _w8a8_error(X, W, s=None) -> float:
    """Relative output error of int8 per-token inputs times int8 per-channel weights."""
    s = torch.ones(X.shape[1]) if s is None else s
    Y = X @ W.T
    Y_hat = ActFormat(dynamic=True).fake_quantize(X / s) @ INT8.fake_quantize(W * s).T
    return ((Y_hat - Y).pow(2).sum() / Y.pow(2).sum()).item()


def test_eq4_and_its_exact_identity():
    X, W = _outlier_inputs(), torch.randn(64, 128)
    sm = smoothing_scales(X.abs().amax(0), [W, torch.randn(32, 128)], alpha=0.5)
    torch.testing.assert_close((X / sm.s) @ (W * sm.s).T, X @ W.T, rtol=1e-4, atol=1e-3)
    assert sm.act_outlier_ratio_after < sm.act_outlier_ratio_before / 3
    # alpha = 1 moves all of max|X| into the weights: the smoothed input is flat
    flat = smoothing_scales(X.abs().amax(0), [W], alpha=1.0)
    torch.testing.assert_close((X / flat.s).abs().amax(0), torch.ones(128), rtol=1e-5, atol=1e-5)
    assert static_input_absmax(X.abs().amax(0), flat.s) == pytest.approx(1.0, rel=1e-5)
    # alpha = 0 moves nothing from X but divides by max|W_j|: the weights' columns become flat
    none = smoothing_scales(X.abs().amax(0), [W], alpha=0.0)
    torch.testing.assert_close((W * none.s).abs().amax(0), torch.ones(128), rtol=1e-5, atol=1e-5)


def test_smoothing_beats_plain_w8a8_on_outlier_channels():
    X, W = _outlier_inputs(), torch.randn(64, 128)
    plain = _w8a8_error(X, W)
    smoothed = _w8a8_error(X, W, smoothing_scales(X.abs().amax(0), [W], alpha=0.5).s)
    assert smoothed < 0.25 * plain, (smoothed, plain)
    # and on inputs without outliers it costs little: no free lunch claimed, no harm done either
    X0 = torch.randn(512, 128)
    assert _w8a8_error(X0, W, smoothing_scales(X0.abs().amax(0), [W]).s) < 2 * _w8a8_error(X0, W)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "opt", "phi3"])
def test_stage_smoothing_leaves_the_model_unchanged(tiny_models, model_type):
    """Calibrate, smooth every layer with the stage itself, compare logits: exact before rounding."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[model_type], dtype=torch.float32).eval()
    arch = arch_for(model.config)
    ids = torch.randint(3, 300, (2, 40))
    with torch.no_grad():
        for norm, _ in arch.norm_to_linears:  # spiky norm outputs, so that s is far from 1
            for layer in model.get_submodule(arch.layers):
                layer.get_submodule(norm).weight.data[:3] += 20
        before = model(ids).logits
    stage = SmoothQuantStage(SmoothQuantConfig(alpha=0.5), arch)
    layers = model.get_submodule(arch.layers)
    collectors = []
    for i, layer in enumerate(layers):
        modules = {f"{arch.layers}.{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        collectors.append((layer, f"{arch.layers}.{i}.", modules, HessianCollector(modules, owner=layer).__enter__()))
    with torch.no_grad():
        model(ids)
    spread = []
    for layer, prefix, modules, hc in collectors:
        hc.__exit__(None, None, None)
        smoothing = stage.smooth(layer, prefix, modules, hc)
        assert len({id(sm) for sm in smoothing.values()}) == len(arch.scale_pairs(layer))  # one s per group
        fed_by_norms = {prefix + c for _, cs in arch.norm_to_linears for c in cs}
        spread += [(sm.s.max() / sm.s.min()).item() for name, sm in smoothing.items() if name in fed_by_norms]
    assert min(spread) > 3  # the test is not vacuous: the scales after the spiky norms differ a lot
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def _with_outlier_channels(src, dst):
    """A copy of the tiny llama whose norms put 4 channels at ~40x: LLM-like activation outliers."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:4]] *= 40
    model.save_pretrained(dst)
    return dst


def _w8a8_logit_error(src, out, ids) -> float:
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad(), activation_fake_quant(q, checkpoint_input_quant(q)):
        a, b = q(ids).logits, ref(ids).logits
    return ((a - b).pow(2).sum() / b.pow(2).sum()).item()


def test_smoothquant_checkpoint_beats_plain_w8a8_with_outliers(tiny_models, tiny_tokenizer, tmp_path):
    src = _with_outlier_channels(tiny_models["llama"], tmp_path / "spiky")
    tiny_tokenizer.save_pretrained(src)
    compress(str(src), SmoothQuantConfig(calibration=_calib()), str(tmp_path / "sq"))
    compress(str(src), RTNConfig(bits=8, granularity="channel", group_size=None, activations="dynamic"),
             str(tmp_path / "w8a8"))
    text = austen("mansfield_park.txt").read_text()[:4000]
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids[:, :200]
    sq, plain = _w8a8_logit_error(src, tmp_path / "sq", ids), _w8a8_logit_error(src, tmp_path / "w8a8", ids)
    assert sq < 0.5 * plain, (sq, plain)  # measured: about 0.25


def test_nan_in_calibration_activations_is_a_user_error(tiny_models, tmp_path):
    class NaNStats:  # a collector that saw NaN in q_proj's input
        def abs_max(self, name):
            return torch.full((64,), float("nan"))

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    layer, arch = model.model.layers[0], arch_for(model.config)
    modules = {f"model.layers.0.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj.*NaN or inf"):
        SmoothQuantStage(SmoothQuantConfig(), arch).smooth(layer, "model.layers.0.", modules, NaNStats())


def test_overflowing_calibration_stops_the_run_without_output(tiny_models, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[5] = 3e38  # finite, but x * w overflows to inf
    model.save_pretrained(tmp_path / "bad")
    tiny_tokenizer.save_pretrained(tmp_path / "bad")
    out = tmp_path / "o"
    with pytest.raises(UserError, match="NaN or inf"):
        compress(str(tmp_path / "bad"), SmoothQuantConfig(calibration=_calib()), str(out))
    assert not out.exists()


def test_static_scales_warn_about_massive_activations(tiny_models, tiny_tokenizer, tmp_path, caplog):
    """A 500x input channel: smoothed away at down_proj (folded into up_proj's rows); at o_proj,
    which has nothing to fold into, one static scale is useless and the run says so."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[7] *= 500  # channel 7 of layer 1's down_proj input
        model.model.layers[1].self_attn.v_proj.weight[7] *= 500  # channel 7 of layer 1's o_proj input
    model.save_pretrained(tmp_path / "massive")
    tiny_tokenizer.save_pretrained(tmp_path / "massive")
    with caplog.at_level("WARNING", logger="modelpress"):
        record = compress(str(tmp_path / "massive"), SmoothQuantConfig(activations="static", calibration=_calib()),
                          str(tmp_path / "o"))
    warned = [r.getMessage() for r in caplog.records if "static int8 scale" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("model.layers.1.self_attn.o_proj"), warned
    assert record["layers"]["model.layers.1.self_attn.o_proj"]["input_range_ratio"] > 100
    down = record["layers"]["model.layers.1.mlp.down_proj"]
    assert down["sq_outlier_ratio_before"] > 100 and down["input_range_ratio"] < 32, down
