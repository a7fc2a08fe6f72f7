"""A training run's work folder ``OUT.partial``: saved state for ``--resume``, the best weights so
far, the JSON-lines log; and the one rename that turns it into ``OUT``.

Layout: ``state/`` (accelerate's ``save_state`` plus ``trainer.json``: config and :class:`Progress`),
``best/`` (the weights to be written, already in the output's kind), ``train_log.jsonl``. Each is
replaced by writing a sibling ``*.tmp`` and renaming, so a kill at any moment leaves the previous
complete version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modelpress.errors import UserError
from modelpress.record import to_json

logger = logging.getLogger("modelpress")


@dataclass
class Progress:
    """What a resumed run needs besides accelerate's state (saved as ``trainer.json``)."""

    step: int = 0
    start_ppl: float | None = None
    best_ppl: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def has_accelerator() -> bool:
    """A GPU (or another torch accelerator) is present."""
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(data, indent=2))
    tmp.replace(path)


def append_log(path: Path, entry: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it (the old one stays until the new one is complete)."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def time_left(start: float, done: int, total: int) -> float:
    return (time.monotonic() - start) / max(done, 1) * (total - done)


class Run:
    """The work folder ``OUT.partial`` of one run: its saved state, best weights and log."""

    @contextlib.contextmanager
    def cleanup_unless_saved(self):
        """Remove the work folder when what runs inside fails before any state was saved (a bad
        teacher, say): there is nothing to resume, and nothing may be left looking like a run."""
        try:
            yield
        except BaseException:
            if not self.state.exists() and self.work.exists():
                shutil.rmtree(self.work, ignore_errors=True)
            raise

    def __init__(self, out_dir: str | Path, resume: bool):
        self.out = Path(out_dir)
        self.work = self.out.with_name(self.out.name + ".partial")
        self.state, self.best, self.log = self.work / "state", self.work / "best", self.work / "train_log.jsonl"
        if self.out.exists():
            raise UserError(f"output {self.out} already exists; choose a new folder or remove it")
        if self.state.is_dir() and not resume:
            raise UserError(f"an interrupted run left {self.work}; add --resume to continue it, or delete it")
        if resume and not self.state.is_dir():
            logger.info("nothing to resume in %s; starting from step 0", self.work)
        self.resuming = resume and self.state.is_dir()

    def start(self, config) -> Progress:
        """A fresh work folder, or the saved progress of the run being resumed (same config only)."""
        if not self.resuming:
            if self.work.exists():
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
            return Progress()
        saved = json.loads((self.state / "trainer.json").read_text())
        if saved["config"] != config.model_dump():
            changed = sorted(k for k, v in config.model_dump().items() if saved["config"].get(k) != v)
            raise UserError(f"--resume needs the interrupted run's settings; changed: {', '.join(changed)}")
        progress = Progress(**saved["progress"])
        kept = [line for line in self.log.read_text().splitlines() if json.loads(line)["step"] <= progress.step]
        self.log.write_text("".join(line + "\n" for line in kept))  # what a killed run logged past its state
        return progress


def replace_with(folder: Path, write) -> None:
    """``write(tmp)`` a new version of ``folder`` beside it, then swap it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    replace_dir(tmp, folder)


def save_weights(model, folder: Path, dtype: torch.dtype, tokenizer=None, side_files: Path | None = None) -> None:
    """``model`` as a plain Hugging Face checkpoint in ``dtype``, with the source's side files
    (tokenizer byte for byte, generation config) from ``side_files`` (else ``tokenizer`` saved)."""
    from modelpress.export.checkpoint import copy_side_files, has_tokenizer

    converted: dict[tuple, torch.Tensor] = {}  # one copy per storage: tied embeddings stay one tensor,
    state = {}                                # which save_pretrained then writes once
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            key = (v.data_ptr(), tuple(v.shape), v.stride())
            if key not in converted:
                converted[key] = v.detach().to(dtype)
            v = converted[key]
        state[k] = v
    model.save_pretrained(folder, state_dict=state)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if side_files is not None:
        copy_side_files(side_files, folder)
    if tokenizer is not None and not has_tokenizer(folder):
        tokenizer.save_pretrained(folder)


def saved_step(run: Run) -> str:
    try:
        return f"step {json.loads((run.state / 'trainer.json').read_text())['progress']['step']}"
    except OSError:
        return "none saved yet"
