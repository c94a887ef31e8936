"""Synthetic retrieval tasks (longattn.tasks): seeded, shaped as documented, answers where claimed."""

import numpy as np
import pytest
import torch

from longattn.tasks import VOCAB, copy, mixture, mqar, needle, passkey


def _is(ids: torch.Tensor, lo: int, count: int) -> torch.Tensor:
    return (ids >= lo) & (ids < lo + count)


def test_vocabulary_ranges_are_disjoint_and_named():
    words = VOCAB.words()
    assert len(words) == VOCAB.size == 176 and len(set(words)) == VOCAB.size
    groups = [set(VOCAB.digits()), set(VOCAB.filler()), set(VOCAB.keys()), set(VOCAB.values())]
    assert sum(map(len, groups)) == len(set().union(*groups)) == VOCAB.size - 6
    assert VOCAB.decode(VOCAB.passage()[:5]) == "the grass is green ."


@pytest.mark.parametrize("make", [
    lambda s: passkey(300, 0.4, 3, s),
    lambda s: needle(300, 0.4, 3, s, filler="random"),
    lambda s: mqar(300, 8, 3, s),
    lambda s: copy(100, 3, s),
    lambda s: mixture(128, 6, s),
])
def test_generators_are_seeded(make):
    a, b, c = make(7), make(7), make(8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer_pos, b.answer_pos)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("length", [32, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_layout_answers_and_depth(length, depth):
    b = passkey(length, depth, 4, seed=1, digits=5)
    assert b.tokens.shape == (4, length) and b.tokens.dtype == torch.int64
    assert torch.equal(b.answer_pos, torch.arange(length - 5, length).expand(4, 5))
    fill = length - 2 * 5 - 5
    for row, start, ans in zip(b.tokens, b.needle_pos, b.targets):
        assert row[0] == VOCAB.bos and row[start] == VOCAB.passkey and row[start + 6] == VOCAB.end
        assert torch.equal(row[start + 1:start + 6], ans)  # the hidden number is the answer
        assert row[-7] == VOCAB.question and row[-6] == VOCAB.passkey
        assert int(start) - 1 == round(depth * fill)  # filler tokens before the needle
        assert len(set(ans.tolist())) == 5 and _is(ans, VOCAB.digit0, 10).all()  # distinct digits
        assert int(_is(row, VOCAB.digit0, 10).sum()) == 10  # digits only in the needle and the answer
        assert (row == VOCAB.passkey).sum() == 2


def test_passkey_depth_moves_the_needle_monotonically():
    starts = [int(passkey(2048, d, 1, seed=0).needle_pos[0]) for d in np.linspace(0, 1, 11)]
    assert starts == sorted(starts) and starts[0] == 1 and starts[-1] == 1 + (2048 - 15)


def test_repeat_filler_is_the_passage():
    row = passkey(200, 1.0, 1, seed=3).tokens[0]
    body = row[1:200 - 2 * 5 - 5 + 1]  # depth 1: all filler before the needle
    passage = torch.as_tensor(VOCAB.passage())
    start = int((passage == body[0]).nonzero()[0])
    for shift in range(len(passage)):  # some phase of the passage repeats exactly
        tiled = passage.roll(-shift).repeat(10)[: len(body)]
        if torch.equal(tiled, body):
            break
    else:
        pytest.fail(f"filler is not the passage repeated (starts at passage token {start})")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_query_names_the_right_key_among_distractors(depth):
    length, vals = 400, 3
    b = needle(length, depth, 5, seed=2, values=vals, distractors=3)
    sent = vals + 3
    fill = length - 1 - 4 * sent - sent
    for row, start, ans in zip(b.tokens, b.needle_pos, b.targets):
        key = row[-vals - 1]
        assert row[start] == VOCAB.needle and row[start + 1] == key and torch.equal(row[start + 2:start + 2 + vals], ans)
        starts = (row == VOCAB.needle).nonzero().flatten()[:-1]  # the last one is the question's
        assert len(starts) == 4 and int(start) in starts.tolist()
        keys = row[starts + 1]
        assert len(set(keys.tolist())) == 4  # distinct keys: the query is unambiguous
        values = torch.cat([row[s + 2:s + 2 + vals] for s in starts])
        assert len(set(values.tolist())) == 4 * vals and _is(values, VOCAB.value0, 64).all()
        before = int(start) - 1 - sent * int((starts < start).sum())
        assert before == round(depth * fill)  # filler tokens before the queried needle


@pytest.mark.parametrize("length,pairs", [(64, 4), (512, 16), (2048, 32)])
def test_mqar_pairs_up_front_and_each_key_queried_once(length, pairs):
    b = mqar(length, pairs, 6, seed=4)
    assert b.tokens.shape == (6, length) and b.answer_pos.shape == (6, pairs)
    assert (b.needle_pos == -1).all() and b.answer_mask.all()
    for row, pos, ans in zip(b.tokens, b.answer_pos, b.targets):
        keys, values = row[1:1 + 2 * pairs:2], row[2:2 + 2 * pairs:2]
        assert _is(keys, VOCAB.key0, 64).all() and _is(values, VOCAB.value0, 64).all()
        assert len(set(keys.tolist())) == pairs and len(set(values.tolist())) == pairs
        lookup = dict(zip(keys.tolist(), values.tolist()))
        q = pos - 1
        assert (q >= 1 + 2 * pairs).all() and ((q - 1 - 2 * pairs) % 2 == 0).all()
        assert sorted(row[q].tolist()) == sorted(keys.tolist())  # every key once
        assert [lookup[k] for k in row[q].tolist()] == ans.tolist()  # value after each query
        rest = torch.ones(length, dtype=torch.bool)
        rest[: 1 + 2 * pairs] = False
        rest[q], rest[pos] = False, False
        assert _is(row[rest], VOCAB.filler0, 32).all()


def test_mqar_query_gaps_follow_the_power_law():
    length, pairs = 1024, 8
    space = (length - 1 - 2 * pairs) // 2
    gaps = lambda b: ((b.answer_pos - 2 - 2 * pairs) // 2).flatten().float()  # noqa: E731
    skewed = gaps(mqar(length, pairs, 200, seed=5, power_a=0.01))
    uniform = gaps(mqar(length, pairs, 200, seed=5, power_a=1.0))
    # p(g) ∝ (g+1)^(a-1): with a = 0.01 about 3/4 of single draws fall in the first quarter
    assert (skewed < space / 4).float().mean() > 0.6
    assert 0.15 < (uniform < space / 4).float().mean() < 0.35
    assert skewed.median() < uniform.median() / 4


def test_copy_scores_the_second_copy():
    b = copy(64, 3, seed=1, segment=10)
    for row, pos in zip(b.tokens, b.answer_pos):
        assert torch.equal(row[1:11], row[11:21]) and (row[1:21] >= VOCAB.digit0).all()
        assert len(set(row[1:11].tolist())) == 10  # distinct: each copy step is unambiguous
        assert pos.tolist() == list(range(12, 21))  # each predicted from the copy of its predecessor


def test_mixture_pads_answers_and_keeps_them_valid():
    b = mixture(256, 40, seed=9)
    assert b.tokens.shape == (40, 256) and b.answer_mask.any(-1).all()
    real = b.answer_pos[b.answer_mask]
    assert (real >= 1).all() and (real < 256).all()
    assert (b.targets[b.answer_mask] >= VOCAB.digit0).all()  # answers are never markers or padding
    n_answers = b.answer_mask.sum(-1)
    assert n_answers.max() > n_answers.min()  # the tasks' answer counts differ: padding was needed


@pytest.mark.parametrize("call,match", [
    (lambda: passkey(10, 0.5, 1), "too short"),
    (lambda: passkey(100, 1.5, 1), "depth"),
    (lambda: passkey(100, 0.5, 1, digits=11), "distinct"),
    (lambda: passkey(100, 0.5, 1, filler="lorem"), "filler"),
    (lambda: needle(100, 0.5, 1, distractors=30), "distinct keys"),
    (lambda: mqar(20, 8, 1), "too short"),
    (lambda: mqar(100, 4, 1, power_a=0.0), "power_a"),
    (lambda: copy(20, 1, segment=10), "segment"),
    (lambda: mixture(64, 2, weights=(1, 0, 0)), "four"),
    (lambda: passkey(100, 0.5, 0), "n must be"),
    (lambda: passkey(100, 0.5, 1, seed=-1), "seed"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
