"""A byte progress bar on stderr (tqdm), silent when disabled or not on a terminal."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


class _Null:
    def update(self, n: int) -> None:
        pass


@contextmanager
def bar(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """Yield an object with ``update(nbytes)``."""
    if not enabled:
        yield _Null()
        return
    from tqdm import tqdm
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              disable=None, mininterval=0.25) as t:
        yield t
