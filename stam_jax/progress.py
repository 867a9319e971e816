"""A progress bar with ETA on stderr (tqdm), or nothing when disabled (other processes, logs)."""

from __future__ import annotations

import sys
from typing import Any


class _Silent:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar (`update`, `close`) when `enabled`, else an object that does nothing."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    return tqdm(
        initial=initial, total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True
    )
