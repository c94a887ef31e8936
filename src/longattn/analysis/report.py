"""``longattn analyze``: every analysis of one model, written as ``analysis.json`` (every number),
PNG figures and a self-contained ``report.html`` (figures inlined, no scripts, no external URLs).

What runs depends on the model (``plan``):

* every model: per-head statistics (layer × head heat maps), first-token sink bars, a rollout and
  flow relevance strip over a short input;
* decoders: retrieval scores (Wu et al. 2024) on a copy probe, the masking experiment over k
  heads, ACT's effect (perplexity for a text model, task accuracy for the retrieval model);
* encoders with a BERT tokenizer (MiniLM): Clark et al.'s per-layer shares over real sentences.
"""

from __future__ import annotations

import base64
import html
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longattn.analysis import studies
from longattn.analysis.flow import MAX_FLOW_TOKENS, attention_flow, layer_attentions, rollout
from longattn.analysis.retrieval_heads import RETRIEVAL_THRESHOLD, CopyProbe, retrieval_scores
from longattn.analysis.subject import HFSubject, LanguageModelSubject, Subject, load_subject
from longattn.files import atomic_write_json, atomic_write_text, output_dir

Tensor = torch.Tensor
Say = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    """How much each analysis reads (``quick`` for tests and a first look, else the report's)."""

    stat_inputs: int = 4
    stat_tokens: int = 512
    probe_samples: int = 10
    sentences: int = 300
    act_calibration: int = 4
    act_lengths: tuple[int, ...] = (512, 2048)
    ablation_draws: int = 5
    flow_tokens: int = 40
    moa_uniforms: tuple[int, ...] = (64, 128, 192, 256)
    #: lost in the middle: (documents, tokens per document) settings, and samples per gold position
    middle: tuple[tuple[int, int], ...] = ((30, 16), (32, 20))
    middle_n: int = 16


QUICK = Sizes(stat_inputs=1, stat_tokens=128, probe_samples=3, sentences=12, act_calibration=1, act_lengths=(128,),
              ablation_draws=1, flow_tokens=12, moa_uniforms=(32,), middle=((6, 16),), middle_n=2)


def _is_synthetic(subject: Subject) -> bool:
    from longattn.tasks import VOCAB

    return isinstance(subject, LanguageModelSubject) and subject.vocab_size == VOCAB.size


def _text_tokens(subject: Subject, n_tokens: int, seed: int) -> Tensor:
    """``[1, n_tokens]`` natural input for ``subject``: stories260K's text, or sentences through the
    model's tokenizer, or (no tokenizer) seeded random ids."""
    if subject.name == "stories260K":
        from longattn.analysis.texts import stories

        return stories(n_tokens, seed)
    tok = getattr(subject, "tokenizer", None)
    if isinstance(subject, HFSubject) and tok is not None:
        from longattn.analysis.texts import stdlib_sentences

        ids = tok(" ".join(stdlib_sentences(400)[seed * 50:]), return_tensors="pt")["input_ids"][:, :n_tokens]
        return ids
    vocab = getattr(subject, "vocab_size", None) or int(subject.model.config.vocab_size)
    return torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(seed))


def _passkeys(length: int, n: int, seed: int) -> list:
    from longattn.tasks import synthetic

    depths = [i / max(1, n - 1) for i in range(n)]
    return [synthetic.passkey(length, d, 1, seed=seed + i) for i, d in enumerate(depths)]


def _copy_probe(subject: Subject, sizes: Sizes, seed: int) -> CopyProbe:
    if _is_synthetic(subject):
        batches = _passkeys(sizes.stat_tokens, sizes.probe_samples, seed)
        probes = [CopyProbe.from_passkey(b, 5) for b in batches]
    else:
        text = _text_tokens(subject, 4 * sizes.stat_tokens, seed)[0]
        g = torch.Generator().manual_seed(seed)
        seg_len = 24
        hay_len = sizes.stat_tokens - 2 * seg_len - 1
        probes = []
        for i in range(sizes.probe_samples):
            a = int(torch.randint(0, text.numel() - hay_len, (1,), generator=g))
            b = int(torch.randint(0, text.numel() - seg_len, (1,), generator=g))
            probes.append(CopyProbe.repeat(text[a:a + hay_len], text[b:b + seg_len],
                                           [i / max(1, sizes.probe_samples - 1)], prefix=text[:1]))
    return CopyProbe(torch.cat([p.tokens for p in probes]), torch.cat([p.answer_pos for p in probes]),
                     torch.cat([p.answer_mask for p in probes]), torch.cat([p.span for p in probes]))


def plan(subject: Subject) -> list[str]:
    """The analyses ``analyze`` runs on ``subject``, in order."""
    steps = ["statistics", "relevance"]
    if subject.causal and subject.has_logits:
        steps += ["retrieval_heads", "ablation", "act", "head_maps"]
        if _is_synthetic(subject):
            steps += ["middle"]
    elif getattr(getattr(subject, "tokenizer", None), "cls_token_id", None) is not None:
        steps += ["bert_look"]
    return steps


def analyze(model: str | Path | Subject, out: str | Path, *, quick: bool = False, seed: int = 0,
            say: Say | None = None) -> dict[str, Any]:
    """Run every analysis of ``plan`` on ``model`` (a name for ``load_subject`` or a ``Subject``) and
    write ``analysis.json``, the PNGs and ``report.html`` into ``out``. Returns the results."""
    say = say or (lambda msg: None)
    out = output_dir(out)
    t0 = time.perf_counter()
    subject = model if isinstance(model, Subject) else load_subject(model)
    sizes = QUICK if quick else Sizes()
    steps = plan(subject)
    say(f"analyzing {subject!r}: {', '.join(steps)}")
    res: dict[str, Any] = {"model": subject.name, "geometry": {"layers": subject.n_layers, "heads": subject.n_heads,
                                                               "kv_heads": subject.n_kv_heads,
                                                               "head_dim": subject.head_dim,
                                                               "causal": subject.causal},
                           "quick": quick, "seed": seed, "machine": _machine(), "steps": steps}
    # -- statistics
    if _is_synthetic(subject):
        inputs = [b.tokens for b in _passkeys(sizes.stat_tokens, sizes.stat_inputs, seed)]
        res["input"] = f"{sizes.stat_inputs} passkey samples of {sizes.stat_tokens} tokens"
    elif "bert_look" in steps:
        from longattn.analysis.texts import stdlib_sentences

        sents = stdlib_sentences(sizes.sentences)
        inputs = [subject.tokenizer([s], return_tensors="pt")["input_ids"] for s in sents]
        res["input"] = f"{len(inputs)} sentences from Python's standard-library docstrings"
    else:
        inputs = [_text_tokens(subject, sizes.stat_tokens, seed + i) for i in range(sizes.stat_inputs)]
        res["input"] = f"{sizes.stat_inputs} texts of {sizes.stat_tokens} tokens"
    if "bert_look" in steps:  # one pass gives both: the statistics and Clark et al.'s shares
        res["bert_look"] = studies.bert_look(subject, sents, say=say)
        res["statistics"] = res["bert_look"].pop("statistics")
    else:
        res["statistics"] = studies.layer_statistics(subject, inputs, say=say)
    # -- relevance strip
    short = inputs[0][:, :min(sizes.flow_tokens, inputs[0].shape[1])]
    target = -1 if subject.causal else 0
    mats = list(layer_attentions(subject, short))
    say(f"rollout and flow over {short.shape[1]} tokens")
    res["relevance"] = {"tokens": short[0].tolist(), "labels": _labels(subject, short[0]), "target": target,
                        "rollout": rollout(mats)[target].tolist(),
                        "flow": attention_flow(mats, target).tolist() if short.shape[1] <= MAX_FLOW_TOKENS else None}
    # -- decoders
    if "retrieval_heads" in steps:
        say("retrieval scores on the copy probe")
        probe = _copy_probe(subject, sizes, seed + 100)
        scores = retrieval_scores(subject, probe)
        from longattn.memory.calibrate import save_head_map

        save_head_map(scores.head_map(subject.n_kv_heads), out / "head_map.json")
        res["retrieval_heads"] = scores.as_dict() | {
            "probe": "passkey (5 digits)" if _is_synthetic(subject) else "repeated 24-token segment",
            "samples": int(probe.tokens.shape[0]), "length": int(probe.tokens.shape[1])}
        if _is_synthetic(subject):
            evalset = _passkeys(sizes.stat_tokens, sizes.probe_samples, seed + 200)
            measure, task = (lambda a: studies.task_accuracy(subject, evalset, a)), f"passkey at {sizes.stat_tokens} tokens"
        else:
            held_out = _copy_probe(subject, sizes, seed + 200)
            measure, task = (lambda a: studies.copy_accuracy(subject, held_out, a)), "copy accuracy of a repeated segment"
        res["ablation"] = studies.ablation_curves(subject, scores, measure, draws=sizes.ablation_draws, seed=seed,
                                                  say=say) | {"task": task}
        if _is_synthetic(subject):
            calib = _passkeys(sizes.stat_tokens, sizes.probe_samples, seed + 300)
            evaluation = {f"passkey@{n}": _passkeys(n, sizes.probe_samples, seed + 400) for n in sizes.act_lengths}
            res["act"] = studies.act_task(subject, calib, evaluation, say=say)
        else:
            calib = [_text_tokens(subject, sizes.stat_tokens, seed + 500 + i) for i in range(sizes.act_calibration)]
            evaluation = {f"text@{n}": _text_tokens(subject, n, seed + 600) for n in sizes.act_lengths}
            res["act"] = studies.act_perplexity(subject, calib, evaluation, say=say)
    if "head_maps" in steps:
        say("head maps at equal KV budget (retrieval score, Razor, Duo; MoA vs uniform)")
        if _is_synthetic(subject):
            evalset = _passkeys(sizes.stat_tokens, sizes.probe_samples, seed + 700)
            calib = _passkeys(sizes.stat_tokens, sizes.probe_samples, seed + 800)
            res["head_maps"] = studies.head_map_comparison(
                subject, scores, score=lambda a: studies.task_accuracy(subject, evalset, a), higher_is_better=True,
                calibration=[b.tokens for b in calib], calibration_rows=[b.answer_pos - 1 for b in calib],
                length=sizes.stat_tokens, uniforms=sizes.moa_uniforms, calib_samples=sizes.probe_samples, say=say)
            res["head_maps"]["task"] = f"passkey accuracy at {sizes.stat_tokens} tokens"
        else:
            text = _text_tokens(subject, sizes.stat_tokens, seed + 700)
            calib = [_text_tokens(subject, sizes.stat_tokens, seed + 800 + i) for i in range(sizes.act_calibration)]
            res["head_maps"] = studies.head_map_comparison(
                subject, scores, score=lambda a: studies.mean_nll(subject, text, a), higher_is_better=False,
                calibration=calib, length=sizes.stat_tokens, uniforms=sizes.moa_uniforms,
                calib_samples=sizes.probe_samples, say=say)
            res["head_maps"]["task"] = f"mean NLL (nats) of {sizes.stat_tokens} tokens of text"
    if "middle" in steps:
        res["middle"] = []
        for n_docs, doc_len in sizes.middle:
            positions = sorted({round(i * (n_docs - 1) / 7) for i in range(8)})
            res["middle"].append(studies.lost_in_the_middle(subject, n_docs=n_docs, doc_len=doc_len,
                                                            positions=positions, n=sizes.middle_n, seed=seed,
                                                            say=say))
    res["wall_s"] = time.perf_counter() - t0
    figures = write_figures(res, out)
    atomic_write_json(out / "analysis.json", res)
    atomic_write_text(out / "report.html", render_html(res, figures))
    say(f"wrote {out / 'report.html'}, analysis.json and {len(figures)} figures in {res['wall_s']:.1f} s")
    return res


def _labels(subject: Subject, tokens: Tensor) -> list[str]:
    tok = getattr(subject, "tokenizer", None)
    ids = tokens.tolist()
    if _is_synthetic(subject):
        from longattn.tasks import VOCAB

        words = VOCAB.words()
        return [words[i] for i in ids]
    if tok is None:
        return [str(i) for i in ids]
    if hasattr(tok, "convert_ids_to_tokens"):
        return list(tok.convert_ids_to_tokens(ids))
    return [tok.decode([i]) if i > 2 else ("<s>" if i == 1 else str(i)) for i in ids]


def _machine() -> dict[str, Any]:
    from longattn.bench.harness import machine_info

    try:
        return machine_info()
    except Exception:  # the report still says what ran
        return {"machine": platform.machine(), "torch": torch.__version__}


# --------------------------------------------------------------------------------------------
# figures


def write_figures(res: dict[str, Any], out: Path) -> dict[str, Path]:
    """The PNGs of ``res`` in ``out``: ``{name: path}``."""
    from longattn.bench.plots import HEATMAP_CMAP, _mpl, _save

    plt = _mpl()
    figs: dict[str, Path] = {}
    st = res["statistics"]
    panels = [("first_token", "first-token mass"), ("sinks", "other sinks (ACT rule)"), ("entropy", "entropy (nats)"),
              ("distance", "mean distance (tokens)"), ("previous", "previous-token share"), ("peak", "largest weight")]
    if "retrieval_heads" in res:
        panels.append(("retrieval", "retrieval score"))
    n_layers, n_heads = res["geometry"]["layers"], res["geometry"]["heads"]
    cols = (len(panels) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3.6 * cols, 2 * (0.3 * n_layers + 1.7)), squeeze=False,
                             layout="constrained")
    for ax, (key, title) in zip(axes.flat, panels):
        data = res["retrieval_heads"]["scores"] if key == "retrieval" else st[key]
        im = ax.imshow(data, aspect="auto", cmap=HEATMAP_CMAP, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(0, n_heads, max(1, n_heads // 8)))
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 8)))
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, shrink=0.9).ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{res['model']}: per-head statistics ({res['input']})", fontsize=10)
    figs["head_statistics"] = _save(fig, out / "head_statistics.png")

    fig, ax = plt.subplots(figsize=(max(5, 0.25 * res["geometry"]["layers"] * res["geometry"]["heads"]), 2.8))
    vals = [v for row in st["first_token"] for v in row]
    other = [v for row in st["sinks"] for v in row]
    x = range(len(vals))
    ax.bar(x, vals, label="first token")
    ax.bar(x, other, bottom=vals, label="other sinks (ACT rule)")
    ax.set_xticks(list(x)[::res["geometry"]["heads"]],
                  [f"L{i}" for i in range(res["geometry"]["layers"])])
    ax.set_ylabel("attention share")
    ax.set_title(f"{res['model']}: attention on sink tokens, per head (grouped by layer)", fontsize=10)
    ax.legend(fontsize=8)
    figs["sinks"] = _save(fig, out / "sinks.png")

    rel = res["relevance"]
    rows = [("rollout", rel["rollout"])] + ([("flow", rel["flow"])] if rel["flow"] is not None else [])
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6, 0.32 * len(rel["labels"])), 1.3 * len(rows) + 0.8),
                             squeeze=False)
    for ax, (name, vals) in zip(axes[:, 0], rows):
        ax.imshow([vals], aspect="auto", cmap="Reds")
        ax.set_yticks([0], [name])
        ax.set_xticks(range(len(rel["labels"])), [s[:10] for s in rel["labels"]], rotation=90, fontsize=7)
    which = "last token" if rel["target"] == -1 else "first token ([CLS])"
    fig.suptitle(f"{res['model']}: relevance of each input token to the {which}", fontsize=10)
    figs["relevance"] = _save(fig, out / "relevance.png")

    if "ablation" in res:
        ab = res["ablation"]["rows"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["k"] for r in ab], [r["top"] for r in ab], "o-", label="top-k retrieval heads masked")
        rk = [(r["k"], r["random_mean"]) for r in ab if r["random_mean"] is not None]
        ax.plot([a for a, _ in rk], [b for _, b in rk], "s--", label="k random non-retrieval heads")
        ax.set_xlabel("heads masked (k)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{res['model']}: {res['ablation']['task']}", fontsize=9)
        ax.legend(fontsize=8)
        figs["ablation"] = _save(fig, out / "ablation.png")

    if res.get("middle"):
        fig, axes = plt.subplots(1, len(res["middle"]), figsize=(4.6 * len(res["middle"]), 3.3), squeeze=False)
        for ax, m in zip(axes[0], res["middle"]):
            for key, label in (("dense", "as is"), ("found_in_the_middle", "Found-in-the-Middle calibration"),
                               ("attention_sorting", f"attention sorting ({m['sort_rounds']} rounds)")):
                ax.plot(m["positions"], m[key], "o-", label=label)
            ax.set_xlabel("gold document position")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{m['n_docs']} documents, {m['length']} tokens", fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{res['model']}: accuracy by the answering document's position", fontsize=10)
        figs["middle"] = _save(fig, out / "middle.png")

    if "bert_look" in res:
        pl = res["bert_look"]["per_layer"]
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        layers = range(len(pl["[CLS]"]))
        for name in ("[CLS]", "[SEP]", "punctuation", "previous", "next"):
            ax.plot(list(layers), pl[name], "o-", label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean attention share")
        ax.set_title(f"{res['model']}: what it looks at ({res['bert_look']['sentences']} sentences)", fontsize=9)
        ax.legend(fontsize=8)
        figs["bert_look"] = _save(fig, out / "bert_look.png")
    return figs


# --------------------------------------------------------------------------------------------
# report.html


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def render_html(res: dict[str, Any], figures: dict[str, Path]) -> str:
    """The self-contained page for ``res`` with ``figures`` inlined."""
    m = res.get("machine") or {}
    parts = [f"<h1>longattn analyze: {_e(res['model'])}</h1>",
             f"<p>{_e(res['geometry']['layers'])} layers × {_e(res['geometry']['heads'])} heads "
             f"({_e(res['geometry']['kv_heads'])} key/value heads), head_dim {_e(res['geometry']['head_dim'])}, "
             f"{'causal' if res['geometry']['causal'] else 'bidirectional'}. Input: {_e(res['input'])}. "
             f"Machine: {_e(m.get('cpu_model') or m.get('machine', '?'))}, torch {_e(m.get('torch', '?'))}. "
             f"Wall time {res['wall_s']:.1f} s{' (quick sizes)' if res['quick'] else ''}.</p>",
             "<h2>Per-head statistics</h2>",
             "<p>Means over every query row. First-token mass is StreamingLLM's sink; other sinks are tokens after "
             "the first whose attention averaged over the rows exceeds 5/N, N keys (ACT's rule); entropy in nats; distance is "
             "the mean |query − key| of the attention (Clark et al. 2019).</p>",
             _img(figures["head_statistics"], "per-head statistics"), _img(figures["sinks"], "sink bars")]
    st = res["statistics"]
    rows = []
    for layer in range(res["geometry"]["layers"]):
        for h in range(res["geometry"]["heads"]):
            row = [f"L{layer}H{h}"] + [_f(st[k][layer][h]) for k in ("first_token", "sinks", "entropy", "previous",
                                                                        "same")]
            row.append(_f(st["distance"][layer][h], ".1f"))
            if "retrieval_heads" in res:
                row.append(_f(res["retrieval_heads"]["scores"][layer][h]))
            rows.append(row)
    headers = ["head", "first token", "other sinks", "entropy", "previous", "same", "distance"]
    if "retrieval_heads" in res:
        headers.append("retrieval score")
    parts += ["<details><summary>every head</summary>", _table(headers, rows), "</details>",
              "<h2>Relevance (attention rollout and flow)</h2>",
              "<p>Abnar &amp; Zuidema 2020: head-averaged attention mixed half-and-half with the residual; rollout "
              "multiplies the layers, flow takes the max-flow from each input token.</p>",
              _img(figures["relevance"], "relevance strip")]
    if "retrieval_heads" in res:
        rh = res["retrieval_heads"]
        heads = studies.heads_text([tuple(h) for h in rh["retrieval_heads"]])
        parts += ["<h2>Retrieval heads</h2>",
                  f"<p>Wu et al. 2024's retrieval score on {_e(rh['samples'])} probes ({_e(rh['probe'])}, "
                  f"{_e(rh['length'])} tokens); the model copied {rh['copied']:.1%} of the needle tokens. Heads above "
                  f"{RETRIEVAL_THRESHOLD}: {_e(heads)}.</p>"]
    if "ablation" in res:
        ab = res["ablation"]
        parts += [_img(figures["ablation"], "masking curves"),
                  _table(["k", "top-k masked", "random non-retrieval (mean)", "draws"],
                         [[r["k"], _f(r["top"]), _f(r["random_mean"]), ", ".join(_f(x) for x in r["random"])]
                          for r in ab["rows"]])]
    if "act" in res:
        act = res["act"]
        parts += ["<h2>ACT (attention calibration)</h2>",
                  f"<p>Heads chosen on a calibration set (each screened alone, then added while the loss falls): "
                  f"{_e(studies.heads_text([tuple(h) for h in act['heads']]))}; factor β = {act['factor']}.</p>"]
        ev = act["evaluation"]
        if all("perplexity" in v for v in ev.values()):
            parts.append(_table(["input", "tokens", "perplexity", "with ACT"],
                                [[k, v["tokens"], _f(v["perplexity"], ".4f"), _f(v["act_perplexity"], ".4f")]
                                 for k, v in ev.items()]))
        else:
            parts.append(_table(["task", "accuracy", "with ACT"],
                                [[k, _f(v["accuracy"]), _f(v["act_accuracy"])] for k, v in ev.items()]))
    if "head_maps" in res:
        hm = res["head_maps"]
        better = "higher" if hm["higher_is_better"] else "lower"
        parts += ["<h2>Head maps at one KV budget</h2>",
                  f"<p>The <code>heads</code> cache policy: {hm['share']:.0%} of the key heads keep every key, the "
                  f"rest the first {hm['sinks']} and the last {hm['window']}; maps from retrieval scores, "
                  f"RazorAttention and DuoAttention scores. Measure: {_e(hm['task'])} ({better} is better).</p>",
                  _table(["map", "kept keys (all layers and heads)", "score"],
                         [[r["map"], r["kept_keys"], _f(r["score"], ".4f")] for r in hm["maps"]]),
                  "<p>MoA-style elastic windows (per-head window chosen to keep the most attention mass, profiled on "
                  "calibration inputs) against one window for every head, at the same total:</p>",
                  _table(["keys per head (uniform)", "uniform", "elastic (MoA)", "windows [layer][key head]"],
                         [[r["uniform"], _f(r["uniform_score"], ".4f"), _f(r["moa_score"], ".4f"), r["windows"]]
                          for r in hm["moa"]])]
    if res.get("middle"):
        parts += ["<h2>Lost in the middle, then found</h2>",
                  "<p>Multi-document key–value retrieval (<code>tasks.synthetic.documents</code>): accuracy with the "
                  "answering document at each position, as is, with Found-in-the-Middle's attention calibration "
                  "(Hsieh et al. 2024; positional bias measured on separate samples) and after attention sorting "
                  "(Peysakhovich &amp; Lerer 2023).</p>", _img(figures["middle"], "accuracy by gold position")]
        for m in res["middle"]:
            parts.append(_table(["gold position"] + [str(p) for p in m["positions"]],
                                [[label] + [_f(x, ".2f") for x in m[key]] for key, label in
                                 (("dense", "as is"), ("found_in_the_middle", "calibrated"),
                                  ("attention_sorting", "sorted"))]))
            parts.append(f"<p>{m['n_docs']} documents × {m['doc_len']} tokens ({m['length']} tokens), {m['n']} samples "
                         f"per position. Gold document ranked first by raw attention: {m['recall_at_1_raw']:.3f}; by "
                         f"calibrated attention: {m['recall_at_1_calibrated']:.3f}.</p>")
    if "bert_look" in res:
        bl = res["bert_look"]
        pl = bl["per_layer"]
        parts += ["<h2>What does it look at? (Clark et al. 2019)</h2>",
                  f"<p>{bl['sentences']} sentences (mean {bl['mean_tokens']:.1f} tokens with [CLS] and [SEP]).</p>",
                  _img(figures["bert_look"], "per-layer shares"),
                  _table(["layer", "[CLS]", "[SEP]", "punctuation", "previous", "same", "next", "entropy"],
                         [[i] + [_f(pl[k][i]) for k in ("[CLS]", "[SEP]", "punctuation", "previous", "same", "next",
                                                        "entropy")] for i in range(len(pl["[CLS]"]))])]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f4f4f4}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>longattn analyze: {_e(res['model'])}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
