"""One process-wide lock between tracing a model and running models in other threads.

``torch.export`` and inductor's compilation trace with ``torch.fx``, which patches
``nn.Module.__call__`` for the whole process while it runs, so a model built or run in another
thread would be traced into the graph (or fail). The int8 path traces under ``TRACING.exclusive()``;
the sweep's steps, which build and run models, run under ``TRACING.shared()`` (``@uses_models``).
"""

from __future__ import annotations

import contextlib
import functools
import threading


class SharedLock:
    """Many holders of ``shared()`` at once, or one of ``exclusive()``.

    A waiting ``exclusive()`` goes first. A thread may take ``shared()`` again while it holds it, and
    the thread holding ``exclusive()`` may take either; a thread holding only ``shared()`` must not ask
    for ``exclusive()`` (it would wait for itself).
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._shared = 0
        self._owner: int | None = None  # the thread holding exclusive()
        self._depth = 0
        self._queued = 0  # threads waiting for exclusive()
        self._held = threading.local()  # this thread's depth of shared()

    @contextlib.contextmanager
    def shared(self):
        depth = getattr(self._held, "depth", 0)
        if self._owner == threading.get_ident() or depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        with self._condition:
            self._condition.wait_for(lambda: self._owner is None and not self._queued)
            self._shared += 1
        self._held.depth = 1
        try:
            yield
        finally:
            self._held.depth = 0
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        if getattr(self._held, "depth", 0) and self._owner != me:
            raise RuntimeError("exclusive() asked for by a thread holding shared(): it would wait for itself")
        with self._condition:
            if self._owner != me:
                self._queued += 1
                self._condition.wait_for(lambda: self._owner is None and not self._shared)
                self._queued -= 1
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._condition.notify_all()


TRACING = SharedLock()


def uses_models(function):
    """Run ``function`` under ``TRACING.shared()``: it builds or runs models, which no trace may catch."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with TRACING.shared():
            return function(*args, **kwargs)

    return wrapper
