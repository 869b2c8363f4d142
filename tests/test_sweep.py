"""Tiles shared out among worker threads (utils_cv/similarity/sweep.py): every tile is taken
once, errors reach the caller, torch's thread count comes back, and the ranking kernel gives
the same ranks with any number of workers."""
import threading
import time

import numpy as np
import pytest
import torch

from utils_cv.similarity import ranking, sweep


def _with_copies(n, d, classes, seed):
    """Clustered rows, a fifth of them exact copies of others (ties across tiles)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(scale=0.8, size=(n, d))
    copies = rng.choice(n, n // 5, replace=False)
    x[copies] = x[rng.integers(0, n, len(copies))]
    return np.ascontiguousarray(x, dtype=np.float32), y


def _ranks(monkeypatch, workers, depth, distance, args):
    monkeypatch.setattr(ranking, "_WORKERS", workers)
    out = ranking.rank_relevant(*args, distance, depth=depth)
    if depth == "within":  # ranks past R are lower bounds: equal up to R
        r = np.repeat(out.num_relevant, np.diff(out.offsets))
        return out.query.tolist(), np.minimum(out.ranks, r + 1).tolist(), out.num_relevant.tolist()
    return out.query.tolist(), out.ranks.tolist(), out.num_relevant.tolist()


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("depth", ["all", "within", "first"])
@pytest.mark.parametrize("chunked", [False, True])
def test_any_number_of_workers_gives_the_ranks_of_one(monkeypatch, distance, depth, chunked):
    x, y = _with_copies(700, 6, 9, seed=4)
    monkeypatch.setattr(ranking, "_TILE", 64)  # 66 tiles, ragged edges
    monkeypatch.setattr(ranking, "_PREFILTER", True)  # "first": the bfloat16 path on every machine
    if chunked:  # queries in chunks: no symmetric tiles
        monkeypatch.setattr(ranking, "_STATE_BYTES", 16 * 20000)
    for args in ((x, y, None, None), (x[:250], y[:250], x[250:], y[250:])):
        one = _ranks(monkeypatch, 1, depth, distance, args)
        assert len(one[0]) > 200 and max(one[1]) > 1
        for workers in (2, 4):
            assert _ranks(monkeypatch, workers, depth, distance, args) == one


def test_each_tile_is_taken_once_with_a_scratch_per_worker_and_torch_threads_come_back():
    before = torch.get_num_threads()
    seen, lock, all_in = [], threading.Lock(), threading.Barrier(3)

    def work(t, scratch):
        with lock:
            first = threading.get_ident() not in {ident for _, ident, _, _ in seen}
            seen.append((t, threading.get_ident(), id(scratch), torch.get_num_threads()))
        if first:  # each worker's first tile waits for the others to hold one
            all_in.wait(timeout=10)

    sweep.sweep(list(range(60)), work, 3, 8)
    assert sorted(t for t, *_ in seen) == list(range(60))
    threads = {ident for _, ident, _, _ in seen}
    assert len(threads) == 3
    assert len({(ident, s) for _, ident, s, _ in seen}) == len(threads)  # one scratch per worker
    assert {n for *_, n in seen} == {max(1, before // 3)}
    assert torch.get_num_threads() == before


def test_a_workers_error_reaches_the_caller_and_stops_the_others():
    before = torch.get_num_threads()
    done = []

    def work(t, scratch):
        if t == 7:
            raise ValueError("tile 7 failed")
        time.sleep(0.001)
        done.append(t)

    with pytest.raises(ValueError, match="tile 7 failed"):
        sweep.sweep(list(range(300)), work, 2, 8)
    assert len(done) < 150  # not every tile after the error
    assert torch.get_num_threads() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("tiles-")]  # joined


def test_sweeps_running_at_once_each_give_their_caller_its_thread_count_back():
    # torch's count is per thread under OpenMP: each caller sets and restores its own
    before = torch.get_num_threads()
    started, release = threading.Barrier(2), threading.Event()
    after = {}

    def work(t, scratch):
        if t == 0:
            started.wait(timeout=10)  # both sweeps are running
            release.wait(timeout=10)

    def caller(k):
        own = torch.get_num_threads()
        sweep.sweep([0, 1, 2], work, 2, 8)
        after[k] = (own, torch.get_num_threads())

    callers = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
    for c in callers:
        c.start()
    time.sleep(0.2)
    release.set()
    for c in callers:
        c.join()
    assert len(after) == 2 and all(own == now for own, now in after.values())
    assert torch.get_num_threads() == before
