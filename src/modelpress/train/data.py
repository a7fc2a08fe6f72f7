"""Training windows and the order they are seen in: the same batches for any number of processes.

Every text becomes non-overlapping ``seq_len``-token windows (BOS-prefixed, as the ``ppl-512``
protocol does); windows are shuffled once per epoch by ``seed + epoch``. Micro-batch ``m`` of the
run is the same set of windows whatever the process count: each process takes its own slice of
it, so one process with batch ``B·P`` and ``P`` processes with batch ``B`` see the same data, and
a resumed run picks up at micro-batch ``m`` with nothing else to restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from modelpress.data import WindowProtocol, read_text, token_windows
from modelpress.errors import UserError


def train_windows(tokenizer, files: list[str | Path], seq_len: int) -> torch.Tensor:
    """Every full ``seq_len`` window of every file, ``(n, seq_len [+1 with BOS])``."""
    parts = []
    for f in files:
        text = read_text(f)
        try:
            parts.append(token_windows(tokenizer, text, WindowProtocol("train", seq_len, n_windows=1 << 40)))
        except UserError as e:
            raise UserError(f"{f}: {e}") from None
    return torch.cat(parts)


@dataclass(frozen=True)
class BatchOrder:
    """Which windows micro-batch ``m`` holds, for process ``rank`` of ``world``.

    Example:
        >>> order = BatchOrder(n_windows=10, batch_size=2, world=2, seed=0)
        >>> order.per_epoch                      # 10 windows, 4 per global micro-batch
        2
        >>> both = order.indices(0, rank=0) + order.indices(0, rank=1)
        >>> both == BatchOrder(10, batch_size=4, world=1, seed=0).indices(0, rank=0)
        True
    """

    n_windows: int
    batch_size: int  # per process
    world: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def per_epoch(self) -> int:
        return self.n_windows // self.global_batch

    def check(self, what: str) -> None:
        if self.per_epoch == 0:
            raise UserError(f"{what} gives {self.n_windows} training windows, fewer than one batch of "
                            f"{self.global_batch}; add text, or lower --batch-size or --seq-len")

    def visited(self, micro_batches: int) -> list[int]:
        """The windows the first ``micro_batches`` micro-batches hold, over every process, ascending.

        Example:
            >>> order = BatchOrder(n_windows=10, batch_size=2, world=1, seed=0)
            >>> order.visited(2) == sorted(order.indices(0, 0) + order.indices(1, 0))
            True
            >>> order.visited(5) == list(range(10))  # a whole epoch: every window
            True
        """
        seen: set[int] = set()
        for epoch in range(-(-micro_batches // self.per_epoch)):
            steps = min(self.per_epoch, micro_batches - epoch * self.per_epoch)
            seen.update(self._permutation(epoch)[:steps * self.global_batch].tolist())
        return sorted(seen)

    def indices(self, m: int, rank: int) -> list[int]:
        epoch, pos = divmod(m, self.per_epoch)
        chunk = self._permutation(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]
        return chunk[rank * self.batch_size:(rank + 1) * self.batch_size].tolist()

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The order of the windows in ``epoch``: the same on every process, from the seed."""
        return torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch))
