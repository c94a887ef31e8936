"""MInference (per-head A-shape / vertical-slash / block-sparse) and FlexPrefill (JS-divergence
pattern test + cumulative-mass block selection), against the float64 oracle."""

import json
import math

import pytest
import torch

import longattn
from longattn.sparse.head_patterns import (
    FORMAT,
    VERSION,
    load_head_patterns,
    save_head_patterns,
    search_head_patterns,
    vertical_slash_scores,
)
from longattn.sparse.threshold import cumulative_mass_selection, pooled_block_mass
from longattn.methods.flexprefill import vertical_slash_block_mass
from conftest import assert_close_to_oracle, make_qkv
from test_sparse import needles

SMALL = dict(block=16, sinks=16, window=16, last_q=16)


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def pattern_file(tmp_path, heads, name="p.json", layers=1):
    doc = {"format": FORMAT, "version": VERSION, "layers": [list(heads)] * layers}
    return str(save_head_patterns(tmp_path / name, doc))


def minf(budget, **kw):
    return longattn.method("minference", budget=budget, **{**SMALL, **kw})


def flex(budget, **kw):
    return longattn.method("flexprefill", budget=budget, **{**dict(block=16, q_block=16, sinks=16, window=16), **kw})


def support(method, q, k, causal=True):
    """Which keys each query attended: with v = identity the output row is its attention row."""
    d, tk = k.shape[3], k.shape[2]
    eye = torch.eye(tk).expand(k.shape[0], k.shape[1], tk, tk)
    widen = lambda x: torch.nn.functional.pad(x, (0, tk - d))  # noqa: E731  (zero dims: same scores)
    return longattn.attention(widen(q), widen(k), eye, causal=causal, method=method, scale=d ** -0.5) > 0


def local_and_columns(t=256, d=32, seed=0, w=4, cols=(5, 40, 75, 110, 145, 180)):
    """Head 0 attends to its last ``w`` keys; head 1 to a few fixed key columns (one key head each)."""
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=t, tk=t, d=d, seed=seed)
    kk = k[0, 0]
    win = torch.stack([kk[max(0, i - w + 1): i + 1].sum(0) for i in range(t)])
    q[0, 0] = 3.0 * win
    kc = k[0, 1]
    for i in range(t):
        seen = [c for c in cols if c <= i]
        if seen:
            q[0, 1, i] = 3.0 * kc[seen].sum(0)
    return q, k, v


# -- MInference ---------------------------------------------------------------------------------

HEAD_CHOICES = [None, ("a_shape",) * 4, ("block_sparse",) * 4, ("vertical_slash",) * 4,
                ("a_shape", "block_sparse", "vertical_slash", "a_shape")]


@pytest.mark.parametrize("heads", HEAD_CHOICES)
def test_minference_full_budget_equals_exact(tmp_path, heads):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16)
    patterns = None if heads is None else pattern_file(tmp_path, heads)
    m = minf(128, patterns=patterns)
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    ref, ref_lse = longattn.reference_attention(q, k, v, causal=True)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert stats.density == pytest.approx(1.0)


@pytest.mark.parametrize("heads", HEAD_CHOICES)
def test_minference_full_budget_exact_for_decode_and_padding(tmp_path, heads):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=3, tk=150, d=16, seed=4)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    patterns = None if heads is None else pattern_file(tmp_path, heads)
    out = longattn.attention(q, k, v, causal=True, method=minf(160, patterns=patterns), key_padding_mask=pad)
    ref, _ = longattn.reference_attention(q, k, v, causal=True, mask=pad[:, None, None, :])
    assert_close_to_oracle(out, ref)


def test_minference_refuses_non_causal():
    q, k, v = make_qkv(tq=32, tk=32)
    with pytest.raises(ValueError, match="supports only causal=True"):
        longattn.attention(q, k, v, causal=False, method=minf(64))


@pytest.mark.parametrize("heads", HEAD_CHOICES[:4])
def test_minference_error_shrinks_as_budget_grows(tmp_path, heads):
    q, k, v = needles(seed=1)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    patterns = None if heads is None else pattern_file(tmp_path, heads)
    errors = [rel_err(longattn.attention(q, k, v, causal=True, method=minf(b, patterns=patterns)), ref)
              for b in (64, 96, 128, 192, 256)]
    assert errors[-1] < 1e-5, errors
    assert errors[0] > 10 * errors[-1] + 1e-3, errors
    for a, b in zip(errors, errors[1:]):
        assert b <= a * 1.05 + 1e-6, f"error grew with budget: {errors}"


@pytest.mark.parametrize("heads", [("a_shape",) * 4, ("block_sparse",) * 4])
def test_minference_fixed_patterns_never_depend_on_future_keys(tmp_path, heads):
    q, k, v = needles(seed=5, tq=160, tk=160)
    m = minf(64, patterns=pattern_file(tmp_path, heads))
    out = longattn.attention(q, k, v, causal=True, method=m)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 112:] = torch.randn_like(k2[:, :, 112:]) * 5  # 112 starts a query block of 16
    v2[:, :, 112:] = torch.randn_like(v2[:, :, 112:]) * 5
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :112], out[:, :, :112], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, 112:], out[:, :, 112:])


@pytest.mark.parametrize("heads", [None, ("vertical_slash",) * 4])
def test_minference_whole_prompt_estimates_stay_causal(tmp_path, heads):
    """Vertical-slash (and the online choice) read the last queries, so they see the whole prompt;
    still, no query attends a later key, and later values never change earlier outputs."""
    q, k, v = needles(seed=6, tq=160, tk=160)
    m = minf(64, patterns=None if heads is None else pattern_file(tmp_path, heads))
    seen = support(m, q, k)
    assert not (seen & ~torch.ones(160, 160, dtype=torch.bool).tril()).any()
    assert (seen.sum(-1) <= 64).all()  # the budget is honest
    out = longattn.attention(q, k, v, causal=True, method=m)
    v2 = v.clone()
    v2[:, :, 100:] = torch.randn_like(v2[:, :, 100:]) * 5
    out2 = longattn.attention(q, k, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :100], out[:, :, :100], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, 100:], out[:, :, 100:])


def test_minference_deterministic_and_reports_its_patterns():
    q, k, v = local_and_columns()
    m = minf(64)
    a, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert torch.equal(a, longattn.attention(q, k, v, causal=True, method=m))
    assert st.extra["head_patterns"].shape == (1, 2)
    assert sum(st.extra["pattern_share"].values()) == pytest.approx(1.0)
    assert 0 < st.density < 64 * 256 / (256 * 257 / 2)


def test_offline_search_picks_a_shape_for_a_local_head_and_vertical_slash_for_columns():
    q, k, v = local_and_columns()
    doc = search_head_patterns([(q, k, v)], 64, **SMALL)
    assert doc["layers"] == [["a_shape", "vertical_slash"]], doc["recall"]
    rec = doc["recall"][0]
    assert rec["a_shape"][0] > 0.9 and rec["vertical_slash"][1] > rec["a_shape"][1] + 0.2, rec
    assert rec["vertical_slash"][1] > rec["block_sparse"][1], rec


def test_head_pattern_json_round_trip_and_use(tmp_path):
    q, k, v = local_and_columns(t=128)
    doc = search_head_patterns([(q, k, v), (q, k, v)], 64, **SMALL)
    path = save_head_patterns(tmp_path / "heads.json", doc)
    back = load_head_patterns(path)
    assert back == json.loads(json.dumps(doc))
    assert back["settings"]["budget"] == 64
    m = minf(64, patterns=str(path), layer=1)
    _, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    want = torch.tensor([["a_shape", "block_sparse", "vertical_slash"].index(p) for p in doc["layers"][1]])
    assert torch.equal(st.extra["head_patterns"][0], want)
    with pytest.raises(ValueError, match="layer=2 but patterns=.*holds 2 layer"):
        minf(64, patterns=str(path), layer=2)
    q4, k4, v4 = make_qkv(b=1, hq=4, hk=2, tq=64, tk=64)
    with pytest.raises(ValueError, match="lists 2 heads, but q has 4 heads"):
        longattn.attention(q4, k4, v4, causal=True, method=m)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"format": "other", "version": 1, "layers": [["a_shape"]]}), "'format' is 'other'"),
    (json.dumps({"format": FORMAT, "version": 99, "layers": [["a_shape"]]}),
     "'version' is 99; this longattn reads version 1"),
    (json.dumps({"format": FORMAT, "version": 1, "layers": []}), "'layers' must be a non-empty list"),
    (json.dumps({"format": FORMAT, "version": 1, "layers": [["a_shape", "diagonal"]]}),
     r"layers\[0\]\[1\] is 'diagonal'"),
])
def test_malformed_head_pattern_file_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_head_patterns(path)
    with pytest.raises(ValueError, match="not a valid MInference head-pattern file"):
        minf(64, patterns=str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        minf(64, patterns=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("params, message", [
    (dict(budget=0), "budget must be a positive int, got 0"),
    (dict(budget=16), r"budget=16 is below 2 \* block = 32"),
    (dict(vertical_share=1.5), r"vertical_share must be a number in \[0, 1\], got 1.5"),
    (dict(vertical_share=0.1), "sinks=16 exceeds the 6 vertical columns"),
    (dict(window=48), "window=48 exceeds the 32 diagonals"),
    (dict(last_q=0), "last_q must be a positive int, got 0"),
    (dict(tie=-1.0), "tie must be a non-negative number, got -1.0"),
    (dict(chunk=0), "chunk must be a positive int, got 0"),
])
def test_minference_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        minf(**{"budget": 64, **params})


def test_search_rejects_bad_layers():
    with pytest.raises(ValueError, match="layers is empty"):
        search_head_patterns([], 64, **SMALL)
    q, k, v = make_qkv(tq=32, tk=32)
    with pytest.raises(ValueError, match=r"layers\[0\] must be a \(q, k, v\) triple"):
        search_head_patterns([(q, k)], 64, **SMALL)


# -- FlexPrefill and the cumulative-mass selector ------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("extra", [dict(gamma=1.0), dict(gamma=0.5, min_blocks=7), dict(gamma=1.0, tau=0.0),
                                   dict(gamma=1.0, tau=10.0)])
def test_flexprefill_full_budget_equals_exact(causal, extra):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16, seed=2)
    out, stats = longattn.attention(q, k, v, causal=causal, method=flex(112, **extra), return_stats=True)
    ref, ref_lse = longattn.reference_attention(q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert stats.density == pytest.approx(1.0)


@pytest.mark.parametrize("tau", [0.0, 10.0])
def test_flexprefill_full_budget_exact_for_decode_cross_and_padding(tau):
    q, k, v = make_qkv(b=2, hq=8, hk=2, tq=3, tk=150, d=16, seed=4)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    for causal in (True, False):
        out = longattn.attention(q, k, v, causal=causal, method=flex(160, gamma=1.0, tau=tau), key_padding_mask=pad)
        ref, _ = longattn.reference_attention(q, k, v, causal=causal, mask=pad[:, None, None, :])
        assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("tau", [0.0, 10.0])
def test_flexprefill_error_shrinks_as_gamma_and_budget_grow(tau):
    q, k, v = needles(seed=8)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    by_gamma = [rel_err(longattn.attention(q, k, v, causal=True, method=flex(256, gamma=g, tau=tau)), ref)
                for g in (0.3, 0.6, 0.9, 0.99, 1.0)]
    by_budget = [rel_err(longattn.attention(q, k, v, causal=True, method=flex(b, gamma=1.0, tau=tau)), ref)
                 for b in (80, 96, 128, 192, 256)]
    for errors in (by_gamma, by_budget):
        assert errors[-1] < 1e-5, errors
        assert errors[0] > 10 * errors[-1] + 1e-3, errors
        for a, b in zip(errors, errors[1:]):
            assert b <= a * 1.05 + 1e-6, f"error grew: {errors}"


def test_flexprefill_query_aware_selection_never_depends_on_future_keys():
    q, k, v = needles(seed=5, tq=160, tk=160)
    m = flex(80, gamma=0.8, tau=10.0)  # tau above sqrt(ln 2): every head query-aware
    out, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert bool(st.extra["query_aware"].all())
    idx = st.extra["selected_blocks"]
    for i in range(idx.shape[2]):
        assert int(idx[:, :, i].max()) <= i
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 112:] = torch.randn_like(k2[:, :, 112:]) * 5
    v2[:, :, 112:] = torch.randn_like(v2[:, :, 112:]) * 5
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :112], out[:, :, :112], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, 112:], out[:, :, 112:])


def test_flexprefill_vertical_slash_stays_causal_and_within_budget():
    q, k, v = needles(seed=6, tq=160, tk=160)
    m = flex(80, gamma=0.8, tau=0.0)  # every head vertical-slash
    seen = support(m, q, k)
    assert not (seen & ~torch.ones(160, 160, dtype=torch.bool).tril()).any()
    assert (seen.sum(-1) <= 80).all()
    out, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert not bool(st.extra["query_aware"].any())
    v2 = v.clone()
    v2[:, :, 100:] = torch.randn_like(v2[:, :, 100:]) * 5
    out2 = longattn.attention(q, k, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :100], out[:, :, :100], atol=1e-6, rtol=1e-5)
    assert torch.equal(out, longattn.attention(q, k, v, causal=True, method=m))  # deterministic


def test_flexprefill_js_test_trusts_pooling_only_where_it_predicts_attention():
    """Head 0: keys constant within each block and one query direction, so the pooled estimate is
    the attention; head 1 attends to single key columns, which block means wash out."""
    t, d = 256, 32
    q, k, v = local_and_columns(t=t, d=d, seed=3)
    g = torch.Generator().manual_seed(9)
    per_block = torch.randn(t // 16, d, generator=g)
    k[0, 0] = per_block.repeat_interleave(16, 0)
    q[0, 0] = 0.5 * per_block[3] + 0.05 * torch.randn(t, d, generator=g)
    _, st = longattn.attention(q, k, v, causal=True, method=flex(128, tau=0.1), return_stats=True)
    dist = st.extra["js_distance"][0]
    assert dist[0] < 0.1 < dist[1], dist
    assert st.extra["query_aware"][0].tolist() == [True, False]


def test_cumulative_mass_selection_adapts_to_peaked_and_flat_mass():
    n_qb = n = 16
    peaked = torch.full((n_qb, n), 1e-4)
    peaked[:, 2] = 1.0
    flat = torch.ones(n_qb, n)
    mass = torch.stack([peaked, flat])[None]  # [1, 2, n_qb, n]
    common = dict(tokens_q=256, tokens_k=256, q_block=16, block=16, sinks=0, window=0, causal=True)
    sel = cumulative_mass_selection(mass, gamma=0.9, min_blocks=1, max_blocks=16, **common)
    used = (sel.indices >= 0).sum(-1)  # [1, 2, n_qb]
    assert (used[0, 0] <= 2).all()  # the peak (+ the forced diagonal block)
    for i in range(n_qb):
        assert int(used[0, 1, i]) == max(1, math.ceil(0.9 * (i + 1) - 1e-9)), used[0, 1]
        for row in sel.indices[0, :, i]:
            ok = row[row >= 0]
            assert (ok <= i).all() and bool((ok == i).any())  # causal, the diagonal block forced
            assert torch.equal(row, row.sort().values)
    capped = cumulative_mass_selection(mass, gamma=0.99, min_blocks=3, max_blocks=4, **common)
    used = (capped.indices >= 0).sum(-1)
    assert int(used.max()) <= 4 and int(used[0, 0, 5:].min()) >= 3
    everything = cumulative_mass_selection(mass, gamma=1.0, min_blocks=1, max_blocks=16, **common)
    assert torch.equal((everything.indices >= 0).sum(-1)[0, 0], torch.arange(1, 17))


def test_flexprefill_keeps_fewer_blocks_for_a_peaked_head_than_a_flat_one():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=256, tk=256, d=32, seed=10)
    q[0, 1] = 0.0  # flat: every visible key alike
    k[0, 0, 32:48] = k[0, 0, 40]  # peaked: all queries want key block 2
    q[0, 0] = 2.0 * k[0, 0, 40]
    _, st = longattn.attention(q, k, v, causal=True, method=flex(256, gamma=0.9, tau=10.0), return_stats=True)
    used = (st.extra["selected_blocks"] >= 0).sum(-1)[0, :, 4:].double().mean(-1)
    assert used[0] < 0.5 * used[1], used


def test_pooled_and_vertical_slash_block_mass_match_brute_force():
    q, k, _ = make_qkv(b=1, hq=2, hk=1, tq=37, tk=53, d=8, seed=11)
    for causal in (True, False):
        got = pooled_block_mass(q, k, q_block=8, block=16, scale=0.3, causal=causal)
        off = 53 - 37
        for i in range(got.shape[2]):
            rows = q[0, :, i * 8: min(i * 8 + 8, 37)]
            last = min(i * 8 + 8, 37) - 1 + off
            logits = []
            for j in range(got.shape[3]):
                keys = k[0, 0, j * 16: min(j * 16 + 16, 53)]
                if causal:
                    keys = k[0, 0, j * 16: min(j * 16 + 16, 53, last + 1)]
                logits.append(0.3 * rows.mean(1) @ keys.mean(0) + math.log(len(keys)) if len(keys) else
                              torch.full((2,), -math.inf))
            torch.testing.assert_close(got[0, :, i], torch.softmax(torch.stack(logits, -1), -1), atol=1e-5, rtol=1e-4)
        p = torch.rand(1, 2, 5, 53, generator=torch.Generator().manual_seed(1))
        q_pos = torch.arange(32, 37) + off
        if causal:
            p = p.masked_fill(torch.arange(53)[None, :] > q_pos[:, None], 0.0)
        vert, slash = vertical_slash_scores(p, q_pos, 37, 53)
        mass = vertical_slash_block_mass(vert, slash, tokens_q=37, q_block=8, block=16, causal=causal)
        vn, sn = vert / vert.sum(-1, keepdim=True), slash / slash.sum(-1, keepdim=True)
        for i in range(mass.shape[2]):
            for j in range(mass.shape[3]):
                qs = range(i * 8 + off, min(i * 8 + 8, 37) + off)
                ks = range(j * 16, min(j * 16 + 16, 53))
                # offset p - k sits at index p - k + Tq - 1
                want_s = sum(sn[0, :, p_ - k_ + 36] for p_ in qs for k_ in ks) / len(qs)
                hi = min(j * 16 + 16, 53, max(qs) + 1) if causal else min(j * 16 + 16, 53)
                want_v = vn[0, :, j * 16: hi].sum(-1) if hi > j * 16 else torch.zeros(2)
                torch.testing.assert_close(mass[0, :, i, j], (want_s + want_v).float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("params, message", [
    (dict(gamma=0.0), r"gamma must be a number in \(0, 1\], got 0.0"),
    (dict(gamma=1.5), r"gamma must be a number in \(0, 1\], got 1.5"),
    (dict(tau=-0.1), "tau must be a non-negative number, got -0.1"),
    (dict(min_blocks=0), "min_blocks must be a positive int, got 0"),
    (dict(min_blocks=9), r"min_blocks=9 exceeds the budget's 8 blocks \(budget=128, block=16\)"),
    (dict(last_q=0), "last_q must be a positive int, got 0"),
    (dict(budget=32), "budget=32 keys gives 2 blocks of 16"),
])
def test_flexprefill_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        flex(**{"budget": 128, **params})


def test_calibrate_minference_cli_writes_a_loadable_file(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import longattn.bench.sparse as bench_sparse
    from longattn.cli import app

    # the real command captures stories260K (a minute); the search and the file are what is tested here
    monkeypatch.setattr(bench_sparse, "capture_real_qkv", lambda n, seed: ([local_and_columns(t=n)], None))
    out = tmp_path / "heads.json"
    res = CliRunner().invoke(app, ["calibrate-minference", "--out", str(out), "--tokens", "256", "--budget", "64",
                                   "--block", "16", "--sinks", "16", "--window", "16", "--last-q", "16"])
    assert res.exit_code == 0, res.output
    doc = load_head_patterns(out)
    assert doc["layers"] == [["a_shape", "vertical_slash"]] and doc["source"]["tokens"] == 256
    assert "A VS" in res.output
    res = CliRunner().invoke(app, ["calibrate-minference", "--out", str(out), "--budget", "8"])
    assert res.exit_code != 0 and "budget=8 is below 2 * block = 128" in res.output
