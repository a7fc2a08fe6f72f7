"""`--report` on compress, prune and distill, and `modelpress report` on their folders: one offline
page holding the record's settings and summaries, the evaluation the command ran, and its charts."""

from __future__ import annotations

import json
import re

from modelpress.cli import main
from modelpress.data import builtin_text


def _charts(page: str) -> list[str]:
    return re.findall(r"data-chart='([\w-]+)'", page)


def _row(page: str, table: str, key: str) -> str:
    body = page[page.index(f"<table id='{table}'>"):]
    return re.search(rf"<tr><td>{re.escape(key)}</td><td>([^<]*)</td></tr>", body[:body.index("</table>")]).group(1)


def test_compress_writes_its_page_with_the_evaluation_it_ran(tiny_llama, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(builtin_text())
    out = tmp_path / "int4"
    assert main(["compress", str(tiny_llama), "--bits", "4", "--group-size", "32", "--eval", "--text", str(text),
                 "--windows", "2", "--report", "--json", "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)  # the report logs to stderr: --json stays parseable
    page = (out / "report.html").read_text()
    assert "<script" not in page and "<link" not in page
    assert _charts(page) == ["layers"]
    assert _row(page, "quantized", "bits_per_weight") == f"{printed['record']['quantized']['bits_per_weight']:.6g}"
    assert _row(page, "settings", "group_size") == "32"
    assert _row(page, "evaluation", "perplexity") == f"{printed['eval']['ppl']:.3f}"
    # the same page from the folder alone, without the evaluation (it is not kept in the checkpoint)
    assert main(["report", str(out), "-o", str(tmp_path / "again.html")]) == 0
    again = (tmp_path / "again.html").read_text()
    assert again == re.sub(r"\n<h2>Evaluation.*?</table>", "", page, flags=re.S)


def test_prune_shows_each_linears_measured_sparsity(tiny_llama, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama), "--method", "magnitude", "--pattern", "2:4", "--report", "-o", str(out)]) == 0
    page = (out / "report.html").read_text()
    record = json.loads((out / "modelpress.json").read_text())
    assert "sparsity" in _charts(page)
    assert _row(page, "pruned", "pattern") == "2:4" == record["pruned"]["pattern"]
    assert _row(page, "pruned", "sparsity") == f"{record['pruned']['sparsity']:.6g}"


def test_distill_plots_its_training_curve(tiny_llama, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(builtin_text())
    out = tmp_path / "tuned"
    assert main(["distill", str(tiny_llama), "--alpha", "0", "--data", str(data), "--steps", "4", "--seq-len", "32",
                 "--batch-size", "2", "--report", "-o", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert _charts(page) == ["training"]
    assert _row(page, "steps", "done") == "4"
