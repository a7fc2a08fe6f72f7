"""Resolving model specs: clear one-line errors for everything that is not a usable model."""

import json

import pytest

from modelpress.errors import UserError
from modelpress.models import loading
from modelpress.models.arch import ARCHITECTURES, arch_for


def test_folder_gguf_and_hub_ids_resolve(tiny_llama, tmp_path):
    assert loading.resolve(tiny_llama) == loading.ModelSource("folder", str(tiny_llama))
    assert loading.resolve(tiny_llama / "config.json").kind == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert loading.resolve(gguf).kind == "gguf"
    assert loading.resolve("HuggingFaceTB/SmolLM2-135M") == loading.ModelSource("hub", "HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "not found"),
        (lambda p: p, "no config.json"),
        (lambda p: (p / "config.json").write_text("{}") and p, "no .safetensors"),
        (lambda p: ((p / "config.json").write_text("{}"), (p / "pytorch_model.bin").write_bytes(b"x")) and p, "pickle"),
        (lambda p: (p / "w.txt").write_text("x") and p / "w.txt", "not a model"),
    ],
)
def test_unusable_paths_are_one_line_user_errors(tmp_path, setup, message):
    with pytest.raises(UserError, match=message) as e:
        loading.resolve(setup(tmp_path))
    assert "\n" not in str(e.value)


def test_corrupt_config_is_a_user_error(tmp_path, tiny_llama):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        loading.load_config(loading.resolve(tmp_path))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    config = type("C", (), {"model_type": "bert"})()
    with pytest.raises(UserError, match="'bert' is not supported.*llama"):
        arch_for(config)


def test_every_table_row_names_real_modules(tiny_models):
    """Each architecture row's paths exist in a real (tiny) model of that type."""
    from modelpress.models.loading import meta_model

    for model_type, path in tiny_models.items():
        config = loading.load_config(loading.resolve(path))
        spec = ARCHITECTURES[model_type]
        model = meta_model(config)
        layer = model.get_submodule(spec.layers)[0]
        for norm, linears in spec.norm_to_linears:
            layer.get_submodule(norm)
            for name in linears:
                layer.get_submodule(name)
        if spec.moe:
            assert layer.get_submodule(spec.moe.experts).gate_up_proj.dim() == 3  # fused, as the runner expects
    assert set(tiny_models) == set(ARCHITECTURES)
