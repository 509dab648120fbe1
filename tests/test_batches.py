"""batches.py: memmapped windows over token shards, per-rank sharding, validation, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modernlm.data.corpus import write_shards
from modernlm.data.shards import TokenStream, TrainWindows, ValBatches, read_meta
from modernlm.errors import UserError


@pytest.fixture
def shards(tmp_path):
    # train ids live in [0, 100), val ids in [100, 200): any leak between splits is visible.
    rng = np.random.default_rng(0)
    train = rng.integers(0, 100, 5003)
    val = rng.integers(100, 200, 700)
    path = write_shards(
        tmp_path / "d", {"train": train, "val": val}, vocab_size=256, shard_tokens=1000
    )
    return path, train, val


def test_stream_reads_across_files(shards):
    path, train, _ = shards
    stream = TokenStream(path, "train")
    assert len(read_meta(path)["splits"]["train"]["files"]) == 6  # 5003 tokens in shards of 1000
    assert len(stream) == len(train)
    np.testing.assert_array_equal(stream.read(990, 30), train[990:1020])  # crosses a file border
    np.testing.assert_array_equal(stream.read(0, 5003), train)


def test_targets_are_inputs_shifted_by_one(shards):
    path, train, _ = shards
    windows = TrainWindows(TokenStream(path, "train"), seq_len=16, batch_size=4, seed=1)
    starts = windows.next_starts()
    windows.load_state_dict(
        {"epoch": 0, "cursor": 0, "seed": 1, "num_windows": windows.num_windows}
    )
    x, y = next(windows)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(x[row].numpy(), train[s : s + 16])
        np.testing.assert_array_equal(y[row].numpy(), train[s + 1 : s + 17])


def test_epoch_visits_every_window_once(shards):
    path, _, _ = shards
    w = TrainWindows(TokenStream(path, "train"), seq_len=50, batch_size=10, seed=3)
    n = w.num_windows  # (5003 - 1) // 50 = 100
    assert n == 100
    seen = [s for _ in range(n // 10) for s in w.next_starts()]
    assert len(set(seen)) == n  # no repeats inside an epoch
    offsets = {s % 50 for s in seen}
    assert len(offsets) == 1  # one grid per epoch, shifted by the epoch's random offset
    assert w.epoch == 1 and w.cursor == 0


def test_ranks_get_disjoint_windows_that_together_equal_one_process(shards):
    path, _, _ = shards
    stream = TokenStream(path, "train")
    single = TrainWindows(stream, seq_len=16, batch_size=6, seed=7)
    ranks = [
        TrainWindows(stream, seq_len=16, batch_size=3, seed=7, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(40):  # crosses epoch borders (312 windows / 6 per step)
        a, b = ranks[0].next_starts(), ranks[1].next_starts()
        assert not set(a) & set(b)
        assert a + b == single.next_starts()


def test_validation_is_fixed_in_order_and_never_touches_train(shards):
    path, _, val = shards
    stream = TokenStream(path, "val")
    vb = ValBatches(stream, seq_len=32, batch_size=4, max_batches=3)
    batches = list(vb)
    assert len(batches) == 3
    first = batches[0][0]
    np.testing.assert_array_equal(first[0].numpy(), val[:32])
    np.testing.assert_array_equal(first[1].numpy(), val[32:64])  # sequential windows
    assert all(((x >= 100) & (y >= 100)).all() for x, y in batches)  # only val ids
    again = list(vb)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    # train batches only ever contain train ids
    tw = TrainWindows(TokenStream(path, "train"), seq_len=32, batch_size=8)
    assert all((next(tw)[0] < 100).all() for _ in range(30))


def test_validation_ranks_split_windows_round_robin(shards):
    path, _, _ = shards
    stream = TokenStream(path, "val")
    all_starts = sorted(s for b in ValBatches(stream, 32, 2, 0).batches for s in b)
    per_rank = [
        sorted(s for b in ValBatches(stream, 32, 2, 0, rank=r, world_size=2).batches for s in b)
        for r in (0, 1)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == all_starts


def test_short_val_split_uses_one_shorter_window(tmp_path):
    path = write_shards(
        tmp_path / "d", {"train": np.arange(100), "val": np.arange(10)}, vocab_size=128
    )
    batches = list(ValBatches(TokenStream(path, "val"), seq_len=32, batch_size=4, max_batches=0))
    assert len(batches) == 1 and batches[0][0].shape == (1, 9)


def test_resume_continues_the_same_sequence(shards):
    path, _, _ = shards
    stream = TokenStream(path, "train")
    a = TrainWindows(stream, seq_len=16, batch_size=8, seed=5)
    for _ in range(45):  # past the first epoch border (312 windows)
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # plain types only
    expected = [next(a) for _ in range(5)]
    b = TrainWindows(stream, seq_len=16, batch_size=8, seed=5)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (next(b) for _ in range(5)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(UserError, match="different dataset"):
        TrainWindows(stream, seq_len=32, batch_size=8, seed=5).load_state_dict(state)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not set"):
        read_meta("")
    with pytest.raises(UserError, match="not found"):
        read_meta(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        read_meta(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json"):
        read_meta(bad)
    path = write_shards(
        tmp_path / "short", {"train": np.arange(16), "val": np.arange(4)}, vocab_size=64
    )
    with pytest.raises(UserError, match="fewer than one sequence"):
        TrainWindows(TokenStream(path, "train"), seq_len=16, batch_size=1)
    (path / "train_00000.bin").unlink()
    with pytest.raises(UserError, match="does not exist"):
        TokenStream(path, "train")
