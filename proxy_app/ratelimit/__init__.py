"""Admission and settlement: quotas and request, token and concurrency limits, global, per key
and per endpoint, in memory or in Redis.

Why not slowapi or `limits`: they decide once, when a route is entered; a completion outlives
that decision, its tokens are known only at its end, and a concurrency slot must be held until
the last chunk. Nor do they reserve: a limit checked before a request and charged after it
lets every request in flight through (20 concurrent requests against a 100-token quota ended
at 420 tokens). So the gateway takes each decision itself, in two steps:

* **Admission** checks every limit that applies (quota, tokens per minute, requests per
  second, concurrency; the key's, the service's, and each endpoint's) and, only when all
  pass, takes what the request needs from each: a slot, a request in the second's window,
  and a *reservation* of tokens against the quota and the token windows. The reservation is
  the request's most: a prompt estimate (:func:`reservation`) plus max_tokens x n. A request
  is admitted when used + reserved by requests in flight + its reservation <= the limit.
* **Settlement** at the request's end (finished, failed, client gone) records the real usage
  and frees the reservation in one step; a request that fails before it is charged frees it
  on release.

A reservation larger than the whole limit is cut to the limit: such a request runs alone,
when nothing else is used or reserved (a fresh quota, an idle minute), instead of never. When
the real usage exceeds the reservation (a prompt that tokenizes worse than estimated, a
request without max_tokens generating more than the default reservation), it is charged in
full: the limit is then exceeded by at most that difference.

In Redis (``redis_url``), admission is one Lua script (one round trip, atomic across every
gateway, on Redis' clock) and settlement another. Keys under ``redis_prefix``:

* ``qps:<scope>`` sorted set of the last second's requests (an exact moving window);
* ``tpm:<scope>`` hash ``{w, used}``: tokens used in the current minute ``w`` (fixed window:
  it keeps every token a response used even when one overshoots, and a well defined reset for
  ``x-ratelimit-reset-tokens``);
* ``usage:<key_id>:<period>`` the usage counters (usage.py); the quota reads ``tokens``;
* ``res:<scope>`` sorted set of reservations (member ``<lease>:<tokens>``, score = expiry)
  and ``ressum:<scope>`` their sum; ``<scope>`` is a tpm scope or ``quota:<key_id>:<period>``;
* ``conc:<scope>`` sorted set of concurrency leases (score = expiry).

Reservations and leases carry an expiry (the request timeout plus a margin), so those of a
gateway that died come back by themselves; expired reservations are subtracted from the sum
by the next admission that looks at the scope.

In one process the same decisions are taken on the event loop, with no await between check
and take: exact windows of timestamps (`limits`' MemoryStorage was measured at 90-130 us per
request; a deque is O(1) amortised), tokens per minute as a sliding window of one-second
buckets, and reservations as plain sums.

Redis unreachable: ``redis_failure_mode: closed`` refuses (503, the caller's job);
``local`` takes the decisions in this process, each limit divided by ``gateway_count``, and
spools usage to SQLite until a background task has replayed it into Redis.

The package: ``plan`` (the reservation, the checks, the admission, the 429), ``memory`` (the
limits of one process), ``redis_state`` (the shared limits; its scripts in ``lua/``),
``limiter`` (which takes each decision where: in this process' memory, in Redis, or in local
mode; each is a ``plan.Holder`` that settles and releases the admissions it took).
"""

from .limiter import Limiter
from .plan import (
    GLOBAL,
    Admission,
    Check,
    reservation,
)

__all__ = [
    "GLOBAL",
    "Admission",
    "Check",
    "Limiter",
    "reservation",
]
