"""Gradients: every method whose capability sheet says it is differentiable gives the gradients of
the float64 reference on the mask it attends with (at full budget: dense), passes
``torch.autograd.gradcheck``, and trains through the Hugging Face bridge. Regressions covered: the
block-sparse methods raised ``index_select(): functions with out=...`` under autograd; cca raised
an in-place error; the tiled kernel's LSE merge gave silently wrong query/key gradients (torch's
fused CPU kernel drops the gradient of its LSE output); two decode steps with ``q`` requiring grad
overwrote a buffer saved for backward."""

from __future__ import annotations

import warnings

import pytest
import torch

import longattn
from longattn.kernels.sdpa import fused_flash
from longattn.methods.base import Capabilities, Method, Result
from longattn.sparse.summaries import BlockSummaries
from conftest import CASES, FULL, full, make_qkv, oracle_for, without_fused_kernels


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, g.to(out.dtype)), g


@pytest.mark.parametrize("name,causal", CASES)
def test_gradients_equal_the_float64_reference(name, causal):
    m = full(name)
    assert m.capabilities.differentiable
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, hq=4, hk=2, tq=40, tk=40, d=16, seed=11))
    pad = None
    if name not in ("linformer", "cca", "routing", "hyper", "recycled", "loki", "tokenselect", "minference"):
        pad = torch.ones(2, 40, dtype=torch.bool)
        pad[1, :5] = False  # left padding in the second row
    out = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad)
    (gq, gk, gv), g = _grads(out, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle_for(m, q64, k64, v64, causal=causal, key_padding_mask=pad)[0]
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), g)
    for got, want, what in ((gq, rq, "dq"), (gk, rk, "dk"), (gv, rv, "dv")):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4, msg=f"{name} {what}")


@pytest.mark.parametrize("name,causal", CASES)
def test_gradcheck(name, causal):
    """Finite differences of the float64 inputs against the backward. The kernels compute in
    float32, so the step is 1e-3 (central differences: truncation ~1e-6, float32 rounding
    ~1e-7 / 1e-3) and the tolerances are float32's, not float64's."""
    m = full(name)
    q, k, v = (t.double().requires_grad_() for t in make_qkv(b=1, hq=2, hk=1, tq=7, tk=7, d=16, seed=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradcheck warns that the inputs are not float64-computed
        assert torch.autograd.gradcheck(lambda q, k, v: longattn.attention(q, k, v, causal=causal, method=m),
                                        (q, k, v), eps=1e-3, atol=2e-3, rtol=1e-2, nondet_tol=1e-6)


def test_the_lse_of_the_fused_kernel_is_differentiable():
    """Gradient sent into the LSE output reaches q and k: ∂lse_i/∂q_i = scale·Σ_j P_ij k_j."""
    q, k, v = (t.double().requires_grad_() for t in make_qkv(b=1, hq=2, hk=2, tq=5, tk=9, d=8, seed=2))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    mask = torch.zeros(1, 1, 5, 9)
    mask[..., 7:] = float("-inf")
    out, lse = fused_flash(q32, k32, v32, scale=0.3, attn_mask=mask)
    (lse.sum() + (out * 0.5).sum()).backward()
    q64, k64, v64 = (t.detach().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2)) * 0.3 + mask.double()
    ref_lse = torch.logsumexp(s, -1)
    ref_out = torch.softmax(s, -1) @ v64
    (ref_lse.sum() + (ref_out * 0.5).sum()).backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_decode_steps_with_q_requiring_grad_backpropagate():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    m = longattn.method("quest", budget=128, block=16, q_block=16, sinks=16, window=32)
    s = BlockSummaries.build(k, 16)
    qs = [torch.randn(1, 4, 1, 16, requires_grad=True) for _ in range(3)]
    outs = [longattn.attention(q, k, v, causal=True, method=m, summaries=s) for q in qs]
    sum(o.sum() for o in outs).backward()
    for q, o in zip(qs, outs):  # each step's gradient is its own (no buffer overwritten)
        q2 = q.detach().requires_grad_()
        longattn.attention(q2, k, v, causal=True, method=m, summaries=s).sum().backward()
        torch.testing.assert_close(q.grad, q2.grad)


def test_flex_backend_refuses_autograd_on_cpu_and_auto_takes_the_tiled_kernel(monkeypatch):
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, hq=2, hk=2, tq=32, tk=32, d=8))
    with pytest.raises(ValueError, match="backend='flex' has no backward on the CPU"):
        longattn.attention(q, k, v, causal=True, method=longattn.method("window", window=8, backend="flex"))
    with pytest.raises(ValueError, match="backend='flex' has no backward on the CPU"):
        longattn.attention(q, k, v, causal=True,
                           method=longattn.method("quest", budget=64, block=16, q_block=16, sinks=0, window=16,
                                                  backend="flex"))
    m = longattn.method("window", window=8)
    from longattn.methods import masked

    assert m.choose_backend(q, k, v, _call()) == "tiled"
    monkeypatch.setattr(masked, "FLEX_MIN_TOKENS", 1)  # auto would pick flex at this length ...
    assert m.choose_backend(q, k, v, _call()) == "tiled"  # ... but not under autograd
    with torch.no_grad():
        if longattn.kernels.flex.flex_unavailable_reason() is None:
            assert m.choose_backend(q, k, v, _call()) == "flex"  # the test can tell the two apart


def _call():
    from longattn.methods.base import Call

    return Call(causal=True, scale=0.25)


class _NoGrad(Method):
    name = "no_grad_test"
    capabilities = Capabilities(exact=True, differentiable=False)

    def run(self, q, k, v, call):
        return Result(q, None, "test")


def test_a_method_that_is_not_differentiable_refuses_inputs_that_require_grad():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=4, tk=4, d=8)
    with pytest.raises(ValueError, match="'no_grad_test' is not differentiable"):
        longattn.attention(q.requires_grad_(), k, v, method=_NoGrad())
    with torch.no_grad():
        longattn.attention(q, k, v, method=_NoGrad())
    longattn.attention(q.detach(), k, v, method=_NoGrad())


@pytest.mark.parametrize("name", ["landmark", "quest", "longheads", "cca", "window"])
def test_training_through_the_hf_bridge_equals_dense_at_full_budget(stories, name):
    """``model(ids, labels=ids)`` under ``hf.apply(model, method)`` backpropagates; at a budget that
    holds the whole input the parameter gradients are dense attention's."""
    import longattn.hf as hf

    model, _ = stories
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    kw = dict(FULL[name]) if name != "window" else dict(window=4096)

    def grads(method):
        model.zero_grad()
        with hf.apply(model, method):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads("dense")
    got = grads(longattn.method(name, **kw))
    assert got.keys() == want.keys() and len(got) > 10
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=2e-5, rtol=1e-3, msg=n)
    model.zero_grad()


@pytest.fixture
def without_the_fused_kernel(monkeypatch):
    """The paths taken where torch's fused kernels are missing (other devices, builds): eager
    matmul + softmax everywhere the fused op would run."""
    without_fused_kernels(monkeypatch)


@pytest.mark.parametrize("name,causal", CASES)
def test_gradients_without_the_fused_kernel(name, causal, without_the_fused_kernel):
    """Found on an H200: the eager path subtracted and exponentiated in place, which autograd
    refused for every block-sparse method and recycled."""
    m = full(name)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, hq=4, hk=2, tq=40, tk=40, d=16, seed=12))
    out = longattn.attention(q, k, v, causal=causal, method=m)
    (gq, gk, gv), g = _grads(out, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rq, rk, rv = torch.autograd.grad(oracle_for(m, q64, k64, v64, causal=causal)[0], (q64, k64, v64), g)
    for got, want in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4, msg=name)
