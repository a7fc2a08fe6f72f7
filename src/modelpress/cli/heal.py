"""Heal a compressed model by distilling it from its original: `distill` with the student's own kind kept.

A structurally pruned model gets logit distillation and stays a smaller float model; a
compressed-tensors integer checkpoint is trained through its own format from its stored scales
(QAT + KD) and written back in it; a GGUF file is trained in each tensor's own block type from
its stored codes and written as OUT/model.gguf; a model with pruned zeros keeps them. Same options
as `distill`.

Example:
    modelpress heal smollm2-small --teacher smollm2-135m --data emma.txt mansfield.txt --tokens 400000 \
        --eval-text persuasion.txt -o smollm2-small-healed
"""

from __future__ import annotations

import argparse

from modelpress.cli import distill


def add_arguments(parser: argparse.ArgumentParser) -> None:
    distill.add_arguments(parser, teacher_required=True)


def main(args: argparse.Namespace) -> int:
    return distill.main(args)
