"""Streaming measurements: NLL through the rolling cache against full forwards (an invariant, and a
direct computation on what the cache holds), and the text statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modernlm.eval.sinks import (
    distinct_n,
    mean_stats,
    ngrams,
    position_buckets,
    repetition_rate,
    segment_stats,
    streaming_nll,
)
from modernlm.model import ModernDecoderLM
from tests.conftest import VARIANTS, tiny_config


def model_for(variant: str, **overrides) -> ModernDecoderLM:
    torch.manual_seed(0)
    return ModernDecoderLM(tiny_config(**VARIANTS[variant], init_std=0.1, **overrides)).eval()


def full_nll(model: ModernDecoderLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.size(0), -1)


@pytest.mark.parametrize("variant", ["gqa", "sink", "moe"])
@pytest.mark.parametrize("sink_size", [0, 4])
@pytest.mark.parametrize("chunk", [1, 5])
def test_window_longer_than_the_sequence_equals_the_full_forward(variant, sink_size, chunk):
    # Nothing is evicted, so the rolling cache must give every position what one forward gives.
    model = model_for(variant)
    ids = torch.randint(0, 64, (3, 30))
    streamed = streaming_nll(model, ids, window=32, sink_size=sink_size, chunk=chunk, batch_size=2)
    assert streamed.shape == (3, 29)
    torch.testing.assert_close(streamed, full_nll(model, ids), atol=1e-5, rtol=1e-5)


def test_window_zero_is_dense_attention_past_the_context():
    model = model_for("gqa", max_seq_len=8)
    ids = torch.randint(0, 64, (2, 30))  # positions run past the trained 8
    torch.testing.assert_close(streaming_nll(model, ids), full_nll(model, ids), atol=1e-5, rtol=1e-5)


# (A sink model with sink_size=0 evicts its learned sink: no plain forward reproduces that.)
@pytest.mark.parametrize(
    "variant,sink_size,window",
    [("gqa", 0, 5), ("gqa", 3, 5), ("gqa", 1, 7), ("sink", 1, 5), ("sink", 3, 5), ("sink", 2, 7)],
)
def test_rolling_window_equals_a_forward_over_what_the_cache_holds(variant, sink_size, window):
    # With one layer, a cached key/value depends only on its token (keys are rotated by their slot
    # at every step), so token t must get exactly the logits of one plain forward over the tokens
    # the cache holds when t arrives: the first sink_size slots (slot 0 is the learned sink token,
    # which a plain forward adds by itself), then the `window` tokens before t, then t.
    model = model_for(variant, n_layer=1)
    has_sink = model.sink is not None
    ids = torch.randint(0, 64, (2, 24))
    streamed = streaming_nll(model, ids, window=window, sink_size=sink_size)
    first = sink_size - int(has_sink)  # real tokens among the sink slots
    for t in range(ids.size(1) - 1):
        if t + int(has_sink) <= sink_size + window:  # nothing evicted yet
            seen = ids[:, : t + 1]
        else:
            seen = torch.cat([ids[:, :first], ids[:, t - window : t + 1]], dim=1)
        with torch.no_grad():
            logits = model(seen).logits[:, -1]
        expected = F.cross_entropy(logits, ids[:, t + 1], reduction="none")
        torch.testing.assert_close(streamed[:, t], expected, atol=1e-5, rtol=1e-5)


def test_eviction_changes_the_nll_of_a_deep_model():
    # the equality above is not vacuous: a short window does change what the model predicts
    model = model_for("gqa")
    ids = torch.randint(0, 64, (2, 30))
    streamed = streaming_nll(model, ids, window=4, sink_size=0)
    assert not torch.allclose(streamed[:, 10:], full_nll(model, ids)[:, 10:], atol=1e-3)


def test_streaming_restores_training_mode():
    model = model_for("gqa").train()
    streaming_nll(model, torch.randint(0, 64, (1, 10)), window=4)
    assert model.training


def test_position_buckets_hand_example():
    # column j is the target at position j + 1: positions 1..7 -> buckets [0,3) [3,6) [6,9)
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]])
    assert position_buckets(nll, 3) == pytest.approx(
        [(1 + 2 + 3 + 4) / 4, (3 + 4 + 5 + 5 + 6 + 7) / 6, (6 + 7 + 8 + 9) / 4]
    )


def test_ngrams_and_distinct_n_hand_examples():
    tokens = [1, 2, 1, 2, 3]
    assert ngrams(tokens, 2) == [(1, 2), (2, 1), (1, 2), (2, 3)]
    assert distinct_n(tokens, 1) == pytest.approx(3 / 5)
    assert distinct_n(tokens, 2) == pytest.approx(3 / 4)
    assert distinct_n(tokens, 3) == pytest.approx(3 / 3)
    assert math.isnan(distinct_n(tokens, 6))


def test_repetition_rate_hand_examples():
    tokens = [1, 2, 3, 1, 2, 3, 1, 2]
    # 3-grams: 123 231 312 | 123 231 312 (each seen before)
    assert repetition_rate(tokens, 3) == pytest.approx(3 / 6)
    assert repetition_rate(tokens, 3, start=3) == pytest.approx(1.0)
    assert repetition_rate(tokens, 3, start=0, end=3) == 0.0
    assert repetition_rate([5, 5, 5, 5, 5], 2) == pytest.approx(3 / 4)  # overlapping occurrences count
    assert repetition_rate([1, 2, 3, 4], 4) == 0.0
    assert math.isnan(repetition_rate([1, 2, 3], 4))


def test_segment_stats_hand_example():
    tokens = [7, 8, 1, 1, 1, 2, 7, 8, 1, 1, 3, 4]
    stats = segment_stats(tokens, 4, prompt_len=2, ngram=2, distinct=(1, 2))
    # spans of the generated part: positions [2,4) [4,8) [8,12)
    assert stats[0] == pytest.approx({"repetition": 1 / 2, "distinct_1": 1 / 2, "distinct_2": 1.0})
    # 2-grams starting at 4..7: (1,2) (2,7) (7,8)* (8,1)*, * = seen at 0 and 1 (the prompt counts)
    assert stats[1] == pytest.approx({"repetition": 2 / 4, "distinct_1": 1.0, "distinct_2": 1.0})
    # starting at 8..10: (1,1)* (1,3) (3,4); tokens 1 1 3 4: 3 distinct of 4, 2-grams all distinct
    assert stats[2] == pytest.approx({"repetition": 1 / 3, "distinct_1": 3 / 4, "distinct_2": 1.0})
    assert len(segment_stats(tokens, 4, n_segments=2)) == 2


def test_mean_stats_averages_texts_span_by_span():
    a = [{"repetition": 0.0, "distinct_1": 1.0}, {"repetition": 0.5, "distinct_1": 0.5}]
    b = [{"repetition": 1.0, "distinct_1": 0.0}, {"repetition": 0.5, "distinct_1": 1.0}]
    assert mean_stats([a, b]) == {"repetition": [0.5, 0.5], "distinct_1": [0.5, 0.75]}
