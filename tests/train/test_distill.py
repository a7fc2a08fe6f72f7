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

from conftest import austen, checkpoint_tensors, make_tiny_model
from modelpress.cli import main
from modelpress.data import WindowProtocol, read_text, token_windows
from modelpress.eval.perplexity import evaluate
from modelpress.models import loading
from modelpress.train import distill as distill_module

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


class _Interrupt:
    """Wraps ``_train_step`` to raise KeyboardInterrupt (what a kill raises) before step ``at``."""

    def __init__(self, real, at: int):
        self.real, self.at, self.calls = real, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_resume_after_an_interrupt_ends_with_the_uninterrupted_weights(tiny_llama, damaged, texts, tmp_path,
                                                                       monkeypatch, capsys):
    argv = ["distill", str(damaged), "--teacher", str(tiny_llama), "--data", str(texts["train"]), "--steps", "12",
            *FAST, "--save-every", "4", "--eval-text", str(texts["held_out"]), "--eval-every", "6"]
    assert main([*argv, "-o", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(distill_module, "_train_step", _Interrupt(distill_module._train_step, at=7))
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
    monkeypatch.setattr(distill_module, "_train_step", _Interrupt(distill_module._train_step, at=4))
    assert main(argv) == 130
    monkeypatch.undo()
    assert main([*argv, "--resume", "--lr", "1e-3"]) == 2
    assert "changed: lr" in capsys.readouterr().err
