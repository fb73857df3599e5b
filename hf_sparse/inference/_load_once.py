"""A native library bound once per process: loaded under a lock on first use, its failure remembered.

A missing toolchain or library then costs one attempt per process, not one per call; the error is raised again, with
the same message, until the process restarts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoadOnce(Generic[T]):
    """Calls `load()` once, under a lock; later calls return its value, or raise `error(message)` again.

    Args:
        load: binds the library and returns it.
        failed: turns an exception of `catch` into the message that is raised (and may log it once).
        error: the exception type raised with that message.
        catch: the exceptions that mean "unavailable here" (anything else propagates and is not remembered).
    """

    def __init__(
        self,
        load: Callable[[], T],
        failed: Callable[[BaseException], str],
        error: type[Exception],
        catch: tuple[type[BaseException], ...],
    ):
        self._load, self._failed, self._error, self._catch = load, failed, error, catch
        self._lock = threading.Lock()
        self.value: T | None = None
        self.failure: str | None = None

    def __call__(self) -> T:
        if self.value is not None:
            return self.value
        with self._lock:
            if self.value is not None:
                return self.value
            if self.failure is not None:
                raise self._error(self.failure)
            try:
                value = self._load()
            except self._catch as err:
                self.failure = self._failed(err)
                raise self._error(self.failure) from err
            self.value = value
            return value
