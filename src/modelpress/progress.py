"""Progress for long loops: ``layer 3/30, 12.1s elapsed, ETA 1m48s`` as log lines.

Log lines rather than a live bar so the same output reads well in a terminal, in CI logs and
in a file; at most one line every ``every_s`` seconds, plus the last one.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
logger = logging.getLogger("modelpress")


def fmt_seconds(s: float) -> str:
    s = max(0, round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def track(items: Iterable[T], total: int, what: str, every_s: float = 2.0) -> Iterator[T]:
    """Yield from ``items``, logging ``what i/total`` with elapsed time and ETA.

    Example:
        >>> for layer in track(range(3), total=3, what="layer"):
        ...     pass
    """
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or i == total:
            last = now
            elapsed = now - start
            eta = elapsed / i * (total - i)
            logger.info("%s %d/%d, %s elapsed, ETA %s", what, i, total, fmt_seconds(elapsed), fmt_seconds(eta))
