"""Text in, token windows out: the data side of the ``ppl-512`` and ``calib-128x512`` protocols.

Protocol ``ppl-512`` (every perplexity modelpress reports): tokenize the whole text with
``add_special_tokens=False``, take the first 40 non-overlapping 512-token windows from the
start, prefix each with the tokenizer's BOS id when it has one.
Protocol ``calib-128x512``: the first 128 such windows of the calibration text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from modelpress.errors import UserError


@dataclass(frozen=True)
class WindowProtocol:
    """How a text becomes fixed-length token windows."""

    name: str
    seq_len: int
    n_windows: int


PPL_512 = WindowProtocol("ppl-512", seq_len=512, n_windows=40)
CALIB_128X512 = WindowProtocol("calib-128x512", seq_len=512, n_windows=128)


def read_text(path: str | Path, field: str = "text") -> str:
    r"""Read a UTF-8 text file, or the ``field`` value of each line of a ``.jsonl`` file.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.jsonl"
        >>> _ = path.write_text('{"text": "It is a truth"}\n{"text": "universally acknowledged"}\n')
        >>> read_text(path)
        'It is a truth\n\nuniversally acknowledged'
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)[field])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{i}: expected a JSON object with a {field!r} field per line") from None
    return "\n\n".join(texts)


def builtin_text() -> str:
    """The small English text shipped with modelpress: the offline default for calibration."""
    return resources.files("modelpress").joinpath("resources", "calibration.txt").read_text(encoding="utf-8")


def read_calibration(source: str, text_field: str = "text") -> str:
    """Calibration text from a file, a saved dataset, or a ``datasets`` name.

    ``source`` is one of: a ``.txt`` / ``.jsonl`` file (see :func:`read_text`); a ``.parquet``
    file or a folder written by ``Dataset.save_to_disk``; or ``hf:NAME[:CONFIG][@SPLIT]`` (split
    ``train`` by default), loaded with ``datasets.load_dataset`` from the local cache or the hub.
    Rows' ``text_field`` values are joined with blank lines, in order.
    """
    path = Path(source)
    if source.startswith("hf:"):
        spec, _, split = source[3:].partition("@")
        name, _, config = spec.partition(":")
        loader, args, kwargs = "load_dataset", (name, config or None), {"split": split or "train"}
    elif path.is_dir():
        loader, args, kwargs = "load_from_disk", (str(path),), {}
    elif path.suffix == ".parquet" and path.is_file():
        loader, args, kwargs = "load_dataset", ("parquet",), {"data_files": str(path), "split": "train"}
    else:
        return read_text(path, text_field)
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {source} needs the datasets package: pip install 'modelpress[data]'") from None
    try:
        ds = getattr(datasets, loader)(*args, **kwargs)
    except Exception as e:  # datasets raises many types: missing, offline, bad config, not a dataset
        raise UserError(f"could not load calibration dataset {source}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{source} holds several splits ({', '.join(ds)}); save one split, or use hf:NAME@SPLIT")
    if text_field not in ds.column_names:
        raise UserError(f"{source} has no {text_field!r} column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[text_field] if t and t.strip())


def token_windows(tokenizer, text: str, protocol: WindowProtocol = PPL_512) -> torch.Tensor:
    """The protocol's windows of ``text`` as a ``(n, seq_len [+1 with BOS])`` LongTensor.

    Fewer windows than the protocol asks for is allowed when the text is short (the count is
    visible in the result's shape and is reported); no full window at all is an error.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = min(protocol.n_windows, len(ids) // protocol.seq_len)
    if n == 0:
        raise UserError(
            f"text has {len(ids)} tokens, fewer than one {protocol.seq_len}-token window; use a longer text"
        )
    windows = torch.tensor(ids[: n * protocol.seq_len], dtype=torch.long).view(n, protocol.seq_len)
    bos = tokenizer.bos_token_id
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows
