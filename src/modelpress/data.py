"""Text in, token windows out: the data side of the ``ppl-512`` and ``calib-128x512`` protocols.

Protocol ``ppl-512`` (every perplexity modelpress reports): tokenize the whole text with
``add_special_tokens=False``, take the first 40 non-overlapping 512-token windows from the
start, prefix each with the tokenizer's BOS id when it has one.
Protocol ``calib-128x512``: the first 128 such windows of the calibration text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def read_text(path: str | Path) -> str:
    r"""Read a UTF-8 text file, or the ``"text"`` field of each line of a ``.jsonl`` file.

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
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{i}: expected a JSON object with a \"text\" field per line") from None
    return "\n\n".join(texts)


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
