"""Train a student on text against a teacher's logits (logit distillation, EQ 7.2), or on the
text alone (--alpha 0): the healing step after structured pruning. Runs under `accelerate launch`
unchanged (DDP, FSDP).

Example:
    modelpress distill smollm2-pruned --teacher smollm2-135m --data emma.txt mansfield.txt \
        --tokens 400000 --eval-text persuasion.txt -o smollm2-healed
    accelerate launch --num_processes 2 -m modelpress distill smollm2-pruned --teacher smollm2-135m ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelpress.cli import options
from modelpress.errors import UserError
from modelpress.record import to_json
from modelpress.train.distill import DistillConfig, distill

_FIELDS = ("mode", "temperature", "alpha", "beta", "lmbda", "prompt_tokens", "steps", "tokens", "lr", "warmup_steps", "weight_decay", "max_grad_norm",
           "seq_len", "batch_size", "grad_accum", "seed", "eval_every", "eval_windows", "patience", "save_every",
           "mixed_precision", "gradient_checkpointing", "teacher_dtype", "teacher_topk", "chunk_tokens", "slice_teacher_vocab", "qat",
           "qat_scales")


def add_arguments(parser: argparse.ArgumentParser, teacher_required: bool = False) -> None:
    options.add_model_and_output(parser)
    parser.add_argument("--teacher", metavar="MODEL", required=teacher_required,
                        help="the model whose logits are the target (logit mode, alpha > 0)")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="training text: .txt or .jsonl files")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--mode", choices=["logit", "sequence", "on-policy"], default="logit",
                      help="logit: the teacher's next-token distribution on the text (EQ 7.2); sequence: the teacher's "
                           "continuations of the text are the training text (any tokenizers); on-policy (GKD): the "
                           "student also learns on its own samples, scored token by token by the teacher")
    loss.add_argument("--beta", type=float, default=0.5,
                      help="on-policy: the generalized JSD's beta (0: forward KL, 1: reverse KL; default 0.5)")
    loss.add_argument("--lmbda", type=float, default=0.5,
                      help="on-policy: fraction of micro-batches that are the student's own continuations (default 0.5)")
    loss.add_argument("--prompt-tokens", type=options.positive_int, metavar="N",
                      help="sequence, on-policy: tokens of a window kept as the prompt (default: half the window)")
    loss.add_argument("--temperature", type=float, default=1.0, help="τ of the soft term (default 1)")
    loss.add_argument("--alpha", type=float, default=1.0,
                      help="weight of the soft term; 1 - alpha goes to cross-entropy on the text (default 1; 0: no teacher)")
    loss.add_argument("--slice-teacher-vocab", action="store_true",
                      help="the teacher's extra vocabulary rows are padding: drop them")
    q = parser.add_argument_group("quantization-aware training")
    q.add_argument("--qat", metavar="FORMAT",
                   help="train through the fake quantization of this integer format (int4-g128, int3-g64...) and "
                        "write a compressed-tensors checkpoint with exactly the trained weights")
    q.add_argument("--qat-scales", choices=["fixed", "learned"], default="fixed",
                   help="keep the starting (RTN) scales, or learn them (LSQ)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=options.positive_int, metavar="N", help="training budget in tokens")
    budget.add_argument("--steps", type=options.positive_int, metavar="N", help="training budget in optimizer steps")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate, cosine decay (default 1e-4)")
    opt.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup (default 5%% of the steps)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1)")
    opt.add_argument("--seq-len", type=options.positive_int, default=512, help="tokens per window (default 512)")
    opt.add_argument("--batch-size", type=options.positive_int, default=4, help="windows per process per micro-batch")
    opt.add_argument("--grad-accum", type=options.positive_int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, ~30%% slower")
    opt.add_argument("--teacher-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="the teacher's weights (bfloat16 halves its memory)")
    opt.add_argument("--teacher-topk", type=options.positive_int, metavar="K",
                     help="logit mode: score the training text with the teacher once, keep its top K logits per "
                          "token (8 bytes each), and train without the teacher in memory")
    opt.add_argument("--chunk-tokens", type=options.positive_int, default=1024,
                     help="tokens whose logits are computed at once (bounds the logits' memory)")
    ev = parser.add_argument_group("held-out evaluation (best checkpoint, early stop)")
    ev.add_argument("--eval-text", metavar="FILE", help="text never trained on; its perplexity picks the best weights")
    ev.add_argument("--eval-every", type=options.positive_int, metavar="N", help="steps between evaluations (default: 10 per run)")
    ev.add_argument("--eval-windows", type=options.positive_int, default=16, help="windows evaluated (default 16)")
    ev.add_argument("--patience", type=options.positive_int, default=3,
                    help="stop after N evaluations without improvement (default 3)")
    parser.add_argument("--save-every", type=options.positive_int, metavar="N",
                        help="steps between saved states for --resume (default: with every evaluation)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    options.add_report(parser, "settings, steps, the training curve and held-out perplexity")
    options.add_json(parser)


def main(args: argparse.Namespace) -> int:
    for f in [*args.data, *([args.eval_text] if args.eval_text else [])]:
        if not Path(f).is_file():
            raise UserError(f"text file not found: {f}")
    config = options.make_config(DistillConfig, {k: getattr(args, k) for k in _FIELDS})
    record = distill(args.model, args.data, args.output, config, teacher=args.teacher, eval_text=args.eval_text,
                     resume=args.resume)
    if record is None:  # not the main process of a multi-process run
        return 0
    options.write_command_report(args)
    if args.json:
        print(to_json(record, indent=2))
        return 0
    steps, held = record["steps"], record["held_out"]
    print(f"trained {steps['done']} steps ({steps['tokens']:,} tokens){', stopped early' if steps['stopped_early'] else ''}"
          f" -> {args.output}")
    if held:
        print(f"held-out ppl {held['start_ppl']:.3f} -> {held['best_ppl']:.3f} (best at step {held['best_step']})")
    return 0
