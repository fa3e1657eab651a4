"""The in-memory training loader and the loader protocol: exact resumable position at any point (epoch ends
included), per-epoch shuffle from a seed, disjoint rank shares, and both loaders satisfying ``TrainLoader``."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import make_shards  # noqa: E402

from data_pipeline.data_config import DataConfig  # noqa: E402
from data_pipeline.loader import StreamingLoader, build_loader  # noqa: E402
from data_pipeline.memory import InMemoryLoader  # noqa: E402
from data_pipeline.protocol import LOADER_METHODS, TrainLoader, check_loader  # noqa: E402


def take(loader, n: int) -> list:
    """The next ``n`` batches as the trainer draws them: a new ``iter`` whenever an epoch ends."""
    out, it = [], iter(loader)
    while len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:
            it = iter(loader)
    return out


def test_epochs_in_order_then_again():
    loader = InMemoryLoader(["a", "b", "c"])
    assert len(loader) == 3
    assert list(loader) == ["a", "b", "c"] and list(loader) == ["a", "b", "c"]
    assert loader.state_dict() == {"epoch": 2, "index": 0, "batches_per_epoch": 3}
    assert loader.stats()["skipped"] == {}


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("cut", range(0, 12))
def test_resume_at_any_position_continues_identically(shuffle, cut):
    """Stopped after ``cut`` batches (state through JSON, as in a checkpoint), a fresh loader continues exactly."""
    straight = take(InMemoryLoader(list(range(5)), shuffle=shuffle, seed=3), 12)
    first = InMemoryLoader(list(range(5)), shuffle=shuffle, seed=3)
    head = take(first, cut)
    resumed = InMemoryLoader(list(range(5)), shuffle=shuffle, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + take(resumed, 12 - cut) == straight


def test_shuffle_is_a_seeded_permutation_per_epoch():
    loader = InMemoryLoader(list(range(20)), shuffle=True, seed=1)
    epochs = [list(loader) for _ in range(3)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch
    assert epochs[0] != list(range(20))
    again = InMemoryLoader(list(range(20)), shuffle=True, seed=1)
    assert [list(again) for _ in range(3)] == epochs  # the same seed, the same orders
    other = InMemoryLoader(list(range(20)), shuffle=True, seed=2)
    assert list(other) != epochs[0]


@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_shares_are_disjoint_and_equal(shuffle):
    loaders = [InMemoryLoader(list(range(7)), shuffle=shuffle, seed=0, rank=r, world_size=3) for r in range(3)]
    whole = InMemoryLoader(list(range(7)), shuffle=shuffle, seed=0)
    assert [len(x) for x in loaders] == [2, 2, 2]
    for epoch in range(2):
        shares = [list(x) for x in loaders]
        order = whole.order(epoch)
        assert shares == [order[r::3][:2] for r in range(3)]  # every 3rd batch of the common order
        seen = list(itertools.chain(*shares))
        assert len(seen) == len(set(seen)) == 6  # disjoint; the remainder of 7 % 3 is left out of the epoch
    if not shuffle:
        assert whole.order(0) == list(range(7)) and shares[1] == [1, 4]


def test_batch_function_is_called_per_index():
    calls = []

    def make(i: int) -> int:
        calls.append(i)
        return i * i

    loader = InMemoryLoader(make, num_batches=4)
    assert list(loader) == [0, 1, 4, 9] and calls == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_batches"):
        InMemoryLoader(make)


def test_clear_errors():
    with pytest.raises(ValueError, match="rank 2"):
        InMemoryLoader([1, 2], rank=2, world_size=2)
    with pytest.raises(ValueError, match="3 ranks"):
        InMemoryLoader([1, 2], rank=0, world_size=3)
    with pytest.raises(ValueError, match="num_batches=3 but 2"):
        InMemoryLoader([1, 2], num_batches=3)
    loader = InMemoryLoader([1, 2, 3])
    with pytest.raises(ValueError, match="batches_per_epoch=2"):
        loader.load_state_dict({"epoch": 0, "index": 1, "batches_per_epoch": 2})
    with pytest.raises(ValueError, match="not an in-memory loader state"):
        loader.load_state_dict({"pos": 3})


def test_both_loaders_satisfy_the_protocol(tmp_path):
    urls = make_shards(tmp_path, n_shards=1, per_shard=4)
    streaming = build_loader(DataConfig(urls=urls[0], resolution=16, batch_size=2,
                                        num_workers=0, shuffle_buffer=0))
    for loader in (streaming, InMemoryLoader([1])):
        assert isinstance(loader, TrainLoader)
        check_loader(loader)
    # load_state_dict(state) with one argument: the streaming loader's extra parameter has a default
    params = list(inspect.signature(StreamingLoader.load_state_dict).parameters.values())[2:]
    assert all(p.default is not inspect.Parameter.empty for p in params)
    batches = list(streaming)
    assert batches and isinstance(streaming.stats().get("skipped", {}), dict)


def test_a_loader_without_the_protocol_is_named():
    class NoStats:
        def __iter__(self):
            return iter([])

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    assert not isinstance(NoStats(), TrainLoader)
    with pytest.raises(TypeError, match="NoStats: missing stats"):
        check_loader(NoStats())
    assert LOADER_METHODS == ("__iter__", "state_dict", "load_state_dict", "stats")
