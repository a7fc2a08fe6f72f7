"""Hostile and careless input, one row per defect class: every verb that reads a broken checkpoint
refuses it with one line and exit code 2, writes nothing, and every JSON the tool prints parses
strictly. The broken checkpoints are built here from the tiny Llama."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import austen
from safetensors.torch import load_file, save_file

from modelpress.cli import main


def _fails(capsys, argv, *messages) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert all(m in err for m in messages), err
    assert "\n" not in err and "Traceback" not in err
    return err


def _broken(tiny_llama, path, *, config=None, tensors=None, drop_config=()):
    """A copy of the tiny Llama with ``config`` fields set, ``drop_config`` fields removed and its
    tensors passed through ``tensors(dict) -> dict``."""
    shutil.copytree(tiny_llama, path)
    if config or drop_config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config or {})
        for key in drop_config:
            cfg.pop(key, None)
        (path / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        state = load_file(path / "model.safetensors")
        save_file(tensors(state), path / "model.safetensors", metadata={"format": "pt"})
    return path


def _without(name):
    return lambda state: {k: v for k, v in state.items() if k != name}


def _with(name, value):
    return lambda state: {**state, name: value}


def _verbs(src, tmp_path) -> dict[str, list[str]]:
    text = str(austen("pride_and_prejudice.txt"))
    return {
        "compress rtn": ["compress", str(src), "--group-size", "32", "-o", str(tmp_path / "o")],
        "compress gptq": ["compress", str(src), "--method", "gptq", "--group-size", "32", "--calib-samples", "2",
                          "--calib-seq-len", "32", "-o", str(tmp_path / "o")],
        "prune wanda": ["prune", str(src), "--method", "wanda", "--pattern", "2:4", "--calib-samples", "2",
                        "--calib-seq-len", "32", "-o", str(tmp_path / "o")],
        "export hf": ["export", str(src), "--to", "hf", "-o", str(tmp_path / "o")],
        "export gguf": ["export", str(src), "--to", "gguf", "--format", "f16", "-o", str(tmp_path / "o.gguf")],
        "eval": ["eval", str(src), "--text", text, "--windows", "1"],
    }


DOWN = "model.layers.1.mlp.down_proj.weight"
MISMATCHES = {  # defect -> (how to break the checkpoint, words the error must hold)
    "missing tensor": (dict(tensors=_without(DOWN)), ["missing", DOWN]),
    "extra tensor": (dict(tensors=_with("model.layers.1.mlp.extra.weight", torch.zeros(4, 4))),
                     ["unexpected", "model.layers.1.mlp.extra.weight"]),
    "one layer more in config": (dict(config={"num_hidden_layers": 3}), ["missing", "model.layers.2."]),
    "one layer fewer in config": (dict(config={"num_hidden_layers": 1}), ["unexpected", "model.layers.1."]),
    "misshapen tensor": (dict(config={"intermediate_size": 96}), ["does not match", "mlp"]),
}


@pytest.mark.parametrize("defect", sorted(MISMATCHES))
@pytest.mark.parametrize("verb", ["compress rtn", "compress gptq", "prune wanda", "export hf", "export gguf", "eval"])
def test_a_checkpoint_that_does_not_match_its_config_is_refused_by_every_verb(tiny_llama, tmp_path, capsys, defect, verb):
    how, words = MISMATCHES[defect]
    src = _broken(tiny_llama, tmp_path / "bad", **how)
    _fails(capsys, _verbs(src, tmp_path)[verb], *words)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_eval_refuses_a_truncated_shard(tiny_llama, tmp_path, capsys):
    src = _broken(tiny_llama, tmp_path / "bad")
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _fails(capsys, _verbs(src, tmp_path)["eval"], "corrupt or truncated")


def test_eval_refuses_nan_weights(tiny_llama, tmp_path, capsys):
    def poison(state):
        state[DOWN] = state[DOWN].clone()
        state[DOWN][0, 0] = float("nan")
        return state

    _fails(capsys, _verbs(_broken(tiny_llama, tmp_path / "bad", tensors=poison), tmp_path)["eval"], "NaN", DOWN)


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-finite {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_an_all_zero_weight_gives_strict_json_everywhere(tiny_llama, tmp_path, capsys):
    src = _broken(tiny_llama, tmp_path / "zero", tensors=lambda s: {**s, DOWN: torch.zeros_like(s[DOWN])})
    assert main(["compress", str(src), "--group-size", "32", "-o", str(tmp_path / "o"), "--json"]) == 0
    printed = _strict(capsys.readouterr().out)
    saved = _strict((tmp_path / "o" / "modelpress.json").read_text())
    assert printed["record"]["layers"]["model.layers.1.mlp.down_proj"]["sqnr_db"] is None  # exact, not Infinity
    assert math.isfinite(saved["quantized"]["mean_sqnr_db"])


@pytest.mark.parametrize("verb", ["compress rtn", "export hf", "export gguf"])
def test_an_unwritable_output_is_one_line(tiny_llama, tmp_path, capsys, verb):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = [a.replace(str(tmp_path / "o"), str(blocker / "o")) for a in _verbs(tiny_llama, tmp_path)[verb]]
    _fails(capsys, argv, "cannot write")
    assert blocker.read_text() == "not a folder"


BAD_CONFIGS = {  # field changes -> words of the error
    "zero heads": ({"num_attention_heads": 0}, ["num_attention_heads must be a positive integer"]),
    "a string for a size": ({"hidden_size": "64"}, ["hidden_size must be a positive integer"]),
    "no layers": ({"num_hidden_layers": 0}, ["num_hidden_layers must be a positive integer"]),
    "negative layers": ({"num_hidden_layers": -2}, ["num_hidden_layers"]),
    "heads do not divide hidden": ({"hidden_size": 66}, ["not a multiple of num_attention_heads"]),
    "kv heads do not divide heads": ({"num_key_value_heads": 3}, ["not a multiple of num_key_value_heads"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("verb", ["plan", "compress rtn", "eval"])
def test_malformed_configs_are_one_line(tiny_llama, tmp_path, capsys, case, verb):
    fields, words = BAD_CONFIGS[case]
    src = _broken(tiny_llama, tmp_path / "bad", config=fields, drop_config=("head_dim",))
    argv = ["plan", str(src / "config.json"), "--json"] if verb == "plan" else _verbs(src, tmp_path)[verb]
    _fails(capsys, argv, *words)


def test_plan_refuses_remote_code_without_asking(tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "my-own", "auto_map": {"AutoConfig": "conf.MyConfig"}}))
    monkeypatch.setattr("sys.stdin", None)  # a prompt would read stdin and fail differently
    _fails(capsys, ["plan", str(config), "--json"], "trust_remote_code")


@pytest.mark.parametrize("size", ["0B", "0.0001K", "2000000T", "1e30B"])
def test_plan_refuses_impossible_sizes(capsys, size):
    _fails(capsys, ["plan", size], "give a size from 1K to 1000T")


def test_a_mistyped_local_path_is_a_local_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    _fails(capsys, ["compress", "models/smollm3", "-o", "out"], "no such file or folder in models/")


@pytest.mark.parametrize("argv", [["compress"], ["compress", "x", "-o", "y", "--bits", "four"], ["plan", "--nope"]])
def test_argparse_errors_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--help" in err


def test_group_fallback_that_leaves_nothing_says_so(tiny_llama, tmp_path, capsys):
    _fails(capsys, ["compress", str(tiny_llama), "--group-size", "48", "--group-fallback", "keep",
                    "-o", str(tmp_path / "o")], "group size 48 divides none")
