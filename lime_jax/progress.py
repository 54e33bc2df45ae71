"""Progress of a long loop (annotated documents, training steps).

A tqdm bar on an interactive terminal; otherwise a plain line now and then, so that logs of
batch jobs stay readable. Standard library only (tqdm loads when a bar is shown): annotation
imports it without jax.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A tqdm bar on a terminal, else a line `[desc: ]unit n/total k=v ... eta=...` (`n units
    ...` when the total is unknown) at most every `every_n` units and `every_s` seconds.

    `update(n, values)` moves to position `n` (absolute); `values` are shown beside it, floats
    as `.4g`, strings as they are. Lines go to `log` (stderr by default).
    """

    def __init__(self, total: int | None, unit: str, *, initial: int = 0, desc: str | None = None,
                 every_n: int = 1, every_s: float = 0.0, enabled: bool = True,
                 log: Callable[[str], None] = _to_stderr):
        self.total = total
        self.unit = unit
        self.desc = desc
        self.every_n = max(1, every_n)
        self.every_s = every_s
        self.enabled = enabled
        self._log = log
        self._bar = None
        # The rate counts from the first update on, so a first step's compilation is excluded.
        self._t0: float | None = None
        self._n0 = initial
        self._last_line = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int, values: Mapping[str, float | str]) -> None:
        if not self.enabled:
            return
        shown = {k: v if isinstance(v, str) else f"{v:.4g}" for k, v in values.items()}
        if self._bar is not None:
            self._bar.n = n
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
            return
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._n0 = now, n
        if n % self.every_n and n != self.total or now - self._last_line < self.every_s:
            return
        self._last_line = now
        parts = [f"{self.desc}:"] if self.desc else []
        parts.append(f"{self.unit} {n}/{self.total}" if self.total is not None else f"{n} {self.unit}s")
        parts += [f"{k}={v}" for k, v in shown.items()]
        if self.total is not None:
            done = n - self._n0
            eta = (now - self._t0) / done * (self.total - n) if done > 0 else float("nan")
            parts.append(f"eta={_format_seconds(eta)}")
        self._log(" ".join(parts))

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            self._log(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
