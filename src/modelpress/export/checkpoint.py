"""An atomic, sharded safetensors checkpoint writer that holds no tensor in memory.

Each tensor goes to disk as it arrives (:class:`_Shard`); a shard closes at ``max_shard_bytes``
into a numbered file in a temporary sibling folder (``OUT.partial-<pid>``); ``finish`` writes the
index and config, then renames the folder to ``OUT`` in one step. An exception (or Ctrl-C) inside the ``with`` block removes the
temporary folder, so a folder named ``OUT`` is always complete.

A *resumable* writer uses the fixed name ``OUT.partial`` and keeps it on failure: the run saves
its progress there (``save_state``) and ``--resume`` continues from it (``load_state``).

States (checked): OPEN -> (add tensors) -> FINISHED | ABORTED.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelpress.errors import UserError
from modelpress.record import to_json

logger = logging.getLogger("modelpress")

RESUME_PREFIX = "resume-"
RESUME_STATE = RESUME_PREFIX + "state.json"
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB per shard file (the writer holds none of it in memory)


class CheckpointWriter:
    """Write a Hugging Face style safetensors checkpoint to ``out_dir``, atomically.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "ckpt"
        >>> with CheckpointWriter(out) as w:
        ...     w.add_tensor("model.norm.weight", torch.ones(4))
        ...     _ = w.finish(config={"model_type": "llama"})
        >>> sorted(p.name for p in out.iterdir())
        ['config.json', 'model.safetensors']
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 resumable: bool = False, resume: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise UserError(f"output {self.out_dir} already exists; choose a new folder or remove it")
        self.resumable = resumable or resume
        self.resuming = False
        if self.resumable:  # a fixed name, kept after a crash so that --resume can find it
            self.tmp_dir = self.out_dir.with_name(f"{self.out_dir.name}.partial")
            has_state = (self.tmp_dir / RESUME_STATE).is_file()
            if has_state and not resume:
                raise UserError(f"an interrupted run left {self.tmp_dir}; add --resume to continue it, or delete it")
            if resume and not has_state:
                logger.info("nothing to resume in %s; starting from the first layer", self.tmp_dir)
            self.resuming = resume and has_state
            if not self.resuming and self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir)  # stopped before its first layer was saved: nothing to keep
        else:
            self.tmp_dir = self.out_dir.with_name(f"{self.out_dir.name}.partial-{os.getpid()}")
            if self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.state = "open"
        self._shard: _Shard | None = None
        self._shards: list[dict[str, torch.Tensor | None]] = []  # names per flushed shard
        self._names: set[str] = set()
        self.total_bytes = 0

    def _check_open(self) -> None:
        if self.state != "open":
            raise RuntimeError(f"checkpoint writer is {self.state}; no more tensors can be added")

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (stored as given: dtype and shape kept)."""
        self._check_open()
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard is not None and self._shard.nbytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._shard is None:
            self._shard = _Shard(self.tmp_dir / f"part-{len(self._shards):05d}")
        self._shard.add(name, tensor)
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Close the open shard now (a resumable run does this after every layer)."""
        self._check_open()
        self._flush()

    def save_state(self, extra: dict) -> None:
        """Record progress (shards written, plus the caller's ``extra``) for :meth:`load_state`."""
        self._flush()
        state = {"shards": [list(names) for names in self._shards], "total_bytes": self.total_bytes, **extra}
        tmp = self.tmp_dir / (RESUME_STATE + ".tmp")
        tmp.write_text(to_json(state))
        tmp.replace(self.tmp_dir / RESUME_STATE)

    def load_state(self) -> dict:
        """Restore the shards a previous run recorded; drop any it wrote after; return its state."""
        state = json.loads((self.tmp_dir / RESUME_STATE).read_text())
        self._shards = [dict.fromkeys(names) for names in state["shards"]]
        self._names = {n for names in state["shards"] for n in names}
        self.total_bytes = state["total_bytes"]
        for path in self.tmp_dir.glob("shard-*.safetensors"):
            if int(path.stem.split("-")[1]) >= len(self._shards):
                path.unlink()
        for path in self.tmp_dir.glob("part-*"):  # a shard the previous run had not closed
            path.unlink()
        return state

    def _flush(self) -> None:
        if self._shard is None:
            return
        self._shard.close(self.tmp_dir / f"shard-{len(self._shards):05d}.safetensors")
        self._shards.append(dict.fromkeys(self._shard.names))
        self._shard = None

    def _name_shards(self) -> dict[str, str]:
        """Rename shards to HF's ``model-0000i-of-0000n.safetensors`` (or ``model.safetensors``)."""
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp_dir / f"shard-{i:05d}.safetensors").rename(self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.tmp_dir / "model.safetensors.index.json").write_text(to_json(index, indent=2))
        return weight_map

    def finish(self, config: dict, extra_files: dict[str, str | bytes] | None = None,
               copy_files_from: str | Path | None = None, tokenizer=None) -> Path:
        """Flush, write config and side files, and rename the folder to ``out_dir``.

        Args:
            config: the model config dict (``config.json``).
            extra_files: file name -> text or bytes, written as is.
            copy_files_from: a folder whose non-weight side files (generation config, tokenizer,
                chat template) are copied when not already written.
            tokenizer: a tokenizer to ``save_pretrained`` into the checkpoint when
                ``copy_files_from`` gave none.

        Returns:
            The final folder.
        """
        self._check_open()
        self._flush()
        self._name_shards()
        for leftover in self.tmp_dir.glob(RESUME_PREFIX + "*"):
            leftover.unlink()
        (self.tmp_dir / "config.json").write_text(to_json(config, indent=2, sort_keys=True))
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(self.tmp_dir / name, mode) as f:
                f.write(content)
        if copy_files_from is not None:
            copy_side_files(Path(copy_files_from), self.tmp_dir)
        if tokenizer is not None and not has_tokenizer(self.tmp_dir):
            tokenizer.save_pretrained(self.tmp_dir)
        _normal_permissions(self.tmp_dir)
        if self.out_dir.exists():
            raise UserError(f"output {self.out_dir} appeared while writing; not overwriting it")
        self.tmp_dir.rename(self.out_dir)
        self.state = "finished"
        return self.out_dir

    def abort(self, keep: bool = True) -> None:
        """Stop writing; the temporary folder is removed unless the run is resumable and ``keep``."""
        if self.state == "open":
            if self._shard is not None:
                self._shard.discard()
                self._shard = None
            if not (self.resumable and keep):
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.state = "aborted"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.state == "open":
            self.abort()


class _Shard:
    """One safetensors file built as its tensors arrive, holding none of them in memory.

    ``safetensors.torch.save_file`` takes every tensor of a file at once, so a writer built on it
    holds a whole shard (1 GiB by default, the whole model below that) on top of the tensor it is
    computing: streaming magnitude pruning of Gemma-3-270M peaked at 1944 MB with that buffer and
    at 1026 MB with this writer, whose file is byte for byte the same. Here each tensor
    is saved alone by ``save_file`` (so the library names its dtype and shape), and :meth:`close`
    writes the shard's header and appends the parts' data, largest element size first as
    safetensors orders them, which keeps every tensor aligned. The cost is writing each byte
    twice (the second copy runs in the kernel, ``os.copy_file_range``).
    """

    def __init__(self, stem: Path):
        self.stem = stem
        self.names: list[str] = []
        self.nbytes = 0
        self._parts: list[tuple[int, str, Path, dict, int]] = []  # (element size, name, file, entry, data start)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        path = self.stem.with_name(f"{self.stem.name}-{len(self._parts):06d}.safetensors")
        save_file({name: tensor}, path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(n))[name]
        self._parts.append((tensor.element_size(), name, path, entry, 8 + n))
        self.names.append(name)
        self.nbytes += tensor.numel() * tensor.element_size()

    def close(self, path: Path) -> None:
        parts = sorted(self._parts, key=lambda p: -p[0])  # stable: arrival order within a size
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for _, name, _, entry, _ in parts:
            length = entry["data_offsets"][1] - entry["data_offsets"][0]
            header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + length]}
            offset += length
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb", buffering=0) as out:  # unbuffered: kernel copies and writes share one offset
            out.write(struct.pack("<Q", len(text)) + text)
            for _, name, part, entry, start in parts:
                length = entry["data_offsets"][1] - entry["data_offsets"][0]
                with open(part, "rb") as src:
                    _copy_range(src, out, start, length)
        tmp.replace(path)
        self.discard()

    def discard(self) -> None:
        for *_, part, _, _ in self._parts:
            part.unlink(missing_ok=True)
        self._parts = []


def _copy_range(src, dst, start: int, length: int) -> None:
    """Append ``length`` bytes of ``src`` from ``start`` to ``dst`` (in the kernel where it can)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, start + done)
                if n == 0:
                    break
                done += n
        except OSError:  # a file system without it: copy through user space
            pass
    src.seek(start + done)
    while done < length:
        chunk = src.read(min(64 << 20, length - done))
        if not chunk:
            raise OSError(f"{src.name} ended {length - done} bytes early")
        dst.write(chunk)
        done += len(chunk)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# a run's own records are never carried into another run's output
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "modelpress.json", "train_log.jsonl",
               "teacher_corpus.jsonl"}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_to_save(source):
    """The tokenizer a writer must save for an output of ``source``, or ``None`` when
    ``finish(copy_files_from=source.path)`` copies the source folder's own tokenizer files (a
    run that tokenizes nothing then never loads it: Gemma-3's costs 470 MB of memory)."""
    from modelpress.models import loading

    if source.kind == "folder" and has_tokenizer(source.path):
        return None
    return loading.load_tokenizer(source)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the source's non-weight files (tokenizer, generation config, chat template) that ``dst``
    does not have yet, byte for byte. The tokenizer comes from here rather than from
    ``save_pretrained``: a tokenizer class re-saving can change the files (transformers' Qwen2
    tokenizer adds ``<|endoftext|>`` to a vocabulary that lacks it, one token more than the
    embedding has rows, which llama.cpp then refuses)."""
    for path in Path(src).iterdir():
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES and path.name not in _NOT_COPIED:
            if not (dst / path.name).exists():
                shutil.copy2(path, dst / path.name)


def _normal_permissions(folder: Path) -> None:
    """Give every file the permissions a plain ``open`` would (safetensors writes them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
