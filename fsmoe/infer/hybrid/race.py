"""The lane model's split checked against the clock.

The lane model (:mod:`.partition`) prices each lane from costs measured one expert at a time. A
whole forward adds what those measurements do not see: the CPU rows' synchronous trip to the host,
a second Python thread trading the GIL with the one issuing GPU work, the layer's other kernels
queued behind its copies. On an H200 host a one-token CPU expert took 1.1 ms inside a decode
forward against 0.42 ms alone, and the model's decode split ran slower than streaming everything.

So the adaptive policy races its own split against the plain alternatives the model prices within
``RACE_WITHIN`` of it (every non-resident expert streamed; every one on the CPU), separately for
each forward size (buckets of powers of two tokens):

* a MoE layer's time is the wall time from its token-count sync to the next MoE layer's (the same
  forward: the next layer's attention is in every candidate's time alike) and is charged to the
  candidate the layer ran;
* each candidate runs until it has ``MIN_SAMPLES`` times (layers take turns, the model first);
* then the fastest mean runs, and every ``RETRY``-th layer of the bucket re-times the runner-up, so
  a machine that changes (another process on the cores) is noticed.

With the in-place kernels (:mod:`.zero_copy`), a forward size whose race streaming has won, and
that is small enough for them, then runs on the device alone (:meth:`SplitRace.settled`;
:mod:`.in_place`): no token count reaches the host, so that size is not re-timed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CANDIDATES = ("model", "stream", "cpu")
# race an alternative the model prices at most this many times its own split: on an H200 host the
# model's decode split (CPU experts) took 2-3x its price in a forward, and streaming, priced at
# over twice the split, was the fastest candidate on the Qwen3 shape (at 2.0 it was never raced)
RACE_WITHIN = 4.0
MIN_SAMPLES = 3
RETRY = 32
EMA = 0.1  # weight of the newest time once a candidate has 1/EMA samples
OUTLIER = 4.0  # a time past this many times the mean counts as this many


@dataclass
class Tally:
    """A candidate's seconds per layer: the median of its first ``MIN_SAMPLES`` times, then a
    running mean turning into a moving average, each new time at most ``OUTLIER`` times the mean.
    One layer that paid a one-time cost (a kernel compiled at its first use took seconds on an
    H200 host) must not price a candidate out: it is raced no more once it has lost."""

    n: int = 0
    mean: float = 0.0
    first: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.n += 1
        if self.n <= MIN_SAMPLES:
            self.first.append(seconds)
            self.mean = float(np.median(self.first))
            return
        self.mean += max(1.0 / self.n, EMA) * (min(seconds, OUTLIER * self.mean) - self.mean)


@dataclass
class Bucket:
    candidates: tuple[str, ...]  # "model" first
    tallies: dict[str, Tally] = field(default_factory=dict)
    turns: int = 0

    def winner(self) -> str | None:
        """The fastest candidate, once every one has been timed enough."""
        if any(self.tallies.get(c, Tally()).n < MIN_SAMPLES for c in self.candidates):
            return None
        return min(self.candidates, key=lambda c: self.tallies[c].mean)


class SplitRace:
    """``pick(layer, tokens, now, predict)`` -> the candidate this layer runs. ``predict(name)`` gives
    the model's predicted seconds of a candidate; it is called only on a bucket's first forward."""

    def __init__(self):
        self.buckets: dict[int, Bucket] = {}
        self._last: tuple[int, float, int, str] | None = None  # layer, time of its sync, bucket, candidate

    def settled(self, tokens: int) -> str | None:
        """The candidate that has won the race of ``tokens``-token forwards, None while it runs."""
        bucket = self.buckets.get(max(int(tokens), 1).bit_length())
        return None if bucket is None else bucket.winner()

    def pick(self, layer: int, tokens: int, now: float, predict) -> str:
        if self._last is not None and self._last[0] == layer - 1:  # the previous MoE layer of this forward
            _, then, b, cand = self._last
            self.buckets[b].tallies.setdefault(cand, Tally()).add(now - then)
        key = max(int(tokens), 1).bit_length()
        bucket = self.buckets.get(key)
        if bucket is None:
            best = predict("model")
            bucket = self.buckets[key] = Bucket(tuple(c for c in CANDIDATES
                                                      if c == "model" or predict(c) <= RACE_WITHIN * best))
        bucket.turns += 1
        choice = self._choose(bucket)
        self._last = (layer, now, key, choice)
        return choice

    @staticmethod
    def _choose(bucket: Bucket) -> str:
        short = [c for c in bucket.candidates if bucket.tallies.get(c, Tally()).n < MIN_SAMPLES]
        if short:
            return min(short, key=lambda c: bucket.tallies.get(c, Tally()).n)  # ties: the model first
        ranked = sorted(bucket.candidates, key=lambda c: bucket.tallies[c].mean)
        return ranked[1] if len(ranked) > 1 and bucket.turns % RETRY == 0 else ranked[0]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per bucket (its smallest token count): the mean ms per layer of each candidate timed."""
        return {str(1 << (k - 1)): {c: round(t.mean * 1e3, 3) for c, t in b.tallies.items()}
                for k, b in sorted(self.buckets.items())}
