"""An atomic, sharded safetensors checkpoint writer.

Tensors are buffered up to ``max_shard_bytes`` and flushed as numbered shards into a temporary
sibling folder (``OUT.partial-<pid>``); ``finish`` writes the index and config, then renames the
folder to ``OUT`` in one step. An exception (or Ctrl-C) inside the ``with`` block removes the
temporary folder, so a folder named ``OUT`` is always complete.

States (checked): OPEN -> (add tensors) -> FINISHED | ABORTED.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelpress.errors import UserError

logger = logging.getLogger("modelpress")

DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: bounds the writer's buffer, i.e. its share of peak memory


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

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise UserError(f"output {self.out_dir} already exists; choose a new folder or remove it")
        self.tmp_dir = self.out_dir.with_name(f"{self.out_dir.name}.partial-{os.getpid()}")
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self.state = "open"
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
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
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.tmp_dir / f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, path, metadata={"format": "pt"})
        self._shards.append(dict.fromkeys(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

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
            (self.tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map

    def finish(self, config: dict, extra_files: dict[str, str | bytes] | None = None,
               copy_files_from: str | Path | None = None, tokenizer=None) -> Path:
        """Flush, write config and side files, and rename the folder to ``out_dir``.

        Args:
            config: the model config dict (``config.json``).
            extra_files: file name -> text or bytes, written as is.
            copy_files_from: a folder whose non-weight side files (generation config, tokenizer,
                chat template) are copied when not already written.
            tokenizer: a tokenizer to ``save_pretrained`` into the checkpoint.

        Returns:
            The final folder.
        """
        self._check_open()
        self._flush()
        self._name_shards()
        (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp_dir)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(self.tmp_dir / name, mode) as f:
                f.write(content)
        if copy_files_from is not None:
            _copy_side_files(Path(copy_files_from), self.tmp_dir)
        _normal_permissions(self.tmp_dir)
        if self.out_dir.exists():
            raise UserError(f"output {self.out_dir} appeared while writing; not overwriting it")
        self.tmp_dir.rename(self.out_dir)
        self.state = "finished"
        return self.out_dir

    def abort(self) -> None:
        if self.state == "open":
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.state = "aborted"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.state == "open":
            self.abort()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "modelpress.json"}


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
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
