"""Work done ahead of its consumer in a background thread: host-to-device copies of batches in training and
evaluation, so that the copy overlaps the running step instead of stalling it."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)


def prefetch(items: Iterable, fn: Callable, ahead: int) -> Iterator:
    """Yields fn(item) for each item, computed in a background thread ahead of the consumer: up to `ahead` results
    queued, and one more computed and waiting for room.

    Exceptions in the thread (of the iterator or of fn) are raised here, in order. Closing the generator (or an
    exception in the consumer) stops the thread at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iter(items):
                if stop.is_set():  # also after a source that blocked past the consumer's close
                    return
                if not put(("ok", fn(item))):
                    return
            put(("ok", done))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            put(("error", e))

    thread = threading.Thread(target=work, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if value is done:
                return
            yield value
    finally:
        stop.set()
        thread.join(timeout=10)
        if thread.is_alive():  # blocked inside the source iterator; a daemon thread, it ends with the process
            log.warning("prefetch: the batch source did not return within 10 s of closing; left its thread behind")
