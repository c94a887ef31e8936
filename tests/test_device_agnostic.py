"""longattn creates every tensor on the device of the data it works on, so that CUDA inputs never
meet a tensor a factory call left on torch's default device.

On a machine without a GPU inputs and stray tensors are both on the CPU, and nothing shows. The
``OffDevice`` mode makes them differ: a ``TorchFunctionMode`` that gives every factory call
(``torch.arange``, ``zeros``, ``full``, ``tensor``, ``randn``, … — torch's own list, the calls that
``with torch.device(...)`` redirects) made *from longattn's source files* without ``device=`` the
``meta`` device, a device with shapes and no data. That is what ``with torch.device("meta"):``
does, limited to longattn's frames so that torch and transformers internals are left alone. Such a
tensor then fails at its first op with the inputs ("Tensor on device meta is not on the expected
device cpu!"), at ``.item()``/``int()``, or at ``.to(device)`` ("Cannot copy out of meta tensor");
every call site is also recorded (file:line), and a run with any recorded site fails naming them,
even one whose stray tensor never met an input (meta indices, for one, pass some indexing ops
silently). Results are compared with the plain run, bit for bit.

It catches a missing ``device=``: ``test_the_mode_catches_a_missing_device`` runs the patterns it
found in longattn itself before they were fixed (``kernels/layout.dense_pairs`` summed a
``torch.arange`` without a device; ``methods/hyper`` drew its hyperplanes on the default device
and moved them after) and shows each fail under the mode and pass once ``device=`` is given.

The CPU-only native kernels (``longattn.kernels.native*``) are left alone: they run only for CPU
tensors (``native.decode_blocks_applies``) and hand their buffers to C by address, which a meta
tensor would turn into a crash.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import longattn
from conftest import CASES, DEVICE, full, make_qkv, without_fused_kernels  # CASES: every method (test_hardening checks)
from longattn.kernels import native
from longattn.kernels import sdpa
from longattn.kernels.layout import dense_pairs
from longattn.core.positions import ALiBi, CoPE, RoPE, T5RelativeBias, XPos

PKG = os.path.dirname(longattn.__file__) + os.sep

class OffDevice(TorchFunctionMode):
    """Factory calls without ``device=`` from the owned source files land on ``meta`` and are
    recorded in ``sites`` (module docstring)."""

    def __init__(self, owned: tuple[str, ...] = (PKG,)):
        super().__init__()
        self.owned = owned
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code.co_filename  # factories are C functions: this is their caller
            if caller.startswith(self.owned) and not os.path.basename(caller).startswith("native"):
                where = os.path.relpath(caller, os.path.dirname(PKG)) if caller.startswith(PKG) else caller
                self.sites.append(f"{where}:{sys._getframe(1).f_lineno} torch.{func.__name__}")
                kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    if isinstance(x, longattn.AttentionStats):
        return [] if x.lse is None else [x.lse]
    return []


def off_device(fn, owned: tuple[str, ...] = (PKG,)):
    """``fn()`` under ``OffDevice``: it must run, create no tensor without ``device=`` and give the
    plain run's result (every tensor in it equal, same device). Returns the result."""
    want = fn()
    mode = OffDevice(owned)
    try:
        with mode:
            got = fn()
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}\nfactory calls without device=: {sorted(set(mode.sites))}")
    if mode.sites:  # even where the stray tensor never met an input, or slipped through an op
        pytest.fail(f"factory calls without device=: {sorted(set(mode.sites))}")
    a, b = _tensors(want), _tensors(got)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert y.device == x.device, (y.device, x.device)
        assert torch.equal(x, y), "the result differs from the plain run's"
    return got


@pytest.fixture(params=["fused", "portable"])
def kernels(request, monkeypatch):
    """Each test twice: with torch's fused kernel (CPU or CUDA) where longattn chooses it, and with
    the paths a device or build without one takes (the fused kernels reported unavailable)."""
    if request.param == "portable":
        without_fused_kernels(monkeypatch)
    return request.param


# -- the trick itself ---------------------------------------------------------------------------

def _dense_pairs_before_the_fix(tokens_q, tokens_k):
    rows = torch.arange(tokens_q, dtype=torch.int64) + (tokens_k - tokens_q) + 1
    return int(rows.clamp(max=tokens_k).sum())


def _planes_before_the_fix(q, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return q @ torch.randn(q.shape[-1], 4, generator=gen).to(q.device)


def _planes_fixed(q, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return q @ torch.randn(q.shape[-1], 4, generator=gen, device=gen.device).to(q.device)


def _shifted_before_the_fix(q):
    return q + torch.arange(q.shape[-1])


def _shifted_fixed(q):
    return q + torch.arange(q.shape[-1], device=q.device)


def _picked_before_the_fix(q):
    return q.index_select(-1, torch.arange(0, q.shape[-1], 2))  # a meta index passes this op


def test_the_mode_catches_a_missing_device():
    """The check fails on each pattern without ``device=`` and passes once it is given. (This
    file is "owned" here, as longattn's files are in every other test.)"""
    q = make_qkv(b=1, hq=2, hk=2, tq=3, tk=3, d=8)[0]
    owned = (PKG, __file__)
    for broken in (lambda: _dense_pairs_before_the_fix(5, 9), lambda: _planes_before_the_fix(q),
                   lambda: _shifted_before_the_fix(q), lambda: _picked_before_the_fix(q)):
        broken()  # fine on its own: inputs and stray tensors share the default device here
        with pytest.raises(pytest.fail.Exception, match=r"without device=: \['[^']*test_device_agnostic.py:\d+ torch\."):
            off_device(broken, owned)
    off_device(lambda: _planes_fixed(q), owned)
    off_device(lambda: _shifted_fixed(q), owned)
    off_device(lambda: dense_pairs(5, 9, True), owned)


# -- attention: every method, causal and not, with key padding, prefill and decode ---------------

@pytest.mark.parametrize("name,causal", CASES)
def test_every_method_creates_its_tensors_on_the_inputs_device(name, causal, kernels):
    m = full(name)
    for tq in (40, 1):
        q, k, v = make_qkv(b=2, hq=4, hk=2, tq=tq, tk=40, d=16, seed=3 + tq)
        pad = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
        pad[1, :5] = False
        for kpm in (None, pad):
            off_device(lambda: longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=kpm,
                                                  return_stats=True))


@pytest.mark.parametrize("name,causal", CASES)
def test_rows_that_see_no_key_get_finite_gradients_on_every_path(name, causal, kernels):
    """Left padding leaves the first queries of a row no key (causal). The paths other devices
    take (eager softmax pieces merged by LSE) gave NaN gradients there for every masked and
    block-sparse method, cca on the CPU too: ``torch.logsumexp``'s gradient of an all ``-inf`` row is NaN even when that
    LSE is masked out afterwards (``core.merge.row_logsumexp``)."""
    m = full(name)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, hq=4, hk=2, tq=40, tk=40, d=16, seed=12))
    pad = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    pad[1, :5] = False
    out = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for what, t in zip("qkv", grads):
        assert torch.isfinite(t).all(), f"d{what} has {int((~torch.isfinite(t)).sum())} non-finite values"
    if causal:  # the dead queries' own gradient is zero: they see nothing
        assert (grads[0][1, :, :5] == 0).all()


POSITIONS = {
    "rope": lambda hq, d: RoPE(d),
    "xpos": lambda hq, d: XPos(d),
    "alibi": lambda hq, d: ALiBi(hq),
    "alibi per row": lambda hq, d: ALiBi(hq, slopes=torch.rand(2, hq, generator=torch.Generator().manual_seed(1))),
    "t5": lambda hq, d: T5RelativeBias(hq),
    "cope": lambda hq, d: CoPE(d, hq),
}


@pytest.mark.parametrize("position", sorted(POSITIONS))
@pytest.mark.parametrize("name", ["dense", "dense_chunked", "window", "pattern", "longheads", "quest"])
def test_positions_create_their_tensors_on_the_inputs_device(name, position, kernels):
    m = full(name)
    enc = POSITIONS[position](4, 16)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=24, tk=40, d=16, seed=5)
    try:
        longattn.attention(q, k, v, causal=True, method=m, position=enc)
    except ValueError as exc:  # the method refuses this encoding, by its capability sheet
        pytest.skip(f"{name} does not take {position}: {exc}")
    off_device(lambda: longattn.attention(q, k, v, causal=True, method=m, position=enc, return_stats=True))


@pytest.mark.parametrize("name", ["dense", "dense_chunked", "window", "quest", "streaming"])
def test_call_options_create_their_tensors_on_the_inputs_device(name, kernels):
    """softcap, seqlens_k, top-left alignment, bfloat16 inputs, the float64 oracle, packed sequences."""
    m = full(name)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=24, tk=40, d=16, seed=6)
    lengths = torch.tensor([40, 29], device=DEVICE)
    off_device(lambda: longattn.attention(q, k, v, causal=True, method=m, seqlens_k=lengths, return_stats=True))
    off_device(lambda: longattn.attention(q, k, v, causal=True, method=m, align="top_left", return_stats=True))
    off_device(lambda: longattn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, method=m,
                                          compute_dtype="input"))
    if m.capabilities.exact:
        off_device(lambda: longattn.attention(q, k, v, causal=True, method=m, softcap=5.0, return_stats=True))
    off_device(lambda: longattn.reference_attention(q, k, v, causal=True))
    cu_q = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE)
    off_device(lambda: longattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                                 cu_q, cu_k, causal=True, method=m, return_lse=True))


# -- the kernels behind them ----------------------------------------------------------------------

def test_sparse_decode_step_creates_its_tensors_on_the_inputs_device(kernels, monkeypatch):
    """The lean decode path of block retrieval (the gather kernel; the native one is CPU-only)."""
    from longattn.sparse import decode
    from longattn.sparse.select import quest_bound_estimate
    from longattn.sparse.summaries import BlockSummaries

    monkeypatch.setattr(native, "decode_blocks_applies", lambda *a, **kw: False)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=1, tk=300, d=16, seed=7)
    s = BlockSummaries.build(k, 16)
    for n_sel, sinks, window in ((6, 16, 32), (19, 16, 32), (2, 16, 32), (4, 0, 0)):
        off_device(lambda: tuple(decode.decode_step(q, k, v, s, quest_bound_estimate, scale=0.25, n_sel=n_sel,
                                                    sinks=sinks, window=window, native_decode=False)[:2]))
    m = longattn.method("quest", budget=96, block=16, q_block=1, sinks=16, window=32)
    off_device(lambda: longattn.attention(q, k, v, causal=True, method=m, summaries=s, return_stats=True))


@pytest.mark.parametrize("causal", [False, True])
def test_fused_flash_off_the_cpu_gives_out_lse_and_their_gradients(causal, monkeypatch):
    """``fused_flash`` where torch's fused CPU op does not run (any device but the CPU): the float64
    oracle's output and LSE, gradients through both, zeros and ``-inf`` for rows that see no key."""
    without_fused_kernels(monkeypatch)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, hq=3, hk=3, tq=20, tk=20, d=8, seed=8))
    visible = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(2)) > 0.3
    visible[0, 0, 4] = False  # a row that sees nothing
    visible = visible.to(DEVICE)
    add = torch.zeros(visible.shape, device=DEVICE).masked_fill(~visible, -math.inf)
    out, lse = sdpa.fused_flash(q, k, v, scale=0.3, causal=causal, attn_mask=add)
    assert out.device == q.device and lse.dtype == torch.float32
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = visible & torch.ones(20, 20, dtype=torch.bool, device=DEVICE).tril() if causal else visible
    ref, ref_lse = longattn.reference_attention(q64, k64, v64, mask=mask, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert (out[0, :, 4] == 0).all() and torch.isneginf(lse[0, :, 4]).all()
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(out.shape, generator=g).to(DEVICE)
    w_lse = torch.randn(lse.shape, generator=g).to(DEVICE).masked_fill(torch.isneginf(lse), 0.0)
    got = torch.autograd.grad((out * w_out).sum() + (lse.masked_fill(torch.isneginf(lse), 0.0) * w_lse).sum(),
                              (q, k, v))
    alive = ~torch.isneginf(ref_lse)
    want = torch.autograd.grad((ref * w_out).sum() + (ref_lse.masked_fill(~alive, 0.0) * w_lse).sum(),
                               (q64, k64, v64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
    off_device(lambda: sdpa.fused_flash(q.detach(), k.detach(), v.detach(), scale=0.3, causal=causal, attn_mask=add))


# -- the KV memory --------------------------------------------------------------------------------

def _feed(mem, q, k, v, ok, chunk):
    outs = [mem.attend(q[:, :, i:i + chunk], k[:, :, i:i + chunk], v[:, :, i:i + chunk], ok[:, i:i + chunk], 0.25)
            for i in range(0, q.shape[2], chunk)]
    return torch.cat(outs, 2), mem.tokens_per_head()


def _memories(tmp_path):
    from longattn.memory import EvictingMemory, KeyRotation, PagedMemory
    from longattn.memory.policies import make_policy
    from longattn.memory.retrieval import RetrievalMemory

    rot = KeyRotation(10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64, device=DEVICE) / 16))
    made = {name: (lambda name=name, kw=kw: EvictingMemory([([0, 1], make_policy(name, **kw))], 2, rot))
            for name, kw in (("full", {}), ("streaming", dict(sinks=4, window=20)), ("h2o", dict(budget=24)),
                             ("tova", dict(budget=24)), ("snapkv", dict(budget=24)))}
    made["heads"] = lambda: EvictingMemory([([0], make_policy("full")), ([1], make_policy("streaming", sinks=4,
                                                                                          window=12))], 2, rot)
    made["paged quest, host and disk"] = lambda: PagedMemory(2, rot, page=8, sinks=8, window=16, topk=2,
                                                             host_tokens=16, disk_dir=tmp_path / "disk")
    made["paged mean"] = lambda: PagedMemory(2, None, page=8, sinks=8, window=16, topk=2, score="mean",
                                             positions="original")
    made["retrieval"] = lambda: RetrievalMemory(2, rot, retrieve=16, page=8, sinks=8, window=16, backend="exact",
                                                measure_recall=True)
    return made


def test_memories_create_their_tensors_on_the_inputs_device(tmp_path):
    """Every memory policy, the paged memory across its tiers (the fast tier on the inputs' device,
    host pages on the CPU, disk pages read back to the device), index retrieval, and save/load."""
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=70, tk=70, d=16, seed=9)
    ok = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    ok[1, :6] = False
    for name, make in _memories(tmp_path).items():
        off_device(lambda: _feed(make(), q, k, v, ok, chunk=9))

        def roundtrip():
            mem = make()
            _feed(mem, q[:, :, :60], k[:, :, :60], v[:, :, :60], ok[:, :60], chunk=9)
            tensors, meta = mem.state()
            back = make()
            back.load_state({n: t.cpu() for n, t in tensors.items()}, meta, q.device)  # as read from a file
            return back.attend(q[:, :, 60:], k[:, :, 60:], v[:, :, 60:], ok[:, 60:], 0.25), back.tokens_per_head()
        off_device(roundtrip)
    paged = _memories(tmp_path)["paged quest, host and disk"]()
    _feed(paged, q, k, v, ok, chunk=9)
    assert paged.disk is not None and len(paged.disk) and paged.host
    assert all(t.device == q.device for page in paged.fast.values() for t in page)
    assert all(t.device.type == "cpu" for page in paged.host.values() for t in page)
    assert all(t.device == q.device for t in paged._pages(sorted(paged.disk.where))[0])


# -- the Hugging Face bridge ----------------------------------------------------------------------

def _left_padded(tok):
    rows = [[1] + tok.encode("Once upon a time, there was a little girl named Lily."), [1] + tok.encode("Tom ran.")]
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows], device=DEVICE)
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=DEVICE)
    return ids, mask


HF_METHODS = {
    "dense": {}, "dense_chunked": dict(chunk=16), "streaming": dict(sinks=4, window=8),
    "quest": dict(budget=48, block=8, q_block=8, sinks=8, window=8), "tokenselect": dict(budget=12),
    "longheads": dict(window=32, chunk=8, local=8), "hyper": dict(block=8, samples=4, min_seq=8),
}


@pytest.mark.parametrize("name", sorted(HF_METHODS))
def test_hf_bridge_creates_its_tensors_on_the_models_device(stories, name):
    import longattn.hf as hf

    model, tok = stories
    ids, mask = _left_padded(tok)

    n = ids.shape[1]
    general = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()[None, None].repeat(2, 1, 1, 1)
    general[1, :, 3, :] = False  # a 4-D mask given by the caller, with a query that sees nothing

    def logits():
        with torch.no_grad(), hf.apply(model, name, **HF_METHODS[name]):
            out = [model(input_ids=ids, attention_mask=mask).logits]
            if name in ("dense", "dense_chunked"):  # the only methods that follow a general 4-D mask
                out.append(model(input_ids=ids, attention_mask=general).logits)
            return out
    off_device(logits)


@pytest.mark.parametrize("policy,params", [
    ("full", {}), ("streaming", dict(budget=12)), ("h2o", dict(budget=12)), ("tova", dict(budget=12)),
    ("snapkv", dict(budget=12)), ("heads", dict(head_map=[[True, False, True, False]] * 5, window=8)),
    ("blocks", dict(page=4, sinks=4, window=8, topk=2, host_tokens=8)), ("longheads", dict(page=4, sinks=4, window=8,
                                                                                           topk=2)),
    ("retrieval", dict(page=4, sinks=4, window=8, retrieve=8, backend="exact")),
])
def test_longattn_cache_creates_its_tensors_on_the_models_device(stories, policy, params, tmp_path):
    import longattn.hf as hf

    model, tok = stories
    ids = torch.tensor([[1] + tok.encode("Once upon a time, there was a little girl named Lily.")], device=DEVICE)
    kw = dict(params, disk_dir=tmp_path) if "host_tokens" in params else params

    def generate():
        with torch.no_grad(), hf.apply(model, "dense"):
            cache = hf.LongattnCache(model, policy, **kw)
            out = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
            path = tmp_path / f"{policy}.safetensors"
            cache.save(path)
            again = hf.LongattnCache(model, policy, **kw).load(path)
            return out, again.stats()["tokens"] == cache.stats()["tokens"]
    out, same = off_device(generate)
    assert same


@pytest.mark.parametrize("method", ["razor", "duo"])
def test_head_calibration_creates_its_tensors_on_the_models_device(stories, method):
    from longattn.memory.calibrate import calibrate_heads

    model, _ = stories
    run = lambda: calibrate_heads(model, n_samples=2, length=48, span=4, sinks=4, window=8,  # noqa: E731
                                  method=method)
    assert off_device(run) == run()
