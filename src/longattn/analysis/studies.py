"""The experiments ``longattn analyze`` runs, each a function of a ``Subject`` that returns plain
numbers (JSON-ready):

* :func:`layer_statistics` — :class:`~longattn.analysis.stats.HeadStats` of every layer, averaged
  over several inputs;
* :func:`bert_look` — Clark et al. 2019's per-layer shares ([CLS], [SEP], punctuation, previous /
  next token) of an encoder over real sentences;
* :func:`ablation_curves` — Wu et al. 2024's causality test: task accuracy with the top-k retrieval
  heads masked against k random non-retrieval heads;
* :func:`act_perplexity`, :func:`act_task` — ACT's effect, heads chosen on a calibration set and
  measured on held-out inputs.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from typing import Any

import torch

from longattn.analysis.capture import Head, ablate, capture
from longattn.analysis.retrieval_heads import RetrievalScores
from longattn.analysis.stats import ACT_ALPHA, head_statistics
from longattn.analysis.subject import Attend, Subject

Tensor = torch.Tensor
Say = Callable[[str], None]

STAT_NAMES = ("first_token", "sinks", "entropy", "distance", "previous", "same", "next", "peak")


def layer_statistics(subject: Subject, inputs: Sequence[Tensor], *, classes: Callable[[Tensor], dict] | None = None,
                     alpha: float = ACT_ALPHA, say: Say | None = None) -> dict[str, Any]:
    """Every :class:`HeadStats` field as ``[layers][heads]`` lists, averaged over ``inputs`` (each
    ``[1, T]``, run one at a time; q/k captured, statistics streamed one layer at a time).
    ``classes(tokens) -> {name: bool [1, T]}`` adds token-class shares. Sink positions are those of
    the first input."""
    say = say or (lambda msg: None)
    sums: dict[str, Tensor] = {}
    sink_positions: list = []
    for n, tokens in enumerate(inputs):
        say(f"statistics: input {n + 1}/{len(inputs)} ({tokens.shape[1]} tokens)")
        cls = classes(tokens) if classes else None
        rec = capture(subject, tokens)
        for layer in range(subject.n_layers):
            c = rec.pop(layer)
            st = head_statistics(c.q, c.k, scale=c.site.scale, causal=c.site.causal,
                                 key_padding_mask=c.site.key_padding_mask, classes=cls, alpha=alpha)
            for name in STAT_NAMES:
                sums.setdefault(name, torch.zeros(subject.n_layers, subject.n_heads))[layer] += getattr(st, name)
            for name, v in st.shares.items():
                sums.setdefault(f"share:{name}", torch.zeros(subject.n_layers, subject.n_heads))[layer] += v
            if n == 0:
                sink_positions.append(st.sink_positions)
    out = {name: (v / len(inputs)).tolist() for name, v in sums.items()}
    out["sink_positions"] = sink_positions
    out["inputs"] = len(inputs)
    out["tokens"] = [int(t.shape[1]) for t in inputs]
    return out


# --------------------------------------------------------------------------------------------
# What does BERT look at?


def bert_look(subject: Subject, sentences: Sequence[str], *, say: Say | None = None) -> dict[str, Any]:
    """Clark et al. 2019 on an encoder with a BERT tokenizer: per head (and per layer, the mean over
    heads) the attention share on [CLS], [SEP], punctuation and the previous / same / next token,
    and the entropy, over ``sentences`` (one at a time, no padding)."""
    tok = getattr(subject, "tokenizer", None)
    if tok is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise ValueError(f"{subject.name} has no BERT-style tokenizer with [CLS] and [SEP]")
    punct = {i for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(tok.vocab_size))))
             if piece and all(ch in string.punctuation for ch in piece)}
    punct_ids = torch.tensor(sorted(punct))

    def classes(tokens: Tensor) -> dict[str, Tensor]:
        return {"[CLS]": tokens == tok.cls_token_id, "[SEP]": tokens == tok.sep_token_id,
                "punctuation": torch.isin(tokens, punct_ids)}

    inputs = [tok([s], return_tensors="pt")["input_ids"] for s in sentences]
    stats = layer_statistics(subject, inputs, classes=classes, say=say)
    per_layer = {name: [sum(row) / len(row) for row in stats[key]] for name, key in
                 (("[CLS]", "share:[CLS]"), ("[SEP]", "share:[SEP]"), ("punctuation", "share:punctuation"),
                  ("previous", "previous"), ("same", "same"), ("next", "next"), ("entropy", "entropy"))}
    return {"sentences": len(sentences), "mean_tokens": sum(stats["tokens"]) / len(inputs), "per_layer": per_layer,
            "statistics": stats}


# --------------------------------------------------------------------------------------------
# retrieval heads: masking experiment


def task_accuracy(subject: Subject, batches: Sequence, attend: Attend | None = None) -> float:
    """Share of samples of ``tasks.synthetic`` batches whose every answer token is the argmax."""
    right = total = 0
    for b in batches:
        logits = subject.run(b.tokens, attend)
        pred = logits.gather(1, (b.answer_pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
        right += int(((pred == b.targets) | ~b.answer_mask).all(-1).sum())
        total += b.n
    return right / max(1, total)


def ablation_curves(subject: Subject, scores: RetrievalScores, score: Callable[[Attend | None], float], *,
                    ks: Sequence[int] | None = None, draws: int = 5, seed: int = 0,
                    say: Say | None = None) -> dict[str, Any]:
    """``score(attend)`` (an accuracy) with the ``k`` highest-scoring heads masked, and with ``k``
    heads drawn at random from the non-retrieval heads (score ≤ the threshold; ``draws`` draws,
    mean and each), for each ``k`` (default 0, 1, 2, 4, 8, 16 and the number of retrieval heads)."""
    say = say or (lambda msg: None)
    ranked = scores.ranked()
    retrieval = set(scores.retrieval_heads())
    others = [h for h in subject.heads() if h not in retrieval]
    ks = list(ks) if ks is not None else sorted({0, 1, 2, 4, 8, 16, len(retrieval)} & set(range(len(ranked) + 1)))
    rng = random.Random(seed)
    rows = []
    for k in ks:
        top = score(ablate(ranked[:k]) if k else None)
        rand = [score(ablate(rng.sample(others, k))) for _ in range(draws if 0 < k <= len(others) else 0)]
        rows.append({"k": k, "top": top, "masked": [list(h) for h in ranked[:k]], "random": rand,
                     "random_mean": sum(rand) / len(rand) if rand else (top if k == 0 else None)})
        say(f"ablation k={k}: top-k retrieval heads masked {top:.3f}, random non-retrieval "
            + (f"{rows[-1]['random_mean']:.3f}" if rows[-1]["random_mean"] is not None else "n/a"))
    return {"rows": rows, "retrieval_heads": [list(h) for h in sorted(retrieval)], "non_retrieval": len(others)}


def copy_accuracy(subject: Subject, probe, attend: Attend | None = None) -> float:
    """Share of a ``CopyProbe``'s answer tokens the model predicts (teacher-forced argmax)."""
    logits = subject.run(probe.tokens, attend)
    pred = logits.gather(1, (probe.answer_pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
    hit = (pred == probe.tokens.gather(1, probe.answer_pos)) & probe.answer_mask
    return float(hit.sum()) / max(1, int(probe.answer_mask.sum()))


# --------------------------------------------------------------------------------------------
# ACT


def mean_nll(subject: Subject, tokens: Tensor, attend: Attend | None = None) -> float:
    """Mean next-token negative log-likelihood (nats) of ``tokens [B, T]``."""
    logits = subject.run(tokens, attend)
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten()))


def act_perplexity(subject: Subject, calibration: Sequence[Tensor], evaluation: dict[str, Tensor], *,
                   factor: float | None = None, say: Say | None = None) -> dict[str, Any]:
    """ACT on a language model: heads chosen to lower the mean NLL of ``calibration`` inputs, then
    perplexity of each ``evaluation`` input (``{label: [1, T]}``) with and without it."""
    from longattn.calibrate.act import ACT, ACT_FACTOR, select_heads

    factor = ACT_FACTOR if factor is None else factor

    def loss(attend: Attend) -> float:
        return sum(mean_nll(subject, t, attend) for t in calibration) / len(calibration)

    heads, gains = select_heads(subject, loss, factor=factor, min_gain=1e-4, progress=say)
    act = ACT(heads, factor=factor)
    rows = {}
    for label, tokens in evaluation.items():
        base, cal = mean_nll(subject, tokens), mean_nll(subject, tokens, act)
        rows[label] = {"tokens": int(tokens.shape[1]), "perplexity": math.exp(base), "act_perplexity": math.exp(cal)}
        if say:
            say(f"ACT {label}: perplexity {math.exp(base):.4f} -> {math.exp(cal):.4f}")
    return {"heads": [list(h) for h in heads], "factor": factor, "gains": {f"{h[0]},{h[1]}": g for h, g in gains.items()},
            "evaluation": rows}


def act_task(subject: Subject, calibration: Sequence, evaluation: dict[str, Sequence], *, factor: float | None = None,
             say: Say | None = None) -> dict[str, Any]:
    """ACT on a task model: heads chosen to lower the answer loss on ``calibration`` batches, then
    the accuracy on each ``evaluation`` set (``{label: [batches]}``) with and without it."""
    from longattn.calibrate.act import ACT, ACT_FACTOR, select_heads

    factor = ACT_FACTOR if factor is None else factor

    def loss(attend: Attend) -> float:
        total = 0.0
        for b in calibration:
            logits = subject.run(b.tokens, attend)
            at = logits.gather(1, (b.answer_pos - 1)[..., None].expand(-1, -1, logits.shape[-1]))
            total += float(torch.nn.functional.cross_entropy(at[b.answer_mask].double(), b.targets[b.answer_mask]))
        return total / len(calibration)

    heads, gains = select_heads(subject, loss, factor=factor, min_gain=1e-4, progress=say)
    act = ACT(heads, factor=factor)
    rows = {}
    for label, batches in evaluation.items():
        rows[label] = {"accuracy": task_accuracy(subject, batches), "act_accuracy": task_accuracy(subject, batches, act)}
        if say:
            say(f"ACT {label}: accuracy {rows[label]['accuracy']:.3f} -> {rows[label]['act_accuracy']:.3f}")
    return {"heads": [list(h) for h in heads], "factor": factor, "gains": {f"{h[0]},{h[1]}": g for h, g in gains.items()},
            "evaluation": rows}


def heads_text(heads: Sequence[Head]) -> str:
    """``"L1H0, L1H2"``."""
    return ", ".join(f"L{h[0]}H{h[1]}" for h in heads) or "none"


# --------------------------------------------------------------------------------------------
# head maps at equal KV budget


def head_map_comparison(subject: Subject, retrieval: RetrievalScores, *, score: Callable[[Attend | None], float],
                        higher_is_better: bool, calibration: Sequence[Tensor], calibration_rows: Sequence | None = None,
                        length: int, share: float = 0.25, sinks: int = 4, window: int = 64,
                        uniforms: Sequence[int] = (64, 128, 256), calib_samples: int = 8,
                        say: Say | None = None) -> dict[str, Any]:
    """The ``heads`` KV policy under head maps from retrieval scores, RazorAttention and DuoAttention
    scores (``share`` of key heads full, the rest sinks + ``window``: one budget for all three), and
    MoA-style per-head windows against one uniform window at the same total (each of ``uniforms``).
    ``score(attend)`` is the task measure (accuracy, or NLL)."""
    from longattn.calibrate.heads import head_scores, kept_keys, moa_windows, policy_attend, top_share

    say = say or (lambda msg: None)
    n_l, n_kv = subject.n_layers, subject.n_kv_heads
    maps = {"retrieval score": retrieval.head_map(n_kv, share)["retrieval"]}
    calib_len = min(384, length)
    for method in ("razor", "duo"):
        maps[method] = top_share(head_scores(subject, method, n_samples=calib_samples, length=calib_len,
                                             span=min(16, calib_len // 8), window=min(64, calib_len // 4)), share)
    rows = [{"map": "dense (all full)", "kept_keys": n_l * n_kv * length, "score": score(None)}]
    for name, m in maps.items():
        rows.append({"map": name, "head_map": m, "kept_keys": kept_keys(m, n_l, n_kv, length, sinks=sinks, window=window),
                     "score": score(policy_attend(m, n_l, n_kv, sinks=sinks, window=window))})
        say(f"head map {name}: {rows[-1]['score']:.4f} at {rows[-1]['kept_keys']} kept keys")
    moa_rows = []
    for u in uniforms:
        moa = moa_windows(subject, calibration, uniform=u, sinks=sinks, rows=calibration_rows)
        uni = score(policy_attend([[u] * n_kv] * n_l, n_l, n_kv, sinks=sinks))
        got = score(policy_attend(moa["windows"], n_l, n_kv, sinks=sinks))
        moa_rows.append({"uniform": u, "uniform_score": uni, "moa_score": got, "windows": moa["windows"],
                         "uniform_coverage": moa["uniform_coverage"], "moa_coverage": moa["moa_coverage"]})
        say(f"MoA at {u} keys per head: uniform {uni:.4f}, elastic {got:.4f} (windows {moa['windows']})")
    return {"share": share, "sinks": sinks, "window": window, "length": length, "maps": rows, "moa": moa_rows,
            "higher_is_better": higher_is_better}


# --------------------------------------------------------------------------------------------
# lost in the middle, then found


def lost_in_the_middle(subject: Subject, *, n_docs: int, doc_len: int, values: int = 2, positions: Sequence[int],
                       n: int = 16, calib_every: int = 3, calib_n: int = 4, rounds: int = 2, seed: int = 0,
                       say: Say | None = None) -> dict[str, Any]:
    """Accuracy against the gold document's position on ``tasks.synthetic.documents``: the model as
    it is, with Found-in-the-Middle's attention calibration (bias measured on separate samples),
    and after attention sorting (``rounds``); plus the gold document's recall@1 when documents are
    ranked by raw and by calibrated attention."""
    from longattn.calibrate.middle import PositionCalibration, accuracy_by_position, calibrated_relevance, positional_bias
    from longattn.calibrate.sorting import attention_sort
    from longattn.tasks.synthetic import documents

    say = say or (lambda msg: None)

    def make(gold: int):
        return documents(n_docs, gold, n, seed=seed + 10_000 + gold, doc_len=doc_len, values=values)

    calib = [documents(n_docs, g, calib_n, seed=seed + 20_000 + g, doc_len=doc_len, values=values)
             for g in range(0, n_docs, calib_every)]
    bias = positional_bias(subject, calib)
    length = 1 + n_docs * doc_len + 3 + values
    say(f"lost in the middle: {n_docs} documents of {doc_len} tokens ({length} tokens)")
    dense = accuracy_by_position(subject, make, positions)
    fitm = accuracy_by_position(subject, make, positions, PositionCalibration(bias, n_docs, doc_len))
    sort = accuracy_by_position(subject, make, positions, transform=lambda b: attention_sort(subject, b, rounds))
    raw_hits = cal_hits = total = 0
    for g in positions:
        b = make(g)
        raw, cal = calibrated_relevance(subject, b, bias)
        raw_hits += int((raw.argmax(1) == b.gold).sum())
        cal_hits += int((cal.argmax(1) == b.gold).sum())
        total += b.n
    say(f"  accuracy by gold position: as is {[round(a, 2) for a in dense]}, calibrated "
        f"{[round(a, 2) for a in fitm]}, sorted {[round(a, 2) for a in sort]}")
    return {"n_docs": n_docs, "doc_len": doc_len, "values": values, "length": length, "positions": list(positions),
            "n": n, "dense": dense, "found_in_the_middle": fitm, "attention_sorting": sort, "sort_rounds": rounds,
            "bias": bias.mean((0, 1)).tolist(), "recall_at_1_raw": raw_hits / total,
            "recall_at_1_calibrated": cal_hits / total}
