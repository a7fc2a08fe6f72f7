"""Bad input: one line on stderr that says what is wrong and how to fix it, exit code 2, no output."""

from __future__ import annotations

import json

import pytest

from modelpress.cli import main


def _fails(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_out_of_range(tiny_llama, tmp_path, capsys, bits):
    _fails(capsys, ["compress", str(tiny_llama), "--bits", bits, "--group-size", "32", "-o", str(tmp_path / "o")],
           "bits must be an integer from 2 to 8")
    assert not (tmp_path / "o").exists()


def test_existing_output_is_never_overwritten(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["compress", str(tiny_llama), "--group-size", "32", "-o", str(out)], "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_model(tmp_path, capsys):
    _fails(capsys, ["compress", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "model not found")


def test_folder_that_is_no_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["eval", str(tmp_path / "empty"), "--text", "x.txt"], "has no config.json")


def test_unsupported_architecture(tiny_llama, tmp_path, capsys):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_llama, odd)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "bert"
    (odd / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["compress", str(odd), "-o", str(tmp_path / "o")], "not supported")
    assert not (tmp_path / "o").exists()


def test_group_size_that_does_not_divide_names_layers_and_fallbacks(tiny_llama, tmp_path, capsys):
    _fails(capsys, ["compress", str(tiny_llama), "--group-size", "128", "-o", str(tmp_path / "o")],
           "--group-fallback keep|shrink")
    assert main(["compress", str(tiny_llama), "--group-size", "128", "--group-fallback", "keep",
                 "-o", str(tmp_path / "o"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["record"]
    assert len(record["kept_unquantized"]) == 12 and record["quantized"]["layers"] == 2


def test_bad_exclude_regex_and_eval_without_text(tiny_llama, tmp_path, capsys):
    _fails(capsys, ["compress", str(tiny_llama), "--exclude", "(", "-o", str(tmp_path / "o")],
           "not a valid regular expression")
    _fails(capsys, ["compress", str(tiny_llama), "--eval", "-o", str(tmp_path / "o")], "--eval needs --text")


def test_text_file_errors(tiny_llama, tmp_path, capsys):
    _fails(capsys, ["eval", str(tiny_llama), "--text", str(tmp_path / "none.txt")], "text file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    _fails(capsys, ["eval", str(tiny_llama), "--text", str(bad)], "bad.jsonl:2")


def test_nan_weights_are_refused(tiny_llama, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    _fails(capsys, ["compress", str(broken), "--group-size", "32", "-o", str(tmp_path / "o")], "NaN")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_overflowing_activations_name_the_layer(tiny_llama, tmp_path, capsys):
    """Finite weights whose activations overflow: a clear error naming the layer, nothing written."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.post_attention_layernorm.weight"][:] = 3e38
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    calib = tmp_path / "calib.txt"
    calib.write_text("It is a truth universally acknowledged. " * 200)
    _fails(capsys, ["compress", str(broken), "--method", "gptq", "--group-size", "32", "--calib", str(calib),
                    "--calib-samples", "2", "--calib-seq-len", "32", "-o", str(tmp_path / "o")],
           "layer 2/")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_too_little_calibration_is_flagged(tiny_llama, tmp_path, caplog):
    calib = tmp_path / "calib.txt"
    calib.write_text("It is a truth universally acknowledged. " * 200)
    with caplog.at_level("WARNING", logger="modelpress"):
        assert main(["compress", str(tiny_llama), "--method", "gptq", "--group-size", "32", "--calib", str(calib),
                     "--calib-samples", "1", "--calib-seq-len", "16", "-o", str(tmp_path / "o")]) == 0
    assert "Hessian is singular" in caplog.text


def test_corrupt_shard(tiny_llama, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, ["compress", str(broken), "--group-size", "32", "-o", str(tmp_path / "o")], "corrupt")


def test_argparse_rejects_a_bad_choice(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tiny_llama), "--observer", "magic", "-o", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
