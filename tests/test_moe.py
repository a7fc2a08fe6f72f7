"""Mixture-of-experts models through the layer-by-layer GPTQ runner: per-expert Hessians from the
routed tokens, a fallback for idle experts, and a checkpoint plain transformers loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import austen, checkpoint_tensors
from transformers import AutoModelForCausalLM

from modelpress.compress import GPTQConfig, compress
from modelpress.errors import UserError


TOP_K, N_EXPERTS, WINDOWS, TOKENS = 2, 4, 8, 65  # tiny fixtures: 4 experts, top-2; 8 windows of 64 + BOS


def _gptq(**kw) -> GPTQConfig:
    fields = dict(bits=4, group_size=32, calibration={"text": str(austen("emma.txt")), "samples": WINDOWS, "seq_len": 64, "batch_size": 4})
    return GPTQConfig(**{**fields, **kw})


def _dequantized_copy(out, source, dst):
    """A dense float checkpoint holding what ``out`` stores (unpacked codes x group scales),
    under the source's names and config: the fake-quantized reference."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import save_file

    tensors, dense = checkpoint_tensors(out), {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            shape = torch.Size(tensors[f"{module}.weight_shape"].tolist())
            q = unpack_from_int32(t, 4, shape).to(torch.float32)
            scale = tensors[f"{module}.weight_scale"].to(torch.float32)
            dense[f"{module}.weight"] = q * scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
        elif not name.endswith((".weight_scale", ".weight_shape")):
            dense[name] = t.to(torch.float32)
    dst.mkdir()
    save_file(dense, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", dst / "config.json")
    return dst


@pytest.mark.parametrize("model_type, experts", [("mixtral", "block_sparse_moe.experts"), ("qwen2_moe", "mlp.experts"),
                                                 ("qwen3_moe", "mlp.experts")])
def test_moe_checkpoint_loads_in_transformers(tiny_models, tmp_path, model_type, experts):
    path = tiny_models[model_type]
    record = compress(str(path), _gptq(), str(tmp_path / "q"))
    names = checkpoint_tensors(tmp_path / "q").keys()
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    for layer in range(2):
        router = f"model.layers.{layer}.{experts.rsplit('.', 1)[0]}.gate.weight"
        assert router in names  # the router is kept in full precision
        for e in range(N_EXPERTS):
            for proj in (("w1", "w2", "w3") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")):
                assert f"model.layers.{layer}.{experts}.{e}.{proj}.weight_packed" in names
        # every routed token reached exactly top-k experts' gate projections
        gates = [record["layers"][f"model.layers.{layer}.{experts}.{e}.{'w1' if model_type == 'mixtral' else 'gate_proj'}"]
                 for e in range(N_EXPERTS)]
        assert sum(g.get("routed_tokens", g["tokens"]) for g in gates) == WINDOWS * TOKENS * TOP_K
    if model_type == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate" in config["ignore"]
        assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(_dequantized_copy(tmp_path / "q", path, tmp_path / "ref")).eval()
    original = AutoModelForCausalLM.from_pretrained(path).eval()
    # Fixed ids: transformers keeps fused experts decompressed from compressed-tensors in float16
    # (the scales' dtype), so logits differ from the float32 reference by ~4e-5, and a token whose
    # top-k router scores nearly tie could route differently on unseeded random ids.
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, ref, orig = quantized(ids).logits, reference(ids).logits, original(ids).logits
    torch.testing.assert_close(q, ref, rtol=1e-4, atol=1e-4)
    assert (ref - orig).abs().max() > 1e-3  # the experts really are quantized


def test_idle_expert_is_quantized_with_the_all_token_fallback(tiny_models, tmp_path, monkeypatch):
    """An expert the router never picks gets GPTQ on all the layer's tokens, recorded; the others
    are calibrated on their routed tokens only."""
    from transformers.models.mixtral import modeling_mixtral

    def never_expert_3(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        logits[:, 3] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", never_expert_3)
    record = compress(str(tiny_models["mixtral"]), _gptq(), str(tmp_path / "q"))
    names = checkpoint_tensors(tmp_path / "q").keys()
    for proj in ("w1", "w2", "w3"):
        idle = record["layers"][f"model.layers.0.block_sparse_moe.experts.3.{proj}"]
        assert idle["routed_tokens"] == 0 and idle["fallback"].startswith("gptq on all")
        assert idle["tokens"] == WINDOWS * TOKENS  # the Hessian of all the layer's tokens
        assert "gptq_loss" in idle
        assert f"model.layers.0.block_sparse_moe.experts.3.{proj}.weight_packed" in names
    busy = [record["layers"][f"model.layers.0.block_sparse_moe.experts.{e}.w1"] for e in range(3)]
    assert sum(b["tokens"] for b in busy) == WINDOWS * TOKENS * TOP_K and not any("fallback" in b for b in busy)
    AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # loads


def test_expert_formats_transformers_cannot_load_are_refused(tiny_models, tmp_path):
    with pytest.raises(UserError, match="experts"):
        compress(str(tiny_models["mixtral"]), _gptq(symmetric=False), str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_unfused_experts_with_copied_weights_compute_the_same(tiny_models, model_type):
    from modelpress.models.arch import arch_for
    from modelpress.models.moe import unfuse_experts

    model = AutoModelForCausalLM.from_pretrained(tiny_models[model_type], dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        arch = arch_for(model.config)
        unfuse_experts(model, arch.layers, arch.moe, copy_weights=True)
        after = model(ids).logits
    assert any(".experts.0." in n for n, _ in model.named_modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
