"""Sensitivity: the Hessian's output error equals the error measured on the real activations."""

from __future__ import annotations

import pytest
import torch
from conftest import austen, checkpoint_tensors
from transformers import AutoModelForCausalLM

from modelpress.compress import RTNConfig, compress
from modelpress.fit.sensitivity import KEEP, Sensitivity, measure_embeddings, measure_sensitivity
from modelpress.formats.floats import parse_format
from modelpress.models import loading
from modelpress.pipeline.recipe import CalibrationConfig, GPTQConfig
from modelpress.pipeline.runner import calibration_ids

CANDIDATES = ["int8", "int4-g32", "int3-g64", "int2-g32", "fp8", KEEP]


@pytest.fixture(scope="module")
def calib():
    return CalibrationConfig(text=str(austen("emma.txt")), samples=6, seq_len=48, batch_size=3)


def _config(calib, observer="minmax") -> GPTQConfig:
    return GPTQConfig(calibration=calib, observer=observer)


def _inputs(model_path, calib) -> dict[str, torch.Tensor]:
    """Every decoder Linear's inputs on the calibration windows, from a plain float forward."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = calibration_ids(loading.load_tokenizer(loading.resolve(str(model_path))), calib)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for batch in torch.split(ids, calib.batch_size):
            model(batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(x) for n, x in seen.items()}


def test_hessian_error_equals_the_measured_output_error(tiny_llama, calib):
    sens = measure_sensitivity(str(tiny_llama), CANDIDATES, _config(calib), method="rtn")
    X = _inputs(tiny_llama, calib)
    weights = checkpoint_tensors(tiny_llama)
    assert set(sens.linears) == set(X)  # every decoder Linear, nothing else
    for name, s in sens.linears.items():
        W = weights[name + ".weight"].to(torch.float32)
        assert s.energy == pytest.approx((X[name] @ W.T).pow(2).sum(1).mean().item(), rel=1e-4)
        for spec in CANDIDATES:
            if spec == KEEP:
                assert s.errors[spec] == 0 and s.nbytes[spec] == W.numel() * 4
                continue
            qt = parse_format(spec).quantize(W)
            measured = (X[name] @ (qt.dequantize() - W).T).pow(2).sum(1).mean().item()
            assert s.errors[spec] == pytest.approx(measured, rel=1e-3), (name, spec)
            assert s.nbytes[spec] >= qt.nbytes
    groups = sens.groups()  # q/k/v read one input, gate/up another: one group each
    assert sorted(len(g) for g in groups.values()) == [1, 1, 1, 1, 2, 2, 3, 3]


def test_fewer_bits_cost_more_error_and_gptq_beats_rtn(tiny_llama, calib):
    rtn = measure_sensitivity(str(tiny_llama), CANDIDATES, _config(calib), method="rtn")
    gptq = measure_sensitivity(str(tiny_llama), CANDIDATES, _config(calib), method="gptq")
    for name, s in gptq.linears.items():
        assert s.errors["int2-g32"] > s.errors["int3-g64"] > s.errors["int4-g32"] > s.errors["int8"] > 0
        assert s.nbytes["int2-g32"] < s.nbytes["int4-g32"] < s.nbytes["int8"] < s.nbytes[KEEP]
    for spec in ("int4-g32", "int3-g64", "int2-g32"):
        total = {m.method: sum(s.errors[spec] for s in m.linears.values()) for m in (rtn, gptq)}
        assert total["gptq"] < 0.9 * total["rtn"], spec


def test_bytes_add_up_to_the_written_checkpoint(tiny_llama, calib, tmp_path):
    """Sensitivity's byte count of a uniform choice is what compress writes, tensor bytes exactly."""
    sens = measure_sensitivity(str(tiny_llama), ["int4-g32", KEEP], _config(calib), method="rtn")
    compress(str(tiny_llama), RTNConfig(bits=4, group_size=32), str(tmp_path / "q"), quality_guard=False)
    written = sum(t.numel() * t.element_size() for t in checkpoint_tensors(tmp_path / "q").values())
    assert sens.bytes_of({n: "int4-g32" for n in sens.linears}) == written
    assert sens.bytes_of({n: KEEP for n in sens.linears}) == sum(
        t.numel() * t.element_size() for t in checkpoint_tensors(tiny_llama).values())
    sens.save(tmp_path / "s.json")
    assert Sensitivity.load(tmp_path / "s.json") == sens


def test_probes_measure_each_groups_kl_at_the_output(tiny_llama, calib):
    """Each group rounded alone: KL > 0, more for 2 bits than 3; the tail forward's KL equals a
    full forward's with that group rounded by hand."""
    import torch.nn.functional as F

    from modelpress.fit.sensitivity import group_bytes, probe_formats, probe_gains

    config = _config(calib)
    sens = probe_gains(measure_sensitivity(str(tiny_llama), ["int8", "int3-g64", "int2-g32", KEEP], config, "rtn"),
                       config, windows=2)
    groups = sens.groups()
    assert set(sens.probes) == set(groups)
    for group, names in groups.items():
        probes = sens.probes[group]
        numel = sum(sens.linears[n].numel for n in names)
        assert set(probes) == set(probe_formats(group_bytes({n: sens.linears[n] for n in names}), numel)) \
            == {"int2-g32", "int3-g64"}
        assert probes["int2-g32"]["kl"] > probes["int3-g64"]["kl"] > 0
        assert sens.gain(group, "int8") == probes["int3-g64"]["kl"] / probes["int3-g64"]["error"]
    group = "model.layers.1.self_attn.q_proj"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = calibration_ids(loading.load_tokenizer(loading.resolve(str(tiny_llama))), calib)[:2]
    with torch.no_grad():
        base = F.log_softmax(model(ids).logits, -1)
        for n in groups[group]:
            lin = model.get_submodule(n)
            lin.weight.copy_(config.spec_format("int3-g64").quantize(lin.weight).dequantize())
        logp = F.log_softmax(model(ids).logits, -1)
    kl = (base.exp() * (base - logp)).sum(-1).mean().item()
    assert sens.probes[group]["int3-g64"]["kl"] == pytest.approx(kl, rel=1e-3)


def test_probes_use_the_codes_of_the_layer_pass(tiny_llama, calib, tmp_path):
    """With a probe folder, a group is probed with the GPTQ weights the layer pass measured (their
    output error is the recorded one, below round-to-nearest's), and the KL is that of a full
    forward with those weights."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from modelpress.fit.sensitivity import probe_file, probe_gains

    config = _config(calib)
    sens = measure_sensitivity(str(tiny_llama), ["int8", "int3-g64", "int2-g32", KEEP], config, "gptq",
                               probe_dir=tmp_path / "p")
    probe_gains(sens, config, windows=2, probe_dir=tmp_path / "p")
    assert sens.probe_codes == "gptq"
    X = _inputs(tiny_llama, calib)
    weights = checkpoint_tensors(tiny_llama)
    group = "model.layers.1.self_attn.q_proj"
    names = sens.groups()[group]
    stored = load_file(probe_file(tmp_path / "p", 1))
    assert {k.split("/")[0] for k in stored} == {"int3-g64", "int2-g32"}
    for n in names:
        W = weights[n + ".weight"].to(torch.float32)
        for spec in ("int3-g64", "int2-g32"):
            Wq = stored[f"{spec}/{n}"]
            error = (X[n] @ (Wq - W).T).pow(2).sum(1).mean().item()
            rtn = (X[n] @ (parse_format(spec).quantize(W).dequantize() - W).T).pow(2).sum(1).mean().item()
            assert error == pytest.approx(sens.linears[n].errors[spec], rel=1e-3)
            assert error < rtn
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = calibration_ids(loading.load_tokenizer(loading.resolve(str(tiny_llama))), calib)[:2]
    with torch.no_grad():
        base = F.log_softmax(model(ids).logits, -1)
        for n in names:
            model.get_submodule(n).weight.copy_(stored[f"int2-g32/{n}"])
        logp = F.log_softmax(model(ids).logits, -1)
    kl = (base.exp() * (base - logp)).sum(-1).mean().item()
    assert sens.probes[group]["int2-g32"]["kl"] == pytest.approx(kl, rel=1e-3)


def test_llama_cpp_block_types_per_linear(tiny_llama, calib):
    """llama.cpp's block types as candidates, each Linear its own group (llama.cpp does not fuse
    q/k/v): round-to-nearest errors are those of llama.cpp's encoding on the real activations,
    GPTQ's are never above them, bytes are the block type's, and a type whose blocks do not
    divide a row is not offered."""
    from modelpress.formats.gguf_blocks import gguf_format

    specs = ["q8_0", "q5_0", "q4_0", "q4_k", KEEP]
    rtn = measure_sensitivity(str(tiny_llama), specs, _config(calib), "rtn", fused=False)
    gptq = measure_sensitivity(str(tiny_llama), specs, _config(calib), "gptq", fused=False)
    X = _inputs(tiny_llama, calib)
    weights = checkpoint_tensors(tiny_llama)
    assert {s.group for s in rtn.linears.values()} == set(rtn.linears)
    for name, s in rtn.linears.items():
        W = weights[name + ".weight"].to(torch.float32)
        assert "q4_k" not in s.nbytes  # rows of 64 and 128 weights: no 256-weight blocks
        for spec in ("q8_0", "q5_0", "q4_0"):
            fmt = gguf_format(spec)
            measured = (X[name] @ (fmt.dequantize(fmt.quantize(W), tuple(W.shape)) - W).T).pow(2).sum(1).mean().item()
            assert s.errors[spec] == pytest.approx(measured, rel=1e-3), (name, spec)
            assert s.nbytes[spec] == gptq.linears[name].nbytes[spec] == W.numel() // fmt.block_size * fmt.type_bytes
            assert gptq.linears[name].errors[spec] <= s.errors[spec] * (1 + 1e-5)
        assert s.errors["q4_0"] > s.errors["q5_0"] > s.errors["q8_0"] > 0
    total = {m.method: sum(s.errors["q4_0"] for s in m.linears.values()) for m in (rtn, gptq)}
    assert total["gptq"] < 0.9 * total["rtn"]


def test_embedding_and_output_head_are_priced_by_their_measured_kl(tiny_models, calib):
    """The embedding and an untied output head become choices priced by the model's KL with the
    tensor alone in each block type: that KL is what rounding the tensor in a full forward gives,
    fewer bits cost more, keep costs nothing, bytes are the type's; a tied embedding is one choice.
    The allocation then predicts exactly that KL for them (a gain of 1)."""
    import torch.nn.functional as F

    from modelpress.formats.gguf_blocks import gguf_format

    specs = ["q8_0", "q5_0", "q4_0", "q2_k", KEEP]
    for arch, entries in (("llama", {"model.embed_tokens", "lm_head"}), ("gemma3_text", {"model.embed_tokens"})):
        path = tiny_models[arch]
        sens = measure_sensitivity(str(path), specs, _config(calib), "rtn", fused=False)
        linears = set(sens.linears)
        measure_embeddings(sens, _config(calib), windows=2)
        assert set(sens.linears) - linears == entries, arch
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = calibration_ids(loading.load_tokenizer(loading.resolve(str(path))), calib)[:2]
        with torch.no_grad():
            base = F.log_softmax(model(ids).logits, -1)
            W = model.get_submodule("model.embed_tokens").weight
            saved = W.data.clone()
            W.data = gguf_format("q4_0").fake_quantize(saved)
            logp = F.log_softmax(model(ids).logits, -1)
            W.data = saved
        kl = (base.exp() * (base - logp)).sum(-1).mean().item()
        e = sens.linears["model.embed_tokens"]
        assert e.kl_measured and e.errors["q4_0"] == pytest.approx(kl, rel=1e-3), arch
        for name in entries:
            s = sens.linears[name]
            assert "q2_k" not in s.nbytes  # rows of 64 weights: no 256-weight blocks
            assert s.errors["q4_0"] > s.errors["q5_0"] > s.errors["q8_0"] > s.errors[KEEP] == 0
            assert s.nbytes["q4_0"] == s.numel // 32 * 18 and s.nbytes[KEEP] == s.numel * 4  # float32 checkpoint
        assert all(sens.gain(n, spec) == 1.0 for n in entries for spec in sens.linears[n].nbytes)


def test_experts_of_a_moe_layer_share_one_group(tiny_models, calib, tmp_path):
    """vLLM: every expert of a layer, all projections, one group (one fused kernel, one scheme);
    llama.cpp: one group per layer and projection (one 3-D tensor in the GGUF file). The probes
    run on the unfused model: each group gets a measured KL."""
    from modelpress.fit.sensitivity import probe_gains

    path = tiny_models["qwen3_moe"]
    config = _config(calib)
    sens = measure_sensitivity(str(path), ["int8", "int4-g32", KEEP], config, "rtn")
    experts = {n: s.group for n, s in sens.linears.items() if ".experts." in n}
    assert experts and all(g == n.split(".experts.")[0] + ".experts.*" for n, g in experts.items())
    assert len(set(experts.values())) == 2  # one per layer
    probe_gains(sens, config, windows=2)
    assert all(p["kl"] > 0 for g in set(experts.values()) for p in sens.probes[g].values())
    apart = measure_sensitivity(str(path), ["q8_0", KEEP], config, "rtn", fused=False)
    groups = {s.group for n, s in apart.linears.items() if ".experts." in n}
    assert groups == {f"model.layers.{i}.mlp.experts.*.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
