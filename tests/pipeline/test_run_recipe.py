"""`modelpress run`: stages in order, each in its own process, every step measured, resumable."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modelpress.data import builtin_text
from modelpress.errors import UserError
from modelpress.eval.compare import measure
from modelpress.pipeline.run import run_recipe
from modelpress.pipeline.yaml_recipe import load_recipe
from modelpress.report.inside import shown
from tests.conftest import TINY, checkpoint_tensors

PRUNE_QUANTIZE = [{"prune": {"method": "sparsegpt", "sparsity": 0.5}},
                  {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]
QUANTIZE_PRUNE = [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}},
                  {"prune": {"method": "wanda", "sparsity": 0.5}}]


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny llama with 8 layers: enough layer passes for a kill to land inside one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 8}, vocab_size=len(tiny_tokenizer), bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("deep") / "llama8"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "builtin.txt"
    path.write_text(builtin_text())
    return path


def write_recipe(path: Path, model: Path, text: Path, stages: list, **top) -> Path:
    path.write_text(yaml.safe_dump({**top,
        "model": str(model),
        "calibration": {"text": str(text), "samples": 32, "seq_len": 128, "batch_size": 8},
        "stages": stages,
        "evaluate": {"text": str(text), "windows": 2, "device": "rtx4090"},
    }))
    return path


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelpress", "run", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def compared(deep_llama, text, tmp_path_factory):
    """`modelpress run prune-first.yaml quantize-first.yaml`: the run every test here reads."""
    root = tmp_path_factory.mktemp("compared")
    a = write_recipe(root / "prune-first.yaml", deep_llama, text, PRUNE_QUANTIZE, one_pass=False)
    b = write_recipe(root / "quantize-first.yaml", deep_llama, text, [*QUANTIZE_PRUNE, {"kv-cache": {"dtype": "int8"}}])
    run = run_cli(str(a), str(b), "-o", str(root / "cmp"))
    assert run.returncode == 0, run.stderr
    return root, run.stdout


def test_the_cli_prints_the_stage_table_and_compares_recipes(compared):
    root, stdout = compared
    for needle in ("prune sparsegpt 50%", "quantize gptq int4-g32", "quantize gptq int4-g32 + prune wanda 50%",
                   "this step", "cumulative", "recipes side by side", "prune-first.yaml", "quantize-first.yaml",
                   "tok/s RTX 4090"):
        assert needle in stdout


def test_a_prune_after_a_quantize_prunes_its_codes_in_the_same_pass(compared):
    out = compared[0] / "cmp" / "quantize-first"
    folder = out / "01-quantize-gptq+02-prune-wanda"
    record = json.loads((out / "modelpress.json").read_text())
    assert [s["stages"] for s in record["steps"]] == [[1, 2], [3]] and record["output"] == str(folder)
    stage_record = json.loads((folder / "modelpress.json").read_text())
    assert stage_record["pruned"]["when"] == "after quantizing" and stage_record["pruned"]["sparsity"] == 0.5
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    from modelpress.export.compressed_tensors import read_quantized

    for name, qt in read_quantized(folder, config).items():  # still int4: half the codes are the zero code
        assert (qt.q == 0).float().mean() >= 0.5, name
        assert qt.fmt.bits == 4


def test_a_kv_cache_step_measures_the_same_files_with_the_cache_quantized(compared, deep_llama, text):
    out = compared[0] / "cmp" / "quantize-first"
    pruned, kv = json.loads((out / "modelpress.json").read_text())["steps"]
    assert kv["title"] == "kv cache int8" and kv["output"] == pruned["output"] and kv["kv_cache"] == "int8"
    assert not (out / "03-kv-cache").exists()
    again = measure(pruned["output"], str(text), 2, baseline=str(deep_llama), kv_cache="int8")
    assert kv["ppl"] == pytest.approx(again["ppl"], rel=1e-6) and kv["ppl"] != pruned["ppl"]
    assert not kv["kv_cache_how"]["carried"] and "-ctk q8_0 -ctv q8_0" in kv["kv_cache_how"]["how"]


def test_a_last_fp8_kv_cache_stage_is_carried_in_the_checkpoint(deep_llama, text, tmp_path):
    """FP8 as the last stage: the checkpoint carries calibrated scales and the kv_cache_scheme,
    and the step is measured with them."""
    from modelpress.kv_scales import SCHEME, checkpoint_kv_scales
    from modelpress.models import loading

    recipe = write_recipe(tmp_path / "kv.yaml", deep_llama, text,
                          [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}, {"kv-cache": {"dtype": "fp8"}}])
    run = run_cli(str(recipe), "-o", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr
    quantized, kv = json.loads((tmp_path / "run" / "modelpress.json").read_text())["steps"]
    folder = tmp_path / "run" / "02-kv-cache"
    assert kv["output"] == str(folder) and kv["kv_cache"] == "fp8 (the checkpoint's scales)"
    assert kv["kv_cache_how"]["carried"] and "vLLM runs it as is" in kv["kv_cache_how"]["how"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == SCHEME and config["config_groups"]
    assert len(checkpoint_kv_scales(loading.resolve(folder))) == 8
    again = measure(str(folder), str(text), 2, baseline=str(deep_llama))
    assert kv["ppl"] == pytest.approx(again["ppl"], rel=1e-6) and kv["ppl"] != quantized["ppl"]


def test_every_step_is_measured_on_its_own_checkpoint(compared, deep_llama, text):
    out = compared[0] / "cmp" / "prune-first"
    record = json.loads((out / "modelpress.json").read_text())
    pruned, quantized = out / "01-prune-sparsegpt", out / "02-quantize-gptq"
    assert [s["output"] for s in record["steps"]] == [str(pruned), str(quantized)]
    assert record["output"] == str(quantized)
    zeros = [(t == 0).float().mean().item() for n, t in checkpoint_tensors(pruned).items() if "proj" in n]
    assert min(zeros) >= 0.5  # the quantize stage read the pruned model...
    assert json.loads((quantized / "modelpress.json").read_text())["config"]["keep_zeros"] is True  # ...as pruned

    original, (p, q) = record["original"], record["steps"]
    for step, folder in ((p, pruned), (q, quantized)):  # every number is the stage's own checkpoint's
        again = measure(str(folder), str(text), 2, baseline=str(deep_llama))
        assert step["ppl"] == pytest.approx(again["ppl"], rel=1e-6)
        assert step["kl"] == pytest.approx(again["kl"], rel=1e-6) and step["kl"] > 0
        assert step["seconds"] > 0 and step["peak_rss_mb"] > 50
    assert original.get("kl") is None and original["format"] == "fp32"
    assert p["params"] == q["params"] == original["params"]
    assert q["format"] == "int4-g32" and q["size_bytes"] < 0.6 * p["size_bytes"]
    assert q["planner_bytes"] < p["planner_bytes"] and q["decode_tok_s"] > p["decode_tok_s"]
    # the planner counts the float32 embeddings the int4 checkpoint keeps: its bytes are the tensors'
    tensor_bytes = sum(t.numel() * t.element_size() for n, t in checkpoint_tensors(quantized).items()
                       if not n.endswith("weight_shape"))
    assert q["planner_bytes"] == pytest.approx(tensor_bytes, rel=0.01)


def test_a_rerun_skips_finished_stages_and_a_changed_recipe_is_refused(compared, deep_llama, text):
    root = compared[0]
    out = root / "cmp" / "prune-first"
    stamp = (out / "02-quantize-gptq" / "modelpress.json").stat().st_mtime_ns
    before = json.loads((out / "modelpress.json").read_text())
    again = run_recipe(load_recipe(root / "prune-first.yaml"), out)
    assert again["steps"] == before["steps"]
    assert (out / "02-quantize-gptq" / "modelpress.json").stat().st_mtime_ns == stamp  # not redone

    fewer = yaml.safe_load((root / "prune-first.yaml").read_text())
    fewer["evaluate"]["windows"] = 1
    (root / "fewer-windows.yaml").write_text(yaml.safe_dump(fewer))
    remeasured = run_recipe(load_recipe(root / "fewer-windows.yaml"), out)  # measured again, nothing redone
    assert [s["n_windows"] for s in remeasured["steps"]] == [1, 1] and remeasured["original"]["n_windows"] == 1
    assert (out / "02-quantize-gptq" / "modelpress.json").stat().st_mtime_ns == stamp
    assert run_recipe(load_recipe(root / "prune-first.yaml"), out)["steps"] == before["steps"]  # and back, equal

    changed = write_recipe(root / "changed.yaml", deep_llama, text,
                           [PRUNE_QUANTIZE[0], {"quantize": {"method": "gptq", "bits": 3, "group_size": 32}}],
                           one_pass=False)
    with pytest.raises(UserError, match=r"another recipe \(from stage 2 on\).*delete 02-quantize-gptq"):
        run_recipe(load_recipe(changed), out)
    fused = write_recipe(root / "fused.yaml", deep_llama, text, PRUNE_QUANTIZE)  # the same stages in one pass
    with pytest.raises(UserError, match=r"another recipe \(from stage 1 on\)"):
        run_recipe(load_recipe(fused), out)


def test_a_failing_stage_is_one_line_naming_it(deep_llama, text, tmp_path):
    # group size 48 divides no Linear of the tiny model: compress refuses it inside the stage's process
    path = write_recipe(tmp_path / "r.yaml", deep_llama, text, [{"quantize": {"method": "rtn", "bits": 4, "group_size": 48}}])
    run = run_cli(str(path), "-o", str(tmp_path / "run"))
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("modelpress run: error: stage 1 (quantize rtn int4-g48): ") and "rerun the same command" in last
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "run" / "01-quantize-rtn").exists()


def test_a_run_killed_inside_a_stage_resumes_to_the_uninterrupted_files(compared, deep_llama, text, tmp_path):
    path = write_recipe(tmp_path / "prune-first.yaml", deep_llama, text, PRUNE_QUANTIZE, one_pass=False)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", "run", str(path), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    state = out / "02-quantize-gptq.partial" / "resume-state.json"
    deadline = time.monotonic() + 300
    while not (state.is_file() and json.loads(state.read_text() or "{}").get("layers_done", 0) >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "ended" if proc.poll() is not None else "timeout"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)  # the first of 8 layers of the second stage is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not (out / "02-quantize-gptq").exists()

    resumed = run_cli(str(path), "-o", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at layer" in resumed.stderr
    whole = compared[0] / "cmp" / "prune-first"
    for stage in ("01-prune-sparsegpt", "02-quantize-gptq"):
        a, b = checkpoint_tensors(whole / stage), checkpoint_tensors(out / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ppl = [s["ppl"] for s in json.loads((out / "modelpress.json").read_text())["steps"]]
    assert ppl == [s["ppl"] for s in json.loads((whole / "modelpress.json").read_text())["steps"]]


def test_the_report_is_one_offline_page_with_the_records_numbers(compared):
    from html.parser import HTMLParser

    out = compared[0] / "cmp" / "prune-first"
    run = run_cli_report(out, compared[0] / "report.html")
    assert run.returncode == 0, run.stderr
    page = (compared[0] / "report.html").read_text()
    for fetch in ("<script", "<link", "src=", "@import"):  # nothing is fetched when it opens
        assert fetch not in page
    assert not re.search(r"""url\((?!#)|href=["'](?!#)""", page)  # only references inside the page

    class Cells(HTMLParser):
        rows, inside = [], False

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            self.inside = tag in ("td", "th")

        def handle_data(self, data):
            if self.inside and self.rows:
                self.rows[-1].append(data)

        def handle_endtag(self, tag):
            self.inside = False

    cells = Cells()
    cells.feed(page[page.index("<table id='steps'>"):page.index("</table>")])
    record = json.loads((out / "modelpress.json").read_text())
    ppl = [row[5] for row in cells.rows[1:]]
    assert ppl == [f"{m['ppl']:.3f}" for m in [record["original"], *record["steps"]]]
    charts = [c.split("'")[0] for c in page.split("data-chart='")[1:]]
    # one per-layer chart per layer pass; the roofline of the recipe's device; the weights before and after
    assert charts == ["size-ppl", "memory", "roofline", "layers", "layers", "histograms"]
    for m in [record["original"], *record["steps"]]:  # every step's greedy continuations, as recorded
        assert len(m["generations"]) == 3 and all(len(g["tokens"]) == 32 for g in m["generations"])
        for g in m["generations"]:
            assert shown(g["continuation"]) in page


def test_recipes_side_by_side_get_one_page(compared, tmp_path):
    """`modelpress report OUT` on `run A.yaml B.yaml -o OUT`: one row per recipe (its last step),
    each recipe's path from the original, the original's generations beside each recipe's."""
    from modelpress.report.compare import comparison_rows

    run = run_cli_report(compared[0] / "cmp", tmp_path / "both.html")
    assert run.returncode == 0, run.stderr
    page = (tmp_path / "both.html").read_text()
    records = [json.loads((compared[0] / "cmp" / name / "modelpress.json").read_text())
               for name in ("prune-first", "quantize-first")]
    table = page[page.index("<table id='recipes'>"):page.index("</table>")]
    for record, row in zip(records, comparison_rows(records)):
        assert f"<td class='n'>{record['steps'][-1]['ppl']:.3f}</td>" in table and row[4] in table
    assert re.findall(r"data-chart='([\w-]+)'", page) == ["paths-ppl", "paths-kl"]
    assert page.count("<table class='generations'>") == 3 and "<script" not in page


CHROMIUM = Path(__file__).resolve().parents[2] / ".cache" / "chromium" / "headless-shell"  # scripts/setup_browser.sh


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser_with_no_network(compared, tmp_path):
    """As a person sees it: Chromium opens the page offline, asks for nothing but the file, logs no
    error, lays out every chart at a visible size with its marks drawn, and shows the record's numbers."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail(f"no headless Chromium at {CHROMIUM}: run bash scripts/setup_browser.sh")
    out = compared[0] / "cmp" / "prune-first"
    report = tmp_path / "report.html"
    assert run_cli_report(out, report).returncode == 0
    record = json.loads((out / "modelpress.json").read_text())
    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_context(offline=True, viewport={"width": 1200, "height": 900}).new_page()
            page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            charts = page.eval_on_selector_all("figure.chart", """figs => figs.map(f => {
                const svg = f.querySelector('svg'), box = svg.getBoundingClientRect();
                return {name: f.dataset.chart, width: box.width, height: box.height,
                        marks: svg.querySelectorAll('path, use').length};
            })""")
            ppl = page.eval_on_selector_all("#steps tr", "rows => rows.slice(1).map(r => r.cells[5].innerText)")
            continuations = page.eval_on_selector_all("td.gen", "cells => cells.map(c => c.innerText)")
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()
    assert problems == [] and requests == [report.as_uri()]
    assert [c["name"] for c in charts] == ["size-ppl", "memory", "roofline", "layers", "layers", "histograms"]
    for chart in charts:
        assert chart["width"] > 600 and chart["height"] > 200 and chart["marks"] > 20, chart
    assert ppl == [f"{m['ppl']:.3f}" for m in [record["original"], *record["steps"]]]
    assert len(continuations) == 3 * (1 + len(record["steps"]))
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    assert image.width == 1200 and image.height > 4 * 900  # the whole page, every section laid out
    assert len(image.getcolors(maxcolors=1 << 20)) > 100  # drawn, not a blank page


def run_cli_report(run: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelpress", "report", str(run), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)


def test_the_report_plots_a_training_stage_and_refuses_what_is_not_a_run(tmp_path):
    from modelpress.report.html import render, write_report

    stage = tmp_path / "02-heal"
    stage.mkdir()
    (stage / "train_log.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"step": 0, "eval_ppl": 40.0}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_ppl": 35.0}]))
    measured = {"ppl": 35.0, "params": 1e6, "size_bytes": 4e6, "text": "t.txt", "n_windows": 2}
    record = {"command": "run", "recipe": {"path": "r.yaml", "model": "m", "evaluate": {}},
              "original": {**measured, "ppl": 30.0}, "output": str(stage),
              "steps": [{**measured, "stages": [2], "title": "heal logit 100 tokens", "output": str(stage)}]}
    page = render(record)
    assert "Training: heal logit 100 tokens" in page and page.count("<svg") == 2
    with pytest.raises(UserError, match="is not a finished recipe run"):
        write_report(tmp_path, tmp_path / "r.html")


@pytest.mark.slow  # three recipe runs, each stage and measurement its own process: about a minute alone
def test_a_run_killed_inside_its_heal_resumes_to_the_uninterrupted_weights(deep_llama, text, tmp_path):
    """A training stage resumes from its own saved state (``NN-heal.partial/state``), not from step 0,
    and ends with the weights and training log of a run that was never stopped."""
    heal = {"heal": {"steps": 60, "seq_len": 32, "batch_size": 2, "lr": 3e-3, "save_every": 2, "eval_every": 30,
                     "eval_windows": 2}}
    path = write_recipe(tmp_path / "heal.yaml", deep_llama, text, [{"prune": {"method": "magnitude", "sparsity": 0.5}}, heal])
    recipe = yaml.safe_load(path.read_text())
    recipe["evaluate"].update(windows=1, new_tokens=0, histograms=False)  # the weights are what is compared
    path.write_text(yaml.safe_dump(recipe))
    whole = tmp_path / "whole"
    assert run_cli(str(path), "-o", str(whole)).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", "run", str(path), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    state = out / "02-heal.partial" / "state"
    deadline = time.monotonic() + 300
    while not state.is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "ended" if proc.poll() is not None else "timeout"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)  # after a saved step of the heal, before its last
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not (out / "02-heal").exists() and state.is_dir()

    resumed = run_cli(str(path), "-o", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr.lower()
    a, b = checkpoint_tensors(whole / "02-heal"), checkpoint_tensors(out / "02-heal")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logs = [[json.loads(x)["step"] for x in (d / "02-heal" / "train_log.jsonl").read_text().splitlines()]
            for d in (whole, out)]
    assert logs[0] == logs[1] and logs[0][-1] == 60
