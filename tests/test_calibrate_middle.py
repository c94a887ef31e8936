"""Lost in the middle: the multi-document task's layout, attention sorting, and
Found-in-the-Middle's positional calibration (per-document shares follow the calibrated relevance;
a zero bias or strength 0 changes nothing)."""

from __future__ import annotations

import pytest
import torch

from longattn.analysis import Site, dense_attend, retrieval_subject
from longattn.calibrate.middle import PositionCalibration, positional_bias, slot_attention
from longattn.calibrate.sorting import attention_sort, document_attention
from longattn.tasks import VOCAB, documents


def test_documents_layout_and_answers():
    b = documents(5, 3, 4, seed=1, doc_len=9, values=2)
    assert b.tokens.shape == (4, 1 + 5 * 9 + 3 + 2) and b.gold.tolist() == [3] * 4
    for s in range(4):
        row = b.tokens[s]
        assert row[0] == VOCAB.bos
        for i in range(5):
            assert row[b.doc_start(i)] == VOCAB.needle
        gold = row[b.doc_start(3):b.doc_start(4)]
        assert torch.equal(gold[1:4], row[-3:])           # key and values, asked and answered at the end
        assert torch.equal(b.targets[s], gold[2:4])
    assert b.needle_pos.tolist() == [b.doc_start(3)] * 4
    with pytest.raises(ValueError, match="gold"):
        documents(5, 5, 1)
    with pytest.raises(ValueError, match="distinct keys"):
        documents(40, 0, 1, values=2)


def test_permuting_documents_moves_the_gold_and_keeps_the_answer():
    b = documents(4, 1, 2, seed=0, doc_len=8)
    order = torch.tensor([[3, 2, 1, 0], [1, 0, 2, 3]])
    p = b.permuted(order)
    assert p.gold.tolist() == [2, 0]
    assert torch.equal(p.targets, b.targets)
    assert torch.equal(p.tokens[0, p.doc_start(0):p.doc_start(1)], b.tokens[0, b.doc_start(3):b.doc_start(4)])
    with pytest.raises(ValueError, match="permutation"):
        b.permuted(torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]))


def test_attention_sort_puts_the_most_attended_document_last():
    subject = retrieval_subject()
    b = documents(8, 2, 3, seed=4, doc_len=12)
    mass = document_attention(subject, b)
    assert mass.shape == (3, 8) and bool((mass >= 0).all())
    assert attention_sort(subject, b, rounds=0) is b
    once = attention_sort(subject, b, rounds=1)
    for s in range(3):
        top = int(mass[s].argmax())
        moved = once.tokens[s, once.doc_start(7):once.doc_start(8)]
        assert torch.equal(moved, b.tokens[s, b.doc_start(top):b.doc_start(top + 1)])
    with pytest.raises(ValueError, match="rounds"):
        attention_sort(subject, b, rounds=-1)


def _identity_values(t):
    """v = the identity over tokens: the attention output row is the attention distribution."""
    return torch.eye(t)[None, None]


def test_position_calibration_reweights_document_shares_as_defined():
    n_docs, doc_len = 3, 4
    t = 1 + n_docs * doc_len + 3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, t, t, generator=g)
    k = torch.randn(1, 1, t, t, generator=g)
    v = _identity_values(t)
    site = Site(0, 0.5, True)
    p = dense_attend(site, q, k, v)                                   # rows: the attention itself
    bias = torch.tensor([[[0.05, 0.0, 0.02]]])                        # [layers, heads, docs]
    got = PositionCalibration(bias, n_docs, doc_len)(site, q, k, v)
    end = 1 + n_docs * doc_len
    assert torch.equal(got[:, :, :end], p[:, :, :end])                # rows inside the documents: untouched
    for i in range(end, t):
        row, new = p[0, 0, i].double(), got[0, 0, i].double()
        assert float(new.sum()) == pytest.approx(1.0, abs=1e-5)
        mass = torch.stack([row[1 + d * doc_len:1 + (d + 1) * doc_len].sum() for d in range(n_docs)])
        cal = (mass - bias[0, 0].double()).clamp_min(0)
        cal = cal * mass.sum() / cal.sum()
        new_mass = torch.stack([new[1 + d * doc_len:1 + (d + 1) * doc_len].sum() for d in range(n_docs)])
        assert torch.allclose(new_mass, cal, atol=1e-5)
        outside = torch.cat([row[:1], row[end:]])
        assert torch.allclose(torch.cat([new[:1], new[end:]]), outside, atol=1e-6)   # BOS, question: kept


def test_position_calibration_with_zero_bias_or_strength_changes_nothing():
    subject = retrieval_subject()
    b = documents(6, 1, 2, seed=3, doc_len=10)
    base = subject.run(b.tokens)
    zero = PositionCalibration(torch.zeros(2, 4, 6), 6, 10)
    assert torch.allclose(subject.run(b.tokens, zero), base, atol=1e-4)
    off = PositionCalibration(torch.full((2, 4, 6), 0.3), 6, 10, strength=0.0)
    assert torch.equal(subject.run(b.tokens, off), base)


def test_positional_bias_is_the_mean_attention_on_documents_that_do_not_answer():
    subject = retrieval_subject()
    batches = [documents(5, g, 2, seed=g, doc_len=10) for g in (0, 4)]
    bias = positional_bias(subject, batches)
    assert bias.shape == (2, 4, 5)
    att = torch.cat([slot_attention(subject, b) for b in batches])    # [4, L, H, 5]
    gold = torch.cat([b.gold for b in batches])
    manual = torch.stack([att[gold != d, :, :, d].mean(0) for d in range(5)], -1)
    assert torch.allclose(bias, manual, atol=1e-6)


def test_position_calibration_checks_its_bias():
    with pytest.raises(ValueError, match="n_docs=4"):
        PositionCalibration(torch.zeros(2, 4, 3), 4, 8)
    with pytest.raises(ValueError, match="strength"):
        PositionCalibration(torch.zeros(2, 4, 4), 4, 8, strength=2.0)
