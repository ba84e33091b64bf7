"""tests/testkit.spawn_ranks: a rank killed by a signal gets one more try; a worker's own exception never does."""
import os

import pytest
import torch.multiprocessing as mp

from testkit import spawn_ranks


def _abort_once(rank: int, port: int, flag: str, done: str) -> None:
    if rank == 1 and not os.path.exists(flag):
        open(flag, "w").close()
        os.abort()   # what a gloo std::terminate looks like from outside: SIGABRT
    if rank == 0:
        with open(done, "a") as f:
            f.write(f"{port}\n")


def _raise(rank: int, port: int, count: str) -> None:
    with open(count, "a") as f:
        f.write(f"{rank}\n")
    raise ValueError("the worker's own failure")


def test_a_rank_killed_by_a_signal_runs_once_more(tmp_path):
    flag, done = str(tmp_path / "aborted"), str(tmp_path / "done")
    with pytest.warns(UserWarning, match="rank 1 died of SIGABRT"):
        spawn_ranks(_abort_once, flag, done)
    assert os.path.exists(flag) and len(open(done).read().split()) >= 1


def test_an_exception_in_the_worker_is_not_retried(tmp_path):
    count = str(tmp_path / "count")
    with pytest.raises(mp.ProcessRaisedException, match="the worker's own failure"):
        spawn_ranks(_raise, count)
    assert len(open(count).read().split()) <= 2   # one attempt: at most one line per rank
