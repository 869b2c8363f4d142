"""Tiles of a blocked computation shared out among worker threads (:mod:`ranking`'s kernel).

A tile's product runs on torch's threads, but the work on its candidates is numpy on one core:
in a full-ranking run at 100,000 x 128 on two cores that is about half the time, with the other
core idle meanwhile. Here each worker thread takes the next tile and runs all of its work, with
torch on its share of the threads, so every core works throughout. numpy and torch release the
GIL in their kernels; the workers share only what the caller locks.
"""
from __future__ import annotations

import ctypes
import sys
import threading

import numpy as np
import torch

__all__ = ["Scratch", "sweep"]


class Scratch:
    """One worker's buffers: a float32 tile and its mask (16 and 4 MB); the prefilter adds its
    bfloat16 tile and the operand of the column block in hand."""

    def __init__(self, tile: int):
        self.tile = torch.empty(tile * tile)
        self.mask = np.empty(tile * tile, dtype=bool)
        self.bf16, self.key, self.right, self.rb = None, None, None, None


def sweep(tiles: list, work, workers: int, tile: int) -> None:
    """Call ``work(tile, scratch)`` for each of ``tiles`` (in their order as far as taking turns
    allows) on ``workers`` threads, the caller's among them, each with its own :class:`Scratch`
    of ``tile`` x ``tile``. torch runs on ``threads // workers`` threads for the call (restored
    after). The first error of any worker stops the others after their current tile and is
    raised here; Ctrl-C in the caller's thread too."""
    if workers <= 1:
        scratch = Scratch(tile)
        for t in tiles:
            work(t, scratch)
        return
    queue, grab, stop, errors = iter(tiles), threading.Lock(), threading.Event(), []

    def loop() -> None:
        try:
            scratch = Scratch(tile)
            with torch.inference_mode():  # per thread
                while not stop.is_set():
                    with grab:
                        t = next(queue, None)
                    if t is None:
                        return
                    work(t, scratch)
        except BaseException as e:  # the caller raises it (Ctrl-C in the caller's thread included)
            errors.append(e)
            stop.set()

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // workers))
    others = [threading.Thread(target=loop, name=f"tiles-{k}", daemon=True) for k in range(1, workers)]
    try:
        for th in others:
            th.start()
        loop()
    finally:
        for th in others:
            th.join()
        torch.set_num_threads(before)
        _release_free_memory()
    if errors:
        raise errors[0]


def _release_free_memory() -> None:
    """Hand back the free memory of every thread's heap (glibc's ``malloc_trim``). Each worker
    thread allocates its temporaries from a heap of its own, which keeps what they freed; the
    caller's next steps (the ranks, then the metrics) would otherwise hold their peak on top of
    it (20 MB at 100,000 x 128 with two workers). Elsewhere nothing to do."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass
