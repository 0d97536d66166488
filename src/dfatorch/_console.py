"""What the library prints to people: warnings as one ``warning: ...`` line, and progress bars
that stay readable in a log file.

Warnings go through the :mod:`logging` logger ``"dfatorch"``, which has its own handler writing
``warning: <message>`` to the current ``sys.stderr`` (no source line, no traceback). It does not
propagate to the root logger, so a configured root logger does not print it twice. To silence
the library from Python::

    import logging
    logging.getLogger("dfatorch").setLevel(logging.ERROR)

Progress bars: :func:`progress_bar` returns a ``tqdm`` bar when its stream (standard error) is a
terminal; otherwise a :class:`LineProgress` that writes a plain line (no carriage return, no
escape code) at every ``every`` share of the total, at most every ``min_interval`` seconds, and
one when it closes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

__all__ = ["LOGGER_NAME", "LineProgress", "logger", "progress_bar", "warn"]

LOGGER_NAME = "dfatorch"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """A handler for whatever ``sys.stderr`` is when a record is emitted (pytest's capture, a
    redirected stream), like :data:`logging.lastResort`."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.setStream assigns it; ignore
        pass


def logger() -> logging.Logger:
    """The ``"dfatorch"`` logger, with its ``level: message`` stderr handler installed once."""
    log = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        log.addHandler(handler)
        log.propagate = False
        if log.level == logging.NOTSET:
            log.setLevel(logging.WARNING)
    return log


def warn(message: str) -> None:
    """Tell the user ``message`` as one ``warning: message`` line on standard error (through the
    ``"dfatorch"`` logger, so Python users can raise its level to silence it)."""
    logger().warning(" ".join(message.split()))


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int | float | None = None,
    desc: str = "",
    enabled: bool = True,
    *,
    iterable: Iterable[Any] | None = None,
    file: IO[str] | None = None,
    every: float = 0.1,
    min_interval: float = 5.0,
    **kw: Any,
) -> Any:
    """A progress bar on ``file`` (default: standard error) that never fills a log with
    carriage returns.

    Use it like ``tqdm``: ``bar.update(n)``, ``bar.set_postfix(loss=...)``, ``bar.close()``, as
    a context manager, or iterate over it when ``iterable`` is given.

    Args:
        total: the number of steps (``None``: unknown; ``len(iterable)`` if it has one).
        desc: the bar's label.
        enabled: ``False`` gives a silent bar (a disabled ``tqdm``).
        iterable: what to iterate over, as ``tqdm(iterable)``.
        file: the stream (default: ``sys.stderr`` at call time).
        every: when ``file`` is not a terminal, write a line at every such share of ``total``
            (0.1: at 10%, 20%, ...).
        min_interval: ... but not within this many seconds of the start or of the last line
            (short bars write only their closing line).
        **kw: more ``tqdm`` arguments (``unit``, ``unit_scale``, ``leave``, ...); only ``leave``,
            ``unit`` and ``unit_scale`` are used when ``file`` is not a terminal.

    Returns:
        A ``tqdm`` bar on a terminal (or when disabled), else a :class:`LineProgress`.
    """
    stream = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not enabled or _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=stream, **kw)
    return LineProgress(
        total,
        desc,
        iterable=iterable,
        file=stream,
        every=every,
        min_interval=min_interval,
        leave=kw.get("leave", True),
        unit=kw.get("unit", "it"),
        unit_scale=bool(kw.get("unit_scale", False)),
    )


class LineProgress:
    """The ``tqdm`` subset the library uses, writing whole lines only (for logs and pipes).

    A line looks like ``epoch 3/20: 40% (120/300 it) 12.3s loss=0.4210``. Intermediate lines come
    at every ``every`` share of ``total`` (never within ``min_interval`` seconds of the last
    line); the closing line comes if ``leave`` or if an intermediate line was written (so a log
    never ends a bar at "90%").
    """

    def __init__(
        self,
        total: int | float | None,
        desc: str = "",
        *,
        iterable: Iterable[Any] | None = None,
        file: IO[str] | None = None,
        every: float = 0.1,
        min_interval: float = 5.0,
        leave: bool = True,
        unit: str = "it",
        unit_scale: bool = False,
    ) -> None:
        self.total = total
        self.desc = desc
        self.iterable = iterable
        self.file = file
        self.every = every
        self.min_interval = min_interval
        self.leave = leave
        self.unit = unit
        self.unit_scale = unit_scale
        self.n: int | float = 0
        self.postfix = ""
        self.disable = False
        self._start = self._last = time.monotonic()
        self._next_share = every
        self._lines = 0
        self._closed = False

    # -- tqdm's interface --------------------------------------------------------------------

    def update(self, n: int | float = 1) -> None:
        self.n += n
        if not self.total or self.every <= 0:
            return
        share = self.n / self.total
        if share < self._next_share or share >= 1:
            return
        while self._next_share <= share:
            self._next_share += self.every
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._write(now)

    def set_postfix(
        self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave or self._lines:
            self._write(time.monotonic(), final=True)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- output -----------------------------------------------------------------------------

    def line(self, *, final: bool = False) -> str:
        """The text of one progress line (no newline)."""
        elapsed = time.monotonic() - self._start
        count = self._amount(self.n)
        if self.total is not None:
            count += "/" + self._amount(self.total)
        share = f"{100 * self.n / self.total:.0f}% " if self.total else ""
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self.postfix}" if self.postfix else ""
        done = " done" if final else ""
        return f"{head}{share}({count} {self.unit}) {elapsed:.1f}s{done}{tail}"

    def _amount(self, n: int | float) -> str:
        if self.unit_scale:
            from tqdm import tqdm

            return str(tqdm.format_sizeof(n))
        return f"{n:g}"

    def _write(self, now: float, *, final: bool = False) -> None:
        stream = self.file if self.file is not None else sys.stderr
        stream.write(self.line(final=final) + "\n")
        stream.flush()
        self._last = now
        self._lines += 1
