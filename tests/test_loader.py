"""Ordered parallel decoding: order, bounded look-ahead, and surviving a worker that dies."""

from __future__ import annotations

import os

import numpy as np

from stam_jax.data.loader import Decoded, ordered_map


def crash_on_bad(position: int, name: str) -> Decoded:
    """A stand-in decoder: dies like a segfaulting codec on 'bad', else succeeds."""
    if name == "bad":
        os._exit(11)
    return Decoded(position, np.full(1, position), "ok")


def test_order_and_worker_crash_recovery():
    names = ["a", "b", "bad", "c", "d", "e", "bad", "f"]
    jobs = [(i, n) for i, n in enumerate(names)]
    results = list(ordered_map(crash_on_bad, jobs, workers=2, prefetch=3))
    assert [r.position for r in results] == list(range(len(names)))
    for r, name in zip(results, names, strict=True):
        if name == "bad":
            assert r.status == "failed" and r.reason == "the decoder process crashed"
        else:
            assert r.status == "ok" and r.views[0] == r.position


def test_in_process_mode_is_lazy():
    calls = []

    def record(position, name):
        calls.append(position)
        return Decoded(position, None, "ok")

    stream = ordered_map(record, [(i, "x") for i in range(100)], workers=0, prefetch=4)
    next(stream)
    next(stream)
    assert calls == [0, 1]  # nothing is decoded ahead of the consumer
