"""A terminal progress bar (tqdm on stderr) fed by the engine's progress events."""

from __future__ import annotations

import sys
from typing import Any

from toile.progress import ProgressEvent


class TerminalProgress:
    """One bar per stage; a cascade's stages each get their own bar."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self._bar is None or event.stage != self._stage or event.total != self._bar.total:
            self.close()
            self._bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr, unit="step")
            self._stage = event.stage
        self._bar.update(event.step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
