"""Ctrl-C during a run: raised where it lands, as Python does, and remembered until the run stops.

Python turns SIGINT into a `KeyboardInterrupt` raised at whatever line the main thread is on. A
library that checks for signals inside its own C code and then clears the error it gets (a
known hazard of `PyErr_CheckSignals`), or Python code that catches `KeyboardInterrupt` to tidy
up and goes on, drops it: the run trains on as if no one had pressed Ctrl-C. Inside
`remembered()` the handler also notes the signal, and the step loop raises `KeyboardInterrupt`
again at the next step boundary if the first one went missing. A program that installed its own
SIGINT handler (a notebook kernel, a job runner), or a run started off the main thread, keeps
its handling untouched.

Example:
    >>> with remembered() as interrupted:
    ...     interrupted()
    False
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


@contextlib.contextmanager
def remembered() -> Iterator[Callable[[], bool]]:
    """Inside the block SIGINT raises `KeyboardInterrupt` as before and is noted; yields whether one came."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    seen = [False]

    def handler(signum: int, frame: FrameType | None) -> None:
        seen[0] = True
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: seen[0]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
