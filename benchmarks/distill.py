"""Healing by distillation: how much of the compression's perplexity gap a short training recovers.

SmolLM2-135M in float32 is the teacher. Each student is made from it by modelpress (structured
pruning: 4 of 30 layers dropped by block influence, or 25% of the MLP channels removed; GPTQ int3
g64 on calib-128x512), then trained for the same budget of tokens on Emma, Mansfield Park, Sense
and Sensibility and Northanger Abbey (512-token windows, shuffled), by:

- ``kd``: ``modelpress heal`` (logit distillation, forward KL at τ 1, alpha 1; a quantized student
  trains through its own format from its stored scales: QAT + KD);
- ``ce``: ``modelpress distill --alpha 0`` (cross-entropy on the same text, no teacher), the
  baseline the soft targets must beat;
- ``gkd``: ``modelpress heal --mode on-policy`` (GKD: JSD(0.5), half the micro-batches the
  student's own continuations of the windows' first halves, scored by the teacher);
- ``trl-gkd``: TRL's ``GKDTrainer`` with the same settings (``benchmarks/trl_gkd_side.py`` in
  ``.venv-bench``; its loss covers the windows' second halves, and it trains to the end).

Persuasion's first 16 windows are the held-out text that picks the best checkpoint; the reported
perplexity is ppl-512 on Pride and Prejudice (40 windows), never trained or selected on. Columns:
start and final ppl, the fraction of the gap to float recovered ``(start − final) / (start −
float)``, start and final KL (the mean per-token KL(float ‖ student) on the same windows: how
close the student is to the model it was made from, which is what healing aims at; ppl on Austen
also rewards adapting to Austen's prose, which cross-entropy on Austen does directly and the
teacher's soft targets do not), tokens, wall time and peak RSS of the training process
(/usr/bin/time). "modern" columns: ppl over the 512-token windows of modelpress's built-in text
(contemporary fiction, not Austen): what adapting to Austen's prose costs elsewhere.

Usage (from the project root, after scripts/setup.sh; trl-gkd after scripts/setup_bench.sh):
    .venv/bin/python benchmarks/distill.py [--students drop4,mlp75,gptq3] [--modes kd,ce,gkd,trl-gkd]
        [--tokens 100000] [--memory] [--rescore]

Writes benchmarks/results/distill.md and .json after every row; rows accumulate across runs and a
later run replaces the rows it measures. The students and the trained outputs are kept in ``--work``
(a student is reused: delete its folder to make it again; ``--rescore`` scores the kept outputs
again); each training's progress lines go to ``WORK/STUDENT-MODE.log``.
Take each row alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrated import RESULTS, model_path, perplexity, scratch, timed  # noqa: E402
from conftest import austen  # noqa: E402  (on the path through calibrated)

from modelpress.data import PPL_512, WindowProtocol, builtin_text, read_text, token_windows  # noqa: E402
from modelpress.models import loading  # noqa: E402

TRAIN = ("emma.txt", "mansfield_park.txt", "sense_and_sensibility.txt", "northanger_abbey.txt")
HELD_OUT = "persuasion.txt"
MP = str(ROOT / ".venv/bin/modelpress")

# student name -> the modelpress command that makes it from SRC into OUT
STUDENTS = {
    "drop4": ["prune", "{src}", "--method", "structured", "--drop-layers", "4", "--calib", "{emma}"],
    "mlp75": ["prune", "{src}", "--method", "structured", "--mlp-keep", "0.75", "--calib", "{emma}"],
    "gptq3": ["compress", "{src}", "--method", "gptq", "--bits", "3", "--group-size", "64", "--calib", "{emma}"],
}
MODES = {
    "kd": ["heal", "{student}", "--teacher", "{src}"],
    "ce": ["distill", "{student}", "--alpha", "0"],
    "gkd": ["heal", "{student}", "--teacher", "{src}", "--mode", "on-policy"],  # GKD: JSD(0.5), half on-policy
}


def render(rows: list[dict]) -> str:
    lines = ["| student | training | start ppl | final ppl | float ppl | gap recovered | start KL | final KL | "
             "modern start | modern final | modern float | tokens | wall s | peak RSS MB | measured |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        gap = (r["start_ppl"] - r["ppl"]) / (r["start_ppl"] - r["float_ppl"])
        extra = [f"{r[k]:.4f}" if r.get(k) is not None else "" for k in ("start_kl", "kl")] + \
            [f"{r[k]:.3f}" if r.get(k) is not None else "" for k in ("start_modern_ppl", "modern_ppl", "float_modern_ppl")]
        lines.append(f"| {r['student']} | {r['mode']} | {r['start_ppl']:.3f} | {r['ppl']:.3f} | {r['float_ppl']:.3f} | "
                     f"{100 * gap:.1f}% | {' | '.join(extra)} | {r['tokens']:,} | {r['wall_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['measured']} |")
    return "\n".join(lines)


def save(rows: dict, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = sorted(rows.values(), key=lambda r: (r["student"], r["mode"]))
    (RESULTS / "distill.json").write_text(json.dumps({"rows": data}, indent=2))
    caption = (f"SmolLM2-135M (float32) teaches students made from it; training text: {', '.join(TRAIN)} "
               f"(512-token windows, batch {args.batch_size}, lr {args.lr}, cosine); held-out for the best "
               f"checkpoint: {HELD_OUT} (16 windows); ppl and KL(float ‖ student) per token: ppl-512 on "
               "pride_and_prejudice.txt (40 windows). "
               "kd: `modelpress heal` (forward KL, τ 1; QAT + KD for the quantized student); ce: `modelpress "
               "distill --alpha 0`; gkd: `modelpress heal --mode on-policy` (JSD 0.5, lmbda 0.5); trl-gkd: TRL's "
               "GKDTrainer with the same settings (benchmarks/trl_gkd_side.py; no held-out selection). "
               "Each row alone on the machine.")
    (RESULTS / "distill.md").write_text(f"{caption}\n\n{render(data)}\n")


def train(args, mode: str, work: Path, made: Path, src: Path, out: Path, log: Path, fill: dict) -> tuple[dict, int]:
    """One row's training; its wall time and peak RSS, and the tokens it trained on."""
    if mode == "trl-gkd":
        return trl_gkd(args, work, made, src, out, log)
    cmd = [MP, *[a.format(student=made, **fill) for a in MODES[mode]], "--data", *[str(austen(t)) for t in TRAIN],
           "--tokens", str(args.tokens), "--lr", args.lr, "--batch-size", args.batch_size,
           "--eval-text", str(austen(HELD_OUT)), "-o", str(out)]
    stats = timed(cmd, log=log)
    return stats, json.loads((out / "modelpress.json").read_text())["steps"]["tokens"]


def trl_gkd(args, work: Path, made: Path, src: Path, out: Path, log: Path) -> tuple[dict, int]:
    """TRL's GKDTrainer (benchmarks/trl_gkd_side.py, in .venv-bench) on the same windows, student,
    teacher and budget; it trains to the end (no held-out selection)."""
    from modelpress.train.data import train_windows

    windows = work / "train_windows.safetensors"
    if not windows.exists():
        ids = train_windows(loading.load_tokenizer(loading.resolve(made)), [austen(t) for t in TRAIN], 512)
        save_file({"input_ids": ids.contiguous()}, windows)
    steps = args.tokens // (int(args.batch_size) * 512)
    stats = timed([str(ROOT / ".venv-bench/bin/python"), str(ROOT / "benchmarks/trl_gkd_side.py"), str(made), str(src),
                   str(windows), str(steps), args.lr, args.batch_size, str(out)], log=log)
    shutil.rmtree(out.with_name(out.name + ".trainer"), ignore_errors=True)
    last = [line for line in log.read_text().splitlines() if line.startswith("{\"steps\"")][-1]
    return stats, json.loads(last)["tokens"]


MEMORY_SETTINGS = {  # name -> extra options of a short `heal` run, for its peak RSS
    "teacher float32": [],
    "teacher bfloat16": ["--teacher-dtype", "bfloat16"],
    "teacher bfloat16, gradient checkpointing": ["--teacher-dtype", "bfloat16", "--gradient-checkpointing"],
    "teacher top-64 logits, scored once before training": ["--teacher-topk", "64"],
    "no teacher (ce)": None,
}


def memory(args, work: Path, src: Path, fill: dict) -> None:
    """Peak RSS of 3 steps of healing the drop4 student under each of :data:`MEMORY_SETTINGS` (AdamW's
    moments and a step's activations all exist from the first step on; a longer run was not
    measured, and its held-out evaluations are not in these numbers)."""
    made = work / "drop4"
    if not made.exists():
        timed([MP, *[a.format(**fill) for a in STUDENTS["drop4"]], "-o", str(made), "--no-quality-guard"])
    rows = []
    for name, extra in MEMORY_SETTINGS.items():
        out = work / "memory"
        mode = MODES["ce"] if extra is None else [*MODES["kd"], *extra]
        cmd = [MP, *[a.format(student=made, **fill) for a in mode], "--data", *[str(austen(t)) for t in TRAIN],
               "--steps", "3", "--batch-size", args.batch_size, "-o", str(out)]
        stats = timed(cmd, log=work / "memory.log")
        rows.append(f"| {name} | {stats['peak_rss_mb']:.0f} |")
        print(rows[-1], flush=True)
        shutil.rmtree(out)
    params = json.loads((made / "modelpress.json").read_text())["structured"]["params"]
    (RESULTS / "distill_memory.md").write_text(
        f"Peak RSS (/usr/bin/time) of `modelpress heal` on SmolLM2-135M with 4 layers dropped "
        f"({params['after'] / 1e6:.1f}M parameters) as student, SmolLM2-135M as teacher, batch {args.batch_size} x 512 tokens, "
        f"float32 student with AdamW, 3 steps, each run alone ({time.strftime('%Y-%m-%d')}).\n\n"
        "| setting | peak RSS MB |\n| --- | ---: |\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default=",".join(STUDENTS))
    parser.add_argument("--modes", default="kd,ce")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--lr", default="1e-4")
    parser.add_argument("--batch-size", default="4")
    parser.add_argument("--work", default=str(ROOT / "runs" / "distill-bench"))
    parser.add_argument("--memory", action="store_true", help="only the peak-memory table (distill_memory.md)")
    parser.add_argument("--rescore", action="store_true", help="score the kept outputs again; train nothing")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = model_path("smollm2")
    if args.memory:
        return memory(args, work, src, {"src": str(src), "emma": str(austen("emma.txt"))})
    tokenizer = loading.load_tokenizer(loading.resolve(src))
    eval_file = work / "eval.safetensors"
    save_file({"input_ids": token_windows(tokenizer, read_text(austen("pride_and_prejudice.txt")), PPL_512)
               .contiguous()}, eval_file)
    float_ppl = perplexity(src, eval_file)
    modern_file = work / "modern.safetensors"  # not Austen: what adapting to Austen's prose costs elsewhere
    save_file({"input_ids": token_windows(tokenizer, builtin_text(), WindowProtocol("modern-512", 512, 40))
               .contiguous()}, modern_file)
    float_modern = perplexity(src, modern_file)
    saved = RESULTS / "distill.json"
    rows = {(r["student"], r["mode"]): r for r in json.loads(saved.read_text())["rows"]} if saved.exists() else {}
    fill = {"src": str(src), "emma": str(austen("emma.txt"))}
    for student in args.students.split(","):
        made = work / student  # kept between runs: the same student for every mode
        if not (made / "start_ppl.txt").exists():
            scratch(str(made)).rmdir()
            timed([MP, *[a.format(**fill) for a in STUDENTS[student]], "-o", str(made), "--no-quality-guard"])
            (made / "start_ppl.txt").write_text(repr(perplexity(made, eval_file)))
        if not (made / "start_kl.txt").exists():
            (made / "start_kl.txt").write_text(repr(perplexity(made, eval_file, baseline=src)[1]))
        if not (made / "start_modern_ppl.txt").exists():
            (made / "start_modern_ppl.txt").write_text(repr(perplexity(made, modern_file)))
        start = {k: float((made / f"{k}.txt").read_text()) for k in ("start_ppl", "start_kl", "start_modern_ppl")}
        for mode in args.modes.split(","):
            out = work / f"{student}-{mode}"  # kept until the row is measured again
            log = work / f"{student}-{mode}.log"
            if args.rescore and out.is_dir():  # a kept output scored again (by a newer evaluator)
                stats, tokens = {k: rows[(student, mode)][k] for k in ("wall_s", "peak_rss_mb")}, \
                    rows[(student, mode)]["tokens"]
            elif args.rescore:
                continue
            else:
                if out.exists():
                    shutil.rmtree(out)
                stats, tokens = train(args, mode, work, made, src, out, log, fill)
            ppl, kl = perplexity(out, eval_file, baseline=src)
            rows[(student, mode)] = {"student": student, "mode": mode, **start, "ppl": ppl, "kl": kl,
                                     "modern_ppl": perplexity(out, modern_file), "float_ppl": float_ppl,
                                     "float_modern_ppl": float_modern, "tokens": tokens, **stats,
                                     "measured": rows[(student, mode)]["measured"] if args.rescore
                                     else time.strftime("%Y-%m-%d")}
            save(rows, args)
            print(json.dumps(rows[(student, mode)]), flush=True)
    print((RESULTS / "distill.md").read_text())


if __name__ == "__main__":
    main()
