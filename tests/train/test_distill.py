"""`modelpress distill` on tiny models: it moves the student toward the teacher, resumes after an
interrupt to the same weights, runs the same on two processes as on one, and refuses bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import austen, checkpoint_tensors
from modelpress.cli import main
from modelpress.data import WindowProtocol, read_text, token_windows
from modelpress.eval.perplexity import evaluate
from modelpress.models import loading
from modelpress.train.loop import Trainer, sample_continuations

FAST = ["--seq-len", "32", "--batch-size", "2", "--eval-windows", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Short training and held-out texts (a few hundred windows of 32 tokens)."""
    root = tmp_path_factory.mktemp("texts")
    emma = austen("emma.txt").read_text(encoding="utf-8")
    (root / "train.txt").write_text(emma[:40_000])
    (root / "held_out.txt").write_text(emma[200_000:215_000])
    (root / "tiny.txt").write_text(emma[:200])
    return {p.stem: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def teacher(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama with its final norm scaled up: a random model's next-token distribution is
    nearly uniform, this one's is peaked, so a student has something to learn from it."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("teacher") / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)
    model.save_pretrained(path)
    shutil.copy(tiny_llama / "tokenizer.json", path)
    shutil.copy(tiny_llama / "tokenizer_config.json", path)
    return path


@pytest.fixture(scope="module")
def damaged(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama with noise on every weight: a student that starts away from its teacher."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("damaged") / "student"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    model.save_pretrained(path)
    shutil.copy(tiny_llama / "tokenizer.json", path)
    shutil.copy(tiny_llama / "tokenizer_config.json", path)
    return path


def _kl_to(teacher: Path, student: Path, text: Path) -> float:
    src = loading.resolve(teacher)
    ids = token_windows(loading.load_tokenizer(src), read_text(text), WindowProtocol("t", 32, 8))
    return evaluate(loading.load_model(loading.resolve(student)), ids, baseline=loading.load_model(src)).kl


def test_logit_distillation_moves_the_student_toward_the_teacher(teacher, damaged, texts, tmp_path, capsys):
    out = tmp_path / "healed"
    assert main(["distill", str(damaged), "--teacher", str(teacher), "--data", str(texts["train"]),
                 "--steps", "100", *FAST, "-o", str(out)]) == 0
    before, after = _kl_to(teacher, damaged, texts["held_out"]), _kl_to(teacher, out, texts["held_out"])
    assert after < 0.5 * before, (before, after)
    record = json.loads((out / "modelpress.json").read_text())
    assert record["steps"]["done"] == 100 and record["teacher"] == str(teacher)
    assert record["held_out"] is None  # no held-out text: the last weights are the result
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 101))
    assert {"tokens", "ce", "soft", "lr", "tokens_per_s"} <= set(steps[0])
    assert sum(e["loss"] for e in steps[-5:]) < sum(e["loss"] for e in steps[:5])
    from transformers import AutoModelForCausalLM  # plain transformers loads the result

    AutoModelForCausalLM.from_pretrained(out)
    assert not out.with_name("healed.partial").exists()


def test_cross_entropy_alone_needs_no_teacher(damaged, texts, tmp_path):
    out = tmp_path / "tuned"
    assert main(["distill", str(damaged), "--alpha", "0", "--data", str(texts["train"]), "--steps", "20", *FAST,
                 "-o", str(out)]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["ce"] < log[0]["ce"] and all(e["soft"] == 0 for e in log)


def test_best_weights_are_kept_and_training_stops_early(tiny_llama, damaged, texts, tmp_path):
    """A learning rate that ruins the model: the evaluation at step 0 stays the best, the run stops
    after `patience` worse evaluations, and the output is the starting model."""
    out = tmp_path / "o"
    assert main(["distill", str(damaged), "--teacher", str(tiny_llama), "--data", str(texts["train"]),
                 "--steps", "40", *FAST, "--lr", "0.3", "--max-grad-norm", "1000", "--eval-every", "2",
                 "--patience", "2", "--eval-text", str(texts["held_out"]), "-o", str(out)]) == 0
    record = json.loads((out / "modelpress.json").read_text())
    assert record["held_out"]["best_step"] == 0 and record["steps"]["stopped_early"]
    assert record["steps"]["done"] == 4
    source, result = checkpoint_tensors(damaged), checkpoint_tensors(out)
    assert all(torch.equal(source[k], result[k]) for k in source)


def _interrupt(real, at: int):
    """``real`` (a method), raising KeyboardInterrupt (what a kill raises) at its ``at``-th call."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper


def test_resume_after_an_interrupt_ends_with_the_uninterrupted_weights(tiny_llama, damaged, texts, tmp_path,
                                                                       monkeypatch, capsys):
    argv = ["distill", str(damaged), "--teacher", str(tiny_llama), "--data", str(texts["train"]), "--steps", "12",
            *FAST, "--save-every", "4", "--eval-text", str(texts["held_out"]), "--eval-every", "6"]
    assert main([*argv, "-o", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(Trainer, "step", _interrupt(Trainer.step, at=7))
    assert main([*argv, "-o", str(tmp_path / "cut")]) == 130
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial" / "state").is_dir()
    monkeypatch.undo()
    assert main([*argv, "-o", str(tmp_path / "cut")]) == 2  # a leftover run is never silently restarted
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume", "-o", str(tmp_path / "cut")]) == 0
    whole, cut = checkpoint_tensors(tmp_path / "whole"), checkpoint_tensors(tmp_path / "cut")
    assert all(torch.allclose(whole[k], cut[k], atol=1e-6) for k in whole)
    logs = [(tmp_path / d / "train_log.jsonl").read_text().splitlines() for d in ("whole", "cut")]
    assert [json.loads(x)["step"] for x in logs[0]] == [json.loads(x)["step"] for x in logs[1]]


def test_two_processes_give_the_weights_of_one_process_on_the_same_global_batch(tiny_llama, damaged, texts, tmp_path):
    common = [str(damaged), "--teacher", str(tiny_llama), "--data", str(texts["train"]), "--steps", "4",
              "--seq-len", "32", "--lr", "3e-3"]
    assert main(["distill", *common, "--batch-size", "4", "-o", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the launcher users run on GPUs; on a machine without one the processes form a gloo group on CPUs
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "modelpress",
              "distill", *common, "--batch-size", "2", "-o", str(tmp_path / "two")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert set(one) == set(two)
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    moved = checkpoint_tensors(damaged)
    assert any(not torch.allclose(one[k], moved[k], atol=1e-4) for k in one)  # training changed the weights


def _fails(capsys, argv, message, out: Path) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_vocabularies_that_differ_are_refused(tiny_llama, tiny_tokenizer, texts, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from conftest import _tiny_config

    bigger = tmp_path / "bigger"
    AutoModelForCausalLM.from_config(_tiny_config("llama", len(tiny_tokenizer) + 64)).save_pretrained(bigger)
    tiny_tokenizer.save_pretrained(bigger)
    out = tmp_path / "o"
    argv = ["distill", str(tiny_llama), "--teacher", str(bigger), "--data", str(texts["train"]), "--steps", "1",
            "--seq-len", "32", "-o", str(out)]
    _fails(capsys, argv, "the student has 384 tokens, the teacher 448", out)
    assert main([*argv, "--slice-teacher-vocab"]) == 0  # padding rows: sliced off when the user says so


def test_data_shorter_than_one_batch(tiny_llama, texts, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["distill", str(tiny_llama), "--alpha", "0", "--data", str(texts["tiny"]), "--steps", "1",
                    "--seq-len", "512", "-o", str(out)], "fewer than one", out)
    _fails(capsys, ["distill", str(tiny_llama), "--alpha", "0", "--data", str(texts["train"]), "--steps", "1",
                    "--seq-len", "32", "--batch-size", "4096", "-o", str(out)], "fewer than one batch of 4096", out)


def test_a_teacher_that_is_not_a_causal_lm(tiny_llama, texts, tmp_path, capsys):
    from transformers import AutoConfig

    odd = tmp_path / "vit"
    odd.mkdir()
    AutoConfig.for_model("vit").save_pretrained(odd)
    out = tmp_path / "o"
    _fails(capsys, ["distill", str(tiny_llama), "--teacher", str(odd), "--data", str(texts["train"]), "--steps",
                    "1", "-o", str(out)], str(odd), out)


def test_logit_mode_without_a_teacher(tiny_llama, texts, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["distill", str(tiny_llama), "--data", str(texts["train"]), "--steps", "1", "-o", str(out)],
           "needs --teacher", out)


def test_a_loss_that_becomes_nan_stops_with_the_step_and_keeps_the_last_good_state(tiny_llama, damaged, texts,
                                                                                   tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["distill", str(damaged), "--teacher", str(tiny_llama), "--data", str(texts["train"]),
                    "--steps", "30", *FAST, "--lr", "1e30", "--save-every", "1", "-o", str(out)],
           "the loss became NaN at step", out)


def test_resume_refuses_changed_settings(tiny_llama, damaged, texts, tmp_path, monkeypatch, capsys):
    argv = ["distill", str(damaged), "--teacher", str(tiny_llama), "--data", str(texts["train"]), "--steps", "6",
            *FAST, "--save-every", "2", "-o", str(tmp_path / "o")]
    monkeypatch.setattr(Trainer, "step", _interrupt(Trainer.step, at=4))
    assert main(argv) == 130
    monkeypatch.undo()
    assert main([*argv, "--resume", "--lr", "1e-3"]) == 2
    assert "changed: lr" in capsys.readouterr().err


def test_qat_output_is_exactly_the_model_it_trained(teacher, damaged, texts, tmp_path):
    """The held-out perplexity measured during training (fake-quantized weights) equals the
    perplexity of the written compressed-tensors checkpoint: exporting added no rounding."""
    out = tmp_path / "qat"
    assert main(["distill", str(damaged), "--teacher", str(teacher), "--data", str(texts["train"]), "--steps", "6",
                 *FAST, "--qat", "int4-g32", "--qat-scales", "learned", "--eval-text", str(texts["held_out"]),
                 "--eval-every", "3", "-o", str(out)]) == 0
    record = json.loads((out / "modelpress.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert record["qat"]["layers"] == 14 and record["held_out"]["best_step"] > 0
    ids = token_windows(loading.load_tokenizer(loading.resolve(out)), read_text(texts["held_out"]),
                        WindowProtocol("held-out-32", 32, 4))
    ppl = evaluate(loading.load_model(loading.resolve(out)), ids).ppl
    assert ppl == pytest.approx(record["held_out"]["best_ppl"], rel=1e-5)


def test_heal_trains_a_quantized_checkpoint_in_its_own_format_from_its_stored_scales(teacher, damaged, texts,
                                                                                     tmp_path):
    """Step 0's held-out perplexity is the compressed input's own (training starts exactly at it),
    and the output is a compressed-tensors checkpoint in the same format whose perplexity is the
    best one measured while training."""
    quantized = tmp_path / "int4"
    assert main(["compress", str(damaged), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--no-quality-guard", "-o", str(quantized)]) == 0
    out = tmp_path / "healed"
    assert main(["heal", str(quantized), "--teacher", str(teacher), "--data", str(texts["train"]), "--steps", "6",
                 *FAST, "--eval-text", str(texts["held_out"]), "--eval-every", "3", "-o", str(out)]) == 0
    record = json.loads((out / "modelpress.json").read_text())
    assert record["qat"]["start"] == "stored" and record["qat"]["formats"] == ["int4-g32"]
    ids = token_windows(loading.load_tokenizer(loading.resolve(out)), read_text(texts["held_out"]),
                        WindowProtocol("held-out-32", 32, 4))
    start_ppl = evaluate(loading.load_model(loading.resolve(quantized)), ids).ppl
    assert record["held_out"]["start_ppl"] == pytest.approx(start_ppl, rel=1e-5)
    assert evaluate(loading.load_model(loading.resolve(out)), ids).ppl == pytest.approx(
        record["held_out"]["best_ppl"], rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32


def test_heal_keeps_the_zeros_of_a_pruned_model_through_qat(teacher, damaged, texts, tmp_path):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(damaged), "--method", "magnitude", "--pattern", "2:4", "--no-quality-guard",
                 "-o", str(pruned)]) == 0
    healed = tmp_path / "healed"
    assert main(["heal", str(pruned), "--teacher", str(teacher), "--data", str(texts["train"]), "--steps", "5",
                 *FAST, "-o", str(healed)]) == 0
    before, after = checkpoint_tensors(pruned), checkpoint_tensors(healed)
    record = json.loads((healed / "modelpress.json").read_text())
    assert len(record["kept_zeros"]) == 14
    changed = 0
    for name, w in before.items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert torch.equal(after[name][w == 0], torch.zeros_like(after[name][w == 0]))
            changed += int(not torch.equal(after[name], w))
    assert changed == 14  # the surviving weights did train
    quantized = tmp_path / "qat"  # and through QAT: zeros are on every symmetric integer grid
    assert main(["distill", str(pruned), "--teacher", str(teacher), "--data", str(texts["train"]), "--steps", "3",
                 *FAST, "--qat", "int4-g32", "-o", str(quantized)]) == 0
    weights = loading.load_model(loading.resolve(quantized), dequantize=True).state_dict()
    for name, w in before.items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert (weights[name][w == 0] == 0).all()


def test_healing_a_pruned_then_quantized_checkpoint_holds_its_zero_codes(teacher, damaged, texts, tmp_path):
    """GPTQ on a pruned model keeps its zeros; QAT from that checkpoint holds every zero code (the
    file cannot tell a pruned weight from one that rounded to zero), so the 2:4 pattern survives."""
    pruned, quantized, healed = tmp_path / "pruned", tmp_path / "int4", tmp_path / "healed"
    assert main(["prune", str(damaged), "--method", "magnitude", "--pattern", "2:4", "--no-quality-guard",
                 "-o", str(pruned)]) == 0
    assert main(["compress", str(pruned), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
                 str(texts["train"]), "--calib-samples", "8", "--calib-seq-len", "32", "--no-quality-guard",
                 "-o", str(quantized)]) == 0
    assert main(["heal", str(quantized), "--teacher", str(teacher), "--data", str(texts["train"]), "--steps", "6",
                 *FAST, "-o", str(healed)]) == 0
    record = json.loads((healed / "modelpress.json").read_text())
    assert record["qat"]["start"] == "stored" and len(record["kept_zeros"]) == 14
    start = loading.load_model(loading.resolve(quantized), dequantize=True).state_dict()
    after = loading.load_model(loading.resolve(healed), dequantize=True).state_dict()
    changed = 0
    for name, w in start.items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert (after[name][w == 0] == 0).all()
            groups = (after[name] == 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert (groups >= 2).all()  # 2:4 in the written codes
            changed += int(not torch.equal(after[name], w))
    assert changed > 0  # the other codes did train


def test_on_policy_distillation_is_deterministic_given_the_seed_and_moves_toward_the_teacher(teacher, damaged,
                                                                                            texts, tmp_path):
    argv = ["distill", str(damaged), "--teacher", str(teacher), "--mode", "on-policy", "--beta", "0.5",
            "--lmbda", "0.5", "--data", str(texts["train"]), "--steps", "30", *FAST]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    assert main([*argv, "-o", str(tmp_path / "b")]) == 0
    a, b = checkpoint_tensors(tmp_path / "a"), checkpoint_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples, the same steps
    assert main([*argv, "--seed", "1", "-o", str(tmp_path / "c")]) == 0
    c = checkpoint_tensors(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed, other samples: the test can fail
    before, after = _kl_to(teacher, damaged, texts["held_out"]), _kl_to(teacher, tmp_path / "a", texts["held_out"])
    assert after < 0.8 * before, (before, after)


def test_on_policy_samples_continue_the_prompt(tiny_llama, texts):
    from modelpress.train.distill import DistillConfig

    config = DistillConfig(mode="on-policy", steps=1, seq_len=32, seed=3)
    model = loading.load_model(loading.resolve(tiny_llama))
    windows = token_windows(loading.load_tokenizer(loading.resolve(tiny_llama)), read_text(texts["train"]),
                            WindowProtocol("t", 32, 2))
    out = sample_continuations(model, windows, config, m=0, rank=0)
    assert out.shape == windows.shape
    assert torch.equal(out[:, :config.prompt_len], windows[:, :config.prompt_len])
    assert not torch.equal(out, windows)
    assert torch.equal(out, sample_continuations(model, windows, config, m=0, rank=0))
    assert not torch.equal(out, sample_continuations(model, windows, config, m=1, rank=0))


def test_sequence_distillation_across_tokenizers_trains_on_the_teachers_text(teacher, texts, tmp_path):
    """A student with its own, smaller tokenizer learns from the teacher's generated text; the
    corpus is deterministic given the seed and kept in the output."""
    from conftest import make_tiny_model, train_tokenizer

    student = make_tiny_model(tmp_path / "student", "llama", train_tokenizer(320), seed=9)
    argv = ["distill", str(student), "--teacher", str(teacher), "--mode", "sequence", "--data", str(texts["train"]),
            "--steps", "20", *FAST]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    corpus = (tmp_path / "a" / "teacher_corpus.jsonl").read_text().splitlines()
    assert len(corpus) == 40  # 20 steps x batch 2
    assert main([*argv, "--steps", "2", "-o", str(tmp_path / "b")]) == 0  # the same seed: the same first texts
    assert (tmp_path / "b" / "teacher_corpus.jsonl").read_text().splitlines() == corpus[:4]
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert sum(e["ce"] for e in log[-5:]) < sum(e["ce"] for e in log[:5])
    record = json.loads((tmp_path / "a" / "modelpress.json").read_text())
    assert record["config"]["mode"] == "sequence"


def test_qat_to_gguf_writes_exactly_the_weights_it_trained(damaged, texts, tmp_path):
    """q4_k_m on a tiny model (k-quants fall back to q5_0 on 64-wide rows, as llama.cpp does):
    the GGUF's decoded weights give the held-out perplexity measured while training, and
    llama.cpp runs the file to within its own int8-activation rounding."""
    import math

    from conftest import llama_cpp_logits

    out = tmp_path / "qat"
    assert main(["distill", str(damaged), "--alpha", "0", "--data", str(texts["train"]), "--steps", "4",
                 *FAST, "--qat", "q4_k_m", "--eval-text", str(texts["held_out"]), "--eval-every", "2",
                 "-o", str(out)]) == 0
    record = json.loads((out / "modelpress.json").read_text())
    assert record["qat"]["file_type"] == "q4_k_m" and record["qat"]["layers"] == 16  # 14 Linears, output, embeddings
    assert record["held_out"]["best_step"] > 0
    gguf = out / "model.gguf"
    ids = token_windows(loading.load_tokenizer(loading.resolve(damaged)), read_text(texts["held_out"]),
                        WindowProtocol("held-out-32", 32, 4))
    decoded = loading.load_model(loading.resolve(gguf))  # transformers decodes the blocks as gguf-py does
    assert evaluate(decoded, ids).ppl == pytest.approx(record["held_out"]["best_ppl"], rel=1e-5)
    nll = 0.0
    for window in ids:
        logits = torch.from_numpy(llama_cpp_logits(gguf, window.tolist()))
        nll -= torch.log_softmax(logits[:-1], -1).gather(1, window[1:, None]).sum().item()
    assert math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1))) == pytest.approx(record["held_out"]["best_ppl"],
                                                                                rel=1e-2)


def test_qat_to_gguf_with_tied_embeddings(tiny_models, texts, tmp_path):
    """Gemma ties its output to the embeddings: both see the one quantized token_embd, as in llama.cpp."""
    out = tmp_path / "qat"
    student = tiny_models["gemma3_text"]
    assert main(["distill", str(student), "--alpha", "0", "--data", str(texts["train"]), "--steps", "4", *FAST,
                 "--qat", "q8_0", "--eval-text", str(texts["held_out"]), "--eval-every", "2", "-o", str(out)]) == 0
    record = json.loads((out / "modelpress.json").read_text())
    assert record["qat"]["layers"] == 15 and record["held_out"]["best_step"] > 0  # 14 Linears + token_embd
    ids = token_windows(loading.load_tokenizer(loading.resolve(student)), read_text(texts["held_out"]),
                        WindowProtocol("held-out-32", 32, 4))
    # the GGUF's decoded weights in the student's own config (transformers' GGUF config for Gemma 3
    # does not carry every field of a tiny test config, e.g. query_pre_attn_scalar)
    decoded = loading.load_model(loading.resolve(out / "model.gguf")).state_dict()
    model = loading.load_model(loading.resolve(student))
    model.load_state_dict(decoded)
    assert evaluate(model, ids).ppl == pytest.approx(record["held_out"]["best_ppl"], rel=1e-5)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_launch_modes_are_refused_in_one_line(kind):
    from modelpress.errors import UserError
    from modelpress.train.distill import _check_sharding

    with pytest.raises(UserError, match=f"{kind} sharding is not supported yet"):
        _check_sharding(kind)
    _check_sharding("MULTI_GPU")  # data parallel runs
    _check_sharding("MULTI_CPU")


def test_heal_of_a_gguf_file_trains_in_its_own_types_from_its_stored_codes(teacher, damaged, texts, tmp_path):
    """A GGUF student (q4_k_m: q5_0/q6_k/q8_0 blocks on a tiny model's rows) starts exactly at the
    file (its codes and block params re-encode to the file's bytes) and is written back as a GGUF
    with every tensor in the type it came in."""
    from gguf import GGUFReader

    from modelpress.export.gguf import _permute_rope, export_gguf, layout_of_file, read_gguf_params
    from modelpress.train import qat

    student = tmp_path / "student.gguf"
    export_gguf(str(damaged), str(student), "q4_k_m")
    model = loading.load_model(loading.resolve(student))
    layout = layout_of_file(student, model.config)
    fakes = qat.attach_gguf(model, layout, start=read_gguf_params(student, layout))
    assert len(fakes) == 16 and {f.fmt.name for f in fakes.values()} >= {"q5_0", "q8_0"}
    in_file = {t.name: torch.from_numpy(t.data.copy()) for t in GGUFReader(student).tensors}
    checked = [e for e in layout.entries if e.name.removesuffix(".weight") in fakes]
    assert len(checked) == len(fakes)
    for e in checked:  # the starting weights encode to the file's bytes, RoPE rows in the file's order
        name = e.name.removesuffix(".weight")
        stored = fakes[name].stored(qat.original_weight(model.get_submodule(name)))
        heads = layout._rope_heads(e.name)
        stored = _permute_rope(stored, heads) if heads else stored
        assert torch.equal(stored, in_file[e.gguf_name].reshape(stored.shape)), name

    out = tmp_path / "healed"
    assert main(["heal", str(student), "--teacher", str(teacher), "--data", str(texts["train"]), "--steps", "10",
                 *FAST, "-o", str(out)]) == 0
    record = json.loads((out / "modelpress.json").read_text())
    assert record["qat"]["start"] == "stored" and record["qat"]["file_type"] == "q4_k_m"
    types = lambda f: {t.name: t.tensor_type for t in GGUFReader(f).tensors}  # noqa: E731
    assert types(out / "model.gguf") == types(student)
    # trained toward the teacher, in the file's own grid
    before, after = _kl_to(teacher, student, texts["held_out"]), _kl_to(teacher, out / "model.gguf", texts["held_out"])
    assert after < 0.95 * before, (before, after)


def test_precomputed_top_k_teacher_logits_train_without_the_teacher(teacher, damaged, texts, tmp_path, monkeypatch):
    """--teacher-topk: the teacher scores the windows once and is let go. With k the whole
    vocabulary the loss is dense logit KD's; at k = 64 of 384 it heals nearly as far."""
    from transformers import AutoModelForCausalLM

    from modelpress.train import loop

    common = ["distill", str(damaged), "--teacher", str(teacher), "--data", str(texts["train"]), *FAST,
              "--temperature", "2"]
    assert main([*common, "--steps", "60", "-o", str(tmp_path / "dense")]) == 0
    vocab = AutoModelForCausalLM.from_pretrained(teacher).config.vocab_size
    seen = []
    original_step = loop.Trainer.step

    def step(self, i):  # the loop runs with rows, never the teacher
        seen.append((self.teacher is None, self.teacher_topk is not None))
        return original_step(self, i)

    monkeypatch.setattr(loop.Trainer, "step", step)
    assert main([*common, "--steps", "2", "--teacher-topk", str(vocab), "-o", str(tmp_path / "full")]) == 0
    assert set(seen) == {(True, True)}

    def first_step(out):  # the same weights and batch: the same loss, to float summation order
        return next(e for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in e)

    dense, full = first_step(tmp_path / "dense"), first_step(tmp_path / "full")
    assert full["soft"] == pytest.approx(dense["soft"], rel=1e-5) and full["ce"] == pytest.approx(dense["ce"], rel=1e-6)
    record = json.loads((tmp_path / "full" / "modelpress.json").read_text())
    assert record["teacher_topk"]["k"] == vocab and record["teacher_topk"]["bytes"] > 0
    # only the windows the 2 steps visit (batch 2) were scored, not the whole text
    assert record["teacher_topk"]["windows"] == 4 < record["data"]["windows"]
    out = tmp_path / "k64"
    assert main([*common, "--steps", "60", "--teacher-topk", "64", "-o", str(out)]) == 0
    before = _kl_to(teacher, damaged, texts["held_out"])
    after, after_dense = _kl_to(teacher, out, texts["held_out"]), _kl_to(teacher, tmp_path / "dense", texts["held_out"])
    assert after < 0.6 * before and after < 1.25 * after_dense, (before, after, after_dense)


def test_top_k_teacher_logits_are_refused_where_they_cannot_serve(damaged, teacher, texts, tmp_path, capsys):
    assert main(["distill", str(damaged), "--alpha", "0", "--teacher-topk", "8", "--data", str(texts["train"]),
                 "--steps", "2", *FAST, "-o", str(tmp_path / "a")]) == 2
    assert "teacher_topk keeps the teacher's logits" in capsys.readouterr().err
    assert main(["distill", str(damaged), "--teacher", str(teacher), "--teacher-topk", "100000", "--data",
                 str(texts["train"]), "--steps", "2", *FAST, "-o", str(tmp_path / "b")]) == 2
    assert "more than the vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
