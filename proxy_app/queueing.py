"""Fair queueing: a model's places at this gateway, and the requests waiting for one.

A model whose every backend has ``max_in_flight`` (its vLLM's ``--max-num-seqs``) has that
many places at this gateway, summed over its backends. A request takes a place before its
limits are checked (a waiting request holds no concurrency slot and reserves no token) and
gives it back when its answer has ended. When none is free it waits in its key's queue;
places are handed out:

* the lower priority first (interactive before batch: the key's ``priority``);
* within one priority, in turn across the keys that wait, each key ``weight`` requests in a
  row (weighted round robin), not in arrival order: one key with a thousand requests waiting
  takes one turn in each round, like every other;
* batch requests (priority > 0) never take the model's last ``interactive_reserve`` places,
  so an interactive request finds one without waiting for a batch answer to end.

A request that waits longer than its timeout is answered 429 (``queue_timeout``); one whose
client leaves gives up its place in the queue at once and is never charged (it was never
admitted). Everything runs on the event loop: no lock, and no await between a check and the
taking of a place.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from prometheus_client import Gauge

from .errors import queue_timeout


def priority_class(priority: int) -> str:
    """The label of a priority in the metrics: keys are not labels (unbounded), classes are."""
    return "interactive" if priority <= 0 else "batch"


@dataclass(slots=True)
class _Turns:
    """The keys of one priority that wait, in turn order, each with its waiting requests."""

    keys: OrderedDict[str, deque[asyncio.Future[None]]] = field(default_factory=OrderedDict)
    # Requests the first key has had in its current turn.
    served: int = 0


class FairQueue:
    """The places of one model at this gateway and the requests waiting for them."""

    def __init__(
        self,
        model: str,
        capacity: int,
        reserve: int,
        length: Gauge,
    ) -> None:
        self.model = model
        self.capacity = capacity
        # Batch requests may hold this many places at most (never fewer than one).
        self.batch_capacity = max(1, capacity - reserve)
        self.in_flight = 0
        self.batch_in_flight = 0
        self._by_priority: dict[int, _Turns] = {}
        self._weights: dict[str, int] = {}
        self._length = length

    @property
    def waiting(self) -> int:
        return sum(len(q) for t in self._by_priority.values() for q in t.keys.values())

    def _free_for(self, priority: int) -> bool:
        if self.in_flight >= self.capacity:
            return False
        return priority <= 0 or self.batch_in_flight < self.batch_capacity

    def _take(self, priority: int) -> None:
        self.in_flight += 1
        if priority > 0:
            self.batch_in_flight += 1

    async def acquire(
        self, key_id: str, priority: int, weight: int, timeout: float, since: float | None = None
    ) -> float:
        """Take a place, waiting for one in turn; the seconds waited. 429 once ``timeout``
        seconds have passed since ``since`` (a monotonic time: when the request began to
        wait, here or for a concurrency slot; default now). Cancelled (the client left), it
        leaves the queue and holds nothing."""
        if self._free_for(priority) and not self._waiting_before(priority):
            self._take(priority)
            return 0.0
        start = time.monotonic()
        left = timeout - (start - since) if since is not None else timeout
        turns = self._by_priority.get(priority)
        if turns is None:
            turns = self._by_priority[priority] = _Turns()
            self._by_priority = dict(sorted(self._by_priority.items()))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = turns.keys.get(key_id)
        if queue is None:
            queue = turns.keys[key_id] = deque()
        queue.append(waiter)
        self._weights[key_id] = weight
        label = priority_class(priority)
        self._length.labels(label).inc()
        try:
            async with asyncio.timeout(max(0.0, left)):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self.release(priority)  # handed a place just as it gave up: give it back
            else:
                waiter.cancel()
                self._forget(turns, key_id, waiter, label)
            if isinstance(e, TimeoutError):
                raise queue_timeout(self.model, timeout) from None
            raise
        return time.monotonic() - start

    def _waiting_before(self, priority: int) -> bool:
        """Whether a request that waits would be served before one of ``priority`` (the same
        priority or a lower one): a newcomer never overtakes the queue."""
        return any(p <= priority and t.keys for p, t in self._by_priority.items())

    def _forget(self, turns: _Turns, key_id: str, waiter: asyncio.Future[None], label: str) -> None:
        queue = turns.keys.get(key_id)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        self._length.labels(label).dec()
        if not queue:
            first = next(iter(turns.keys)) == key_id
            del turns.keys[key_id]
            if first:
                turns.served = 0
        # A batch request that leaves may have been all that held back an interactive one.
        self._dispatch()

    def release(self, priority: int) -> None:
        """Give a place back; the next request in turn takes it."""
        self.in_flight -= 1
        if priority > 0:
            self.batch_in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.in_flight < self.capacity:
            for priority, turns in self._by_priority.items():
                if turns.keys and self._free_for(priority):
                    break
            else:
                return
            key_id, queue = next(iter(turns.keys.items()))
            waiter = queue.popleft()
            self._length.labels(priority_class(priority)).dec()
            turns.served += 1
            if not queue:
                del turns.keys[key_id]
                turns.served = 0
            elif turns.served >= self._weights.get(key_id, 1):
                turns.keys.move_to_end(key_id)  # its turn is over: the next key's
                turns.served = 0
            self._take(priority)
            waiter.set_result(None)
