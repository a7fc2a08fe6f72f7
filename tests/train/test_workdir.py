"""What training writes: a plain checkpoint in the source's dtype, tied embeddings written once."""

import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from modelpress.train.workdir import save_weights
from tests.conftest import TINY


def test_tied_embeddings_are_written_once_and_stay_tied(tiny_tokenizer, tmp_path):
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": True}, vocab_size=len(tiny_tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_weights(model, tmp_path / "out", torch.bfloat16, tiny_tokenizer)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
