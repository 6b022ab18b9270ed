"""Progress bars on stderr (tqdm, over bytes), shown when stderr is a terminal unless told."""

from __future__ import annotations

import sys
from typing import Any

from mergelab.engine.plan import MergePlan


def want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *args: object) -> None:
        pass


def progress_bar(plan: MergePlan, show: bool, desc: str) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=plan.output_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
