"""Seeded synthetic retrieval tasks over one small fixed vocabulary: passkey, needle-in-a-haystack,
multi-query associative recall (MQAR), the copy task, and the training mixture of the four.

Sources of the task designs:

* passkey — Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length
  for Transformers": a number hidden in repeated filler ("The grass is green. The sky is blue. The
  sun is yellow. Here we go. There and back again."), asked for at the end.
* needle-in-a-haystack — Kamradt 2023 (the "needle in a haystack" test), in the key–value form of
  RULER (Hsieh et al. 2024): "the special magic number for KEY is VALUE" hidden at a depth,
  with distractor needles for other keys.
* MQAR — Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
  Models": key–value pairs up front, then each key queried once at a power-law distributed gap.
* copy — a random segment repeated (the induction-head probe of Olsson et al. 2022); used to
  start training, where it forms the induction circuit the three retrieval tasks rely on.

The vocabulary (``VOCAB``, 176 ids)::

    0  <pad>     1 <bos>       2 <passkey> ("the pass key is")      3 <needle> ("the magic number for")
    4  <question> ("what is ...?")                                   5 <end> (closes a needle sentence)
    6 … 15       the digits 0 … 9 (passkey answers)
    16 … 47      32 filler words: the 16 words of the passkey passage, then 16 more for random filler
    48 … 111     64 MQAR / needle keys   ("k00" … "k63")
    112 … 175    64 MQAR / needle values ("v00" … "v63")

Why the answers are built as they are: a small model retrieves by *induction* (Olsson et al. 2022,
"In-context Learning and Induction Heads"): at token ``x`` it attends to the token that followed an
earlier ``x`` and copies it. Every answer token is therefore predicted from a token that occurs
exactly once earlier in the sequence, so "the token after the previous occurrence" names one answer:

* passkey digits are *distinct* within a passkey and digits never occur in filler — predicting the
  digit after ``d_i`` in the question needs ``d_i`` to be unique, else the copy is ambiguous;
* needle keys are distinct across the needles of a sample, values distinct across all needles, and
  keys/values/markers never occur in filler;
* MQAR keys and values are drawn without replacement and every key is queried once. (Zoology fills
  the non-query slots with random tokens of the whole vocabulary, which may repeat a key; here they
  hold filler words, so no slot can be mistaken for a pair. Zoology also leaves a random token
  after each query, where here the value follows, as in a teacher-forced answer; the prediction
  at the query does not see it.)

All generators return a ``TaskBatch``: ``tokens [n, length]`` and the answer positions to score.
The logits at ``answer_pos - 1`` predict the answers; a teacher-forced argmax on every answer token
is exactly a greedy decode of the answer, since a causal model's prediction at a position depends
only on the tokens before it. (Block-sparse methods share one key selection per query block, which
may look at keys of later queries in the block; with them the equality holds per query block.)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor

# the passkey passage (Mohtashami & Jaggi 2023), tokenised into words and full stops: 24 tokens
PASSAGE = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again .".split()
_MORE_FILLER = ("a tree river stone bird sings old red slowly under over wind rain small house road").split()


@dataclass(frozen=True)
class Vocab:
    """Id ranges of the fixed vocabulary (see the module docstring)."""

    pad: int = 0
    bos: int = 1
    passkey: int = 2
    needle: int = 3
    question: int = 4
    end: int = 5
    digit0: int = 6
    n_digits: int = 10
    filler0: int = 16
    n_filler: int = 32
    key0: int = 48
    n_keys: int = 64
    value0: int = 112
    n_values: int = 64

    @property
    def size(self) -> int:
        return self.value0 + self.n_values

    def digits(self) -> np.ndarray:
        return np.arange(self.digit0, self.digit0 + self.n_digits)

    def filler(self) -> np.ndarray:
        return np.arange(self.filler0, self.filler0 + self.n_filler)

    def keys(self) -> np.ndarray:
        return np.arange(self.key0, self.key0 + self.n_keys)

    def values(self) -> np.ndarray:
        return np.arange(self.value0, self.value0 + self.n_values)

    def words(self) -> list[str]:
        """The string of every id (index = id)."""
        words = ["<pad>", "<bos>", "<passkey>", "<needle>", "<question>", "<end>"]
        words += [str(d) for d in range(self.n_digits)]
        seen = list(dict.fromkeys(PASSAGE))
        words += seen + list(_MORE_FILLER)
        words += [f"k{i:02d}" for i in range(self.n_keys)] + [f"v{i:02d}" for i in range(self.n_values)]
        return words

    def passage(self) -> np.ndarray:
        """The passkey passage as ids (24 tokens)."""
        index = {w: i for i, w in enumerate(self.words())}
        return np.array([index[w] for w in PASSAGE])

    def decode(self, tokens) -> str:
        """Readable text of a 1-D sequence of ids (for debugging and reports)."""
        words = self.words()
        return " ".join(words[int(t)] for t in tokens)


VOCAB = Vocab()
assert len(VOCAB.words()) == VOCAB.size and len(set(PASSAGE)) + len(_MORE_FILLER) == VOCAB.n_filler

_FILLER_MODES = ("repeat", "random")
# one stream per task, so passkey(…, seed=0) and needle(…, seed=0) do not share draws
_TASK_TAG = {"passkey": 1, "needle": 2, "mqar": 3, "mixture": 4, "copy": 5, "documents": 6}


@dataclass
class TaskBatch:
    """A batch of one task at one length.

    Attributes:
        task: "passkey", "needle", "mqar", "copy" or "mixture".
        tokens: int64 ``[n, length]``.
        answer_pos: int64 ``[n, m]`` positions of the answer tokens; the logits at
            ``answer_pos - 1`` predict them. Padding entries (``answer_mask`` False) hold 1.
        answer_mask: bool ``[n, m]``: True where ``answer_pos`` is a real answer.
        needle_pos: int64 ``[n]`` first token of the (queried) needle; -1 for MQAR.
        depth: the requested depth (None for MQAR and mixtures).
    """

    task: str
    tokens: Tensor
    answer_pos: Tensor
    answer_mask: Tensor
    needle_pos: Tensor
    depth: float | None = None

    @property
    def targets(self) -> Tensor:
        """int64 ``[n, m]``: the answer tokens (at padding entries: the token at position 1)."""
        return self.tokens.gather(1, self.answer_pos)

    @property
    def n(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def take(self, i0: int, i1: int) -> "TaskBatch":
        """Samples ``i0 … i1-1``."""
        return TaskBatch(self.task, self.tokens[i0:i1], self.answer_pos[i0:i1], self.answer_mask[i0:i1],
                         self.needle_pos[i0:i1], self.depth)


# --------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_depth(depth: object) -> float:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] (share of the filler before the needle), got {depth!r}")
    return float(depth)


def _check_filler(filler: str) -> str:
    if filler not in _FILLER_MODES:
        raise ValueError(f"filler must be one of {_FILLER_MODES}, got {filler!r}")
    return filler


def _rng(task: str, seed: object) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), _TASK_TAG[task]])


def _filler(rng: np.random.Generator, count: int, mode: str) -> np.ndarray:
    """``count`` filler ids: the passkey passage repeated from a random phase, or i.i.d. words."""
    if mode == "repeat":
        passage = VOCAB.passage()
        phase = int(rng.integers(len(passage)))
        reps = math.ceil((count + phase) / len(passage))
        return np.tile(passage, reps)[phase:phase + count]
    return rng.choice(VOCAB.filler(), size=count)


def _batch(task, rows, answers, needles, depth) -> TaskBatch:
    m = max(len(a) for a in answers)
    pos = torch.ones(len(rows), m, dtype=torch.int64)
    mask = torch.zeros(len(rows), m, dtype=torch.bool)
    for i, a in enumerate(answers):
        pos[i, :len(a)] = torch.as_tensor(a, dtype=torch.int64)
        mask[i, :len(a)] = True
    tokens = torch.as_tensor(np.stack(rows), dtype=torch.int64)
    return TaskBatch(task, tokens, pos, mask, torch.as_tensor(needles, dtype=torch.int64), depth)


# --------------------------------------------------------------------------------------------
# the tasks


def passkey(length: int, depth: float, n: int, seed: int = 0, *, digits: int = 5,
            filler: str = "repeat") -> TaskBatch:
    """Passkey retrieval (Mohtashami & Jaggi 2023).

    Layout (``F`` filler tokens, ``round(depth·F)`` of them before the needle)::

        <bos> filler… <passkey> d1 … dk <end> filler… <question> <passkey> d1 … dk

    Args:
        length: tokens per sample (>= ``2·digits + 6``).
        depth: share of the filler before the needle, in ``[0, 1]``.
        n: samples. seed: the draw (same seed → same tokens).
        digits: passkey length, distinct digits (1 … 10).
        filler: "repeat" (the passage, from a random phase) or "random" (i.i.d. filler words).

    Returns:
        a ``TaskBatch`` whose answers are the last ``digits`` tokens.
    """
    length, n = _check_int("length", length, 1), _check_int("n", n, 1)
    depth, filler = _check_depth(depth), _check_filler(filler)
    digits = _check_int("digits", digits, 1)
    if digits > VOCAB.n_digits:
        raise ValueError(f"digits must be <= {VOCAB.n_digits} (the passkey's digits are distinct), got {digits}")
    fill = length - 2 * digits - 5
    if fill < 1:
        raise ValueError(f"length={length} is too short for a {digits}-digit passkey: need >= {2 * digits + 6}")
    rng = _rng("passkey", seed)
    rows, answers, needles = [], [], []
    for _ in range(n):
        key = rng.choice(VOCAB.digits(), size=digits, replace=False)
        f = _filler(rng, fill, filler)
        off = round(depth * fill)
        row = np.concatenate([[VOCAB.bos], f[:off], [VOCAB.passkey], key, [VOCAB.end], f[off:],
                              [VOCAB.question, VOCAB.passkey], key])
        rows.append(row)
        answers.append(np.arange(length - digits, length))
        needles.append(1 + off)
    return _batch("passkey", rows, answers, needles, depth)


def needle(length: int, depth: float, n: int, seed: int = 0, *, values: int = 3, distractors: int = 2,
           filler: str = "repeat") -> TaskBatch:
    """Needle in a haystack, key–value form (Kamradt 2023; RULER's multi-key variant).

    Layout: filler with ``1 + distractors`` needle sentences ``<needle> key v1 … vm <end>`` (the
    queried one at ``round(depth·F)`` filler tokens, the distractors at uniform filler offsets),
    then the question ``<question> <needle> key v1 … vm``; the ``m`` values are scored.

    Args:
        length: tokens per sample. depth: share of the filler before the queried needle.
        n, seed: as for ``passkey``.
        values: value tokens per needle (>= 1). distractors: other needles, with other keys.
        filler: as for ``passkey``.
    """
    length, n = _check_int("length", length, 1), _check_int("n", n, 1)
    depth, filler = _check_depth(depth), _check_filler(filler)
    values = _check_int("values", values, 1)
    distractors = _check_int("distractors", distractors, 0)
    needles_per = 1 + distractors
    if needles_per > VOCAB.n_keys or needles_per * values > VOCAB.n_values:
        raise ValueError(f"{needles_per} needles of {values} values need distinct keys and values: at most "
                         f"{VOCAB.n_keys} keys and {VOCAB.n_values} values exist")
    sent = values + 3
    fill = length - 1 - needles_per * sent - sent
    if fill < 1:
        raise ValueError(f"length={length} is too short for {needles_per} needles of {values} values: "
                         f"need >= {2 + needles_per * sent + sent}")
    rng = _rng("needle", seed)
    rows, answers, needle_pos = [], [], []
    for _ in range(n):
        keys = rng.choice(VOCAB.keys(), size=needles_per, replace=False)
        vals = rng.choice(VOCAB.values(), size=(needles_per, values), replace=False)
        f = _filler(rng, fill, filler)
        offsets = np.concatenate([[round(depth * fill)], rng.integers(0, fill + 1, size=distractors)])
        # insertion order: by filler offset; the queried needle (index 0) first among ties
        order = sorted(range(needles_per), key=lambda j: (offsets[j], j))
        parts, at, start = [np.array([VOCAB.bos])], 0, -1
        for j in order:
            parts.append(f[at:offsets[j]])
            if j == 0:
                start = 1 + offsets[j] + sent * order.index(0)
            parts.append(np.concatenate([[VOCAB.needle, keys[j]], vals[j], [VOCAB.end]]))
            at = offsets[j]
        parts.append(f[at:])
        parts.append(np.concatenate([[VOCAB.question, VOCAB.needle, keys[0]], vals[0]]))
        rows.append(np.concatenate(parts))
        answers.append(np.arange(length - values, length))
        needle_pos.append(start)
    return _batch("needle", rows, answers, needle_pos, depth)


@dataclass
class DocumentsBatch(TaskBatch):
    """A ``documents`` batch: ``n_docs`` documents of ``doc_len`` tokens each starting at token 1
    (document ``i`` spans ``1 + i·doc_len … 1 + (i+1)·doc_len − 1``), the question after them;
    ``gold [n]`` is the index of the document the question asks about."""

    n_docs: int = 0
    doc_len: int = 0
    gold: Tensor | None = None

    def take(self, i0: int, i1: int) -> "DocumentsBatch":
        return DocumentsBatch(self.task, self.tokens[i0:i1], self.answer_pos[i0:i1], self.answer_mask[i0:i1],
                              self.needle_pos[i0:i1], self.depth, self.n_docs, self.doc_len, self.gold[i0:i1])

    def doc_start(self, i: int) -> int:
        """First token of document ``i``."""
        return 1 + i * self.doc_len

    def permuted(self, order: Tensor) -> "DocumentsBatch":
        """The same samples with their documents in ``order [n, n_docs]`` (``order[s, j]`` = the old
        index of the document placed at slot ``j``); the question and answers are unchanged."""
        tokens = self.tokens.clone()
        gold = torch.empty_like(self.gold)
        for s in range(self.n):
            perm = order[s].tolist()
            if sorted(perm) != list(range(self.n_docs)):
                raise ValueError(f"order[{s}] must be a permutation of 0..{self.n_docs - 1}, got {perm}")
            for j, old in enumerate(perm):
                tokens[s, self.doc_start(j):self.doc_start(j + 1)] = self.tokens[s, self.doc_start(old):self.doc_start(old + 1)]
            gold[s] = perm.index(int(self.gold[s]))
        return DocumentsBatch(self.task, tokens, self.answer_pos, self.answer_mask,
                              torch.tensor([self.doc_start(int(g)) for g in gold]), self.depth, self.n_docs,
                              self.doc_len, gold)


def documents(n_docs: int, gold: int, n: int, seed: int = 0, *, doc_len: int = 24, values: int = 2,
              filler: str = "random") -> DocumentsBatch:
    """Multi-document key–value retrieval, the synthetic form of Liu et al. 2023 ("Lost in the
    Middle"): ``n_docs`` documents, one of which answers the question, at document index ``gold``.

    Layout: ``<bos>``, then ``n_docs`` documents of ``doc_len`` tokens, each
    ``<needle> key v1 … vm <end>`` followed by filler words (distinct keys and values across the
    documents), then the question ``<question> <needle> key_gold v1 … vm``; the ``m`` values are
    scored. Length: ``1 + n_docs·doc_len + 3 + values``.

    Args:
        n_docs: documents (1 … 64). gold: index of the answering document, ``0 … n_docs − 1``.
        n, seed: samples and the draw. doc_len: tokens per document (``>= values + 3``).
        values: value tokens per document. filler: "random" or "repeat" (the passkey passage).
    """
    n_docs, n = _check_int("n_docs", n_docs, 1), _check_int("n", n, 1)
    values = _check_int("values", values, 1)
    doc_len = _check_int("doc_len", doc_len, values + 3)
    filler = _check_filler(filler)
    if isinstance(gold, bool) or not isinstance(gold, numbers.Integral) or not 0 <= gold < n_docs:
        raise ValueError(f"gold must be a document index in [0, {n_docs - 1}], got {gold!r}")
    if n_docs > VOCAB.n_keys or n_docs * values > VOCAB.n_values:
        raise ValueError(f"{n_docs} documents of {values} values need distinct keys and values: at most "
                         f"{VOCAB.n_keys} keys and {VOCAB.n_values} values exist")
    rng = _rng("documents", seed)
    rows, answers, needles = [], [], []
    for _ in range(n):
        keys = rng.choice(VOCAB.keys(), size=n_docs, replace=False)
        vals = rng.choice(VOCAB.values(), size=(n_docs, values), replace=False)
        docs = [np.concatenate([[VOCAB.needle, keys[i]], vals[i], [VOCAB.end],
                                _filler(rng, doc_len - values - 3, filler)]) for i in range(n_docs)]
        row = np.concatenate([[VOCAB.bos], *docs, [VOCAB.question, VOCAB.needle, keys[gold]], vals[gold]])
        rows.append(row)
        answers.append(np.arange(len(row) - values, len(row)))
        needles.append(1 + gold * doc_len)
    base = _batch("documents", rows, answers, needles, gold / max(1, n_docs - 1))
    return DocumentsBatch(base.task, base.tokens, base.answer_pos, base.answer_mask, base.needle_pos, base.depth,
                          n_docs, doc_len, torch.full((n,), int(gold), dtype=torch.int64))


def mqar(length: int, n_pairs: int, n: int, seed: int = 0, *, power_a: float = 0.01) -> TaskBatch:
    """Multi-query associative recall as set up in Zoology (Arora et al. 2023).

    Layout: ``<bos> k1 v1 … kN vN`` (distinct keys and values), then a query region of slot pairs.
    Each key is queried once, at slot pair ``g`` (token ``1 + 2N + 2g``) followed by its value;
    the gaps ``g`` are drawn without replacement with ``p(g) ∝ (g+1)^(power_a - 1)``, so with the
    default ``power_a = 0.01`` most queries sit soon after the pairs and a few far away. The other
    slots hold filler words. The values after the queries are scored.

    Args:
        length: tokens per sample. n_pairs: ``N`` key–value pairs (1 … 64).
        n, seed: as for ``passkey``. power_a: Zoology's power-law exponent, in ``(0, 1]``
            (1 = uniform gaps).
    """
    length, n = _check_int("length", length, 1), _check_int("n", n, 1)
    n_pairs = _check_int("n_pairs", n_pairs, 1)
    if n_pairs > min(VOCAB.n_keys, VOCAB.n_values):
        raise ValueError(f"n_pairs must be <= {min(VOCAB.n_keys, VOCAB.n_values)} (distinct keys), got {n_pairs}")
    if isinstance(power_a, bool) or not isinstance(power_a, numbers.Real) or not 0.0 < power_a <= 1.0:
        raise ValueError(f"power_a must be a number in (0, 1], got {power_a!r}")
    space = (length - 1 - 2 * n_pairs) // 2
    if space < n_pairs:
        raise ValueError(f"length={length} is too short for {n_pairs} pairs and their queries: need >= {1 + 4 * n_pairs}")
    rng = _rng("mqar", seed)
    p = float(power_a) * np.arange(1, space + 1, dtype=np.float64) ** (float(power_a) - 1.0)
    p /= p.sum()
    rows, answers = [], []
    for _ in range(n):
        keys = rng.choice(VOCAB.keys(), size=n_pairs, replace=False)
        vals = rng.choice(VOCAB.values(), size=n_pairs, replace=False)
        gaps = rng.choice(space, size=n_pairs, replace=False, p=p)
        row = np.empty(length, dtype=np.int64)
        row[0] = VOCAB.bos
        row[1:1 + 2 * n_pairs:2], row[2:2 + 2 * n_pairs:2] = keys, vals
        row[1 + 2 * n_pairs:] = rng.choice(VOCAB.filler(), size=length - 1 - 2 * n_pairs)
        q = 1 + 2 * n_pairs + 2 * gaps
        row[q], row[q + 1] = keys, vals
        rows.append(row)
        answers.append(np.sort(q + 1))
    return _batch("mqar", rows, answers, [-1] * n, None)


def copy(length: int, n: int, seed: int = 0, *, segment: int | None = None) -> TaskBatch:
    """Repeated random segment (the classic induction-head probe, Olsson et al. 2022):
    ``<bos> s1 … sk s1 … sk filler…`` with ``s`` *distinct* ids drawn from every non-special id
    (digits, filler words, keys, values — distinct so that each copied token is unambiguous); the
    second copy after its first token is scored (``k - 1`` answers).

    It is in the training mixture because every scored token needs the induction circuit
    (previous-token head + copying head), which the sparse answers of the retrieval tasks alone
    take far longer to discover.

    Args:
        length: tokens per sample. segment: ``k`` (default: uniform in
            ``[4, min(64, (length - 1) // 2)]`` per sample).
    """
    length, n = _check_int("length", length, 9), _check_int("n", n, 1)
    if segment is not None:
        segment = _check_int("segment", segment, 2)
        if segment > VOCAB.size - VOCAB.digit0:
            raise ValueError(f"segment must be <= {VOCAB.size - VOCAB.digit0} (distinct ids), got {segment}")
        if 2 * segment + 1 > length:
            raise ValueError(f"segment={segment} repeated twice needs length >= {2 * segment + 1}, got {length}")
    rng = _rng("copy", seed)
    ids = np.arange(VOCAB.digit0, VOCAB.size)
    rows, answers = [], []
    for _ in range(n):
        k = segment if segment is not None else int(rng.integers(4, min(64, (length - 1) // 2) + 1))
        seg = rng.choice(ids, size=k, replace=False)
        rows.append(np.concatenate([[VOCAB.bos], seg, seg, rng.choice(VOCAB.filler(), size=length - 1 - 2 * k)]))
        answers.append(np.arange(k + 2, 2 * k + 1))
    return _batch("copy", rows, answers, [-1] * n, None)


def mixture(length: int, n: int, seed: int = 0, *,
            weights: tuple[float, float, float, float] = (0.3, 0.2, 0.2, 0.3)) -> TaskBatch:
    """The training mix: each sample is passkey, needle, MQAR or copy (probabilities ``weights``)
    with random settings — depth uniform in ``[0, 1]``, 2–8 passkey digits, 1–4 needle values and
    0–4 distractors, 2–32 MQAR pairs (as many as fit), filler "repeat" or "random", copy segments
    of 4 … 64 tokens — all at ``length``. Answers are padded to the longest (``answer_mask``)."""
    length, n = _check_int("length", length, 32), _check_int("n", n, 1)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (4,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be four non-negative numbers (passkey, needle, mqar, copy), got {weights!r}")
    rng = _rng("mixture", seed)
    parts: list[TaskBatch] = []
    for task in rng.choice(4, size=n, p=w / w.sum()):
        sub = int(rng.integers(2**62))
        depth = float(rng.random())
        filler = _FILLER_MODES[int(rng.integers(2))]
        if task == 0:
            parts.append(passkey(length, depth, 1, sub, digits=int(rng.integers(2, 9)), filler=filler))
        elif task == 1:
            vals = int(rng.integers(1, 5))
            most = max(0, min(4, (length - 2) // (vals + 3) - 2))
            parts.append(needle(length, depth, 1, sub, values=vals, distractors=int(rng.integers(0, most + 1)),
                                filler=filler))
        elif task == 2:
            most = max(2, min(32, (length - 1) // 4))
            parts.append(mqar(length, int(rng.integers(2, most + 1)), 1, sub))
        else:
            parts.append(copy(length, 1, sub, segment=int(rng.integers(4, min(64, (length - 1) // 2) + 1))))
    m = max(p.answer_pos.shape[1] for p in parts)
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, m - t.shape[1]), value=fill)  # noqa: E731
    return TaskBatch(
        "mixture",
        torch.cat([p.tokens for p in parts]),
        torch.cat([pad(p.answer_pos, 1) for p in parts]),
        torch.cat([pad(p.answer_mask, False) for p in parts]),
        torch.cat([p.needle_pos for p in parts]),
        None,
    )
