"""The KV memory (``longattn.memory``) on its own: re-rotation, the layout kernel, eviction
policies with real token dropping, the paged tiered memory, and save/load."""

import math

import pytest
import torch

from longattn.memory import EvictingMemory, FullKV, H2O, KeyRotation, PagedMemory, SnapKV, StreamingLLM, TOVA
from longattn.memory import store
from longattn.memory.kernel import attend_layout
from longattn.memory.policies import make_policy
from conftest import DEVICE

D = 16
INV = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)


def rope(x, pos):
    """Rotate-half RoPE of ``x [B, H, T, D]`` at integer positions ``pos [T]`` or ``[B, H, T]`` (float64 angles)."""
    ang = pos.to(torch.float64)[..., None] * INV
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference(q, k, v, ok, n_new, scale):
    """float64 attention with every old key visible and the last ``n_new`` keys causal."""
    b, hq, lq, d = q.shape
    h, n = k.shape[1], k.shape[2]
    kr = k.double().repeat_interleave(hq // h, 1)
    vr = v.double().repeat_interleave(hq // h, 1)
    s = q.double() @ kr.transpose(-1, -2) * scale
    vis = torch.ones(lq, n, dtype=torch.bool)
    vis[:, n - n_new:] = torch.ones(n_new, n_new, dtype=torch.bool).tril()
    mask = ok.repeat_interleave(hq // h, 1)[:, :, None, :] & vis
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vr


def test_rotation_moves_a_rotated_key_exactly():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 10, D)
    old = torch.randint(0, 5000, (2, 3, 10))
    delta = torch.randint(-4000, 4000, (2, 3, 10))
    got = KeyRotation(INV).rotate(rope(k.double(), old), delta)
    torch.testing.assert_close(got, rope(k.double(), old + delta), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="head_dim"):
        KeyRotation(INV).rotate(torch.randn(1, 1, 2, 8), torch.ones(1, 1, 2, dtype=torch.long))


def test_layout_kernel_matches_float64_with_gqa_padding_and_empty_rows():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, D), torch.randn(2, 2, 12, D), torch.randn(2, 2, 12, D)
    ok = torch.rand(2, 2, 12) > 0.3
    ok[1] = False  # row 1 sees no key at all: zeros, not NaN
    out, probs = attend_layout(q, k, v, ok, 0.25, want_probs=True)
    torch.testing.assert_close(out.double(), reference(q, k, v, ok, 5, 0.25), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert probs.shape == (2, 2, 2, 5, 12)
    # no padding and no probabilities wanted: the SDPA path, same answer as the explicit softmax
    full = torch.ones(2, 2, 12, dtype=torch.bool)
    fast, none = attend_layout(q, k, v, full, 0.25)
    slow, _ = attend_layout(q, k, v, full, 0.25, want_probs=True)
    assert none is None
    torch.testing.assert_close(fast.double(), reference(q, k, v, full, 5, 0.25), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def feed(mem, q, k, v, chunk, ok=None, scale=0.25):
    outs = []
    for i in range(0, q.shape[2], chunk):
        sl = slice(i, i + chunk)
        outs.append(mem.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], None if ok is None else ok[:, sl], scale))
    return torch.cat(outs, 2)


def qkv(t, b=1, hq=4, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, t, D, generator=g), torch.randn(b, h, t, D, generator=g), torch.randn(b, h, t, D, generator=g)


@pytest.mark.parametrize("policy", [FullKV(), StreamingLLM(sinks=4, window=500), H2O(budget=500), TOVA(budget=500),
                                    SnapKV(budget=500)])
def test_every_policy_at_full_budget_is_exact_attention(policy):
    q, k, v = qkv(200)
    pos = torch.arange(200)
    qr, kr = rope(q, pos), rope(k, pos)
    got = feed(EvictingMemory([([0, 1], policy)], 2, KeyRotation(INV)), qr, kr, v, chunk=32)
    want = reference(qr, kr, v, torch.ones(1, 2, 200, dtype=torch.bool), 200, 0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["streaming", "h2o", "tova", "snapkv"])
def test_budget_is_never_exceeded_and_tokens_are_really_dropped(name):
    q, k, v = qkv(300)
    budget = 40
    mem = EvictingMemory([([0, 1], make_policy(name, budget=budget, **({"sinks": 4} if name == "streaming" else {})))],
                         2, KeyRotation(INV))
    for i in range(0, 300, 7):
        mem.attend(q[:, :, i:i + 7], k[:, :, i:i + 7], v[:, :, i:i + 7], None, 0.25)
        assert max(mem.slots_per_head()) <= budget
    grp = mem.groups[0]
    assert grp.k.shape == (1, 2, budget, D)  # the tensor itself shrank: dropped, not masked
    assert mem.tokens_per_head().tolist() == [[budget, budget]]
    assert mem.nbytes()["fast"] == 2 * budget * 2 * D * 4
    assert (grp.idx.diff(dim=-1) > 0).all()  # kept in order


def test_streaming_keeps_sinks_and_window_at_cache_positions():
    """After eviction a query sees sinks + window as if they were a contiguous prefix: its output
    equals attention over those keys rotated at positions 0..n-1 and the query at n."""
    t, sinks, window = 120, 4, 20
    q, k, v = qkv(t)
    pos = torch.arange(t)
    mem = EvictingMemory([([0, 1], StreamingLLM(sinks=sinks, window=window))], 2, KeyRotation(INV))
    out = feed(mem, rope(q, pos), rope(k, pos), v, chunk=1)
    kept = torch.cat([torch.arange(sinks), torch.arange(t - 1 - window, t)])  # before the last step
    n = len(kept)
    want = reference(rope(q[:, :, -1:], torch.tensor([n - 1])), rope(k[:, :, kept], torch.arange(n)), v[:, :, kept],
                     torch.ones(1, 2, n, dtype=torch.bool), 1, 0.25)
    torch.testing.assert_close(out[:, :, -1:].double(), want, atol=1e-5, rtol=1e-5)
    orig = feed(EvictingMemory([([0, 1], StreamingLLM(sinks=sinks, window=window))], 2, KeyRotation(INV), "original"),
                rope(q, pos), rope(k, pos), v, chunk=1)
    assert (orig[:, :, -1] - out[:, :, -1]).abs().max() > 1e-3  # positions really differ


def test_h2o_keeps_the_heavy_hitters():
    q, k, v = qkv(64, hq=2, h=1)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(5)), dim=0)
    q[:, :, 11:] += 3 * u
    k[:, :, 10] = 6 * u  # every later query attends key 10 heavily
    mem = EvictingMemory([([0], H2O(budget=16, window=8))], 1, None)
    feed(mem, q, k, v, chunk=4)
    assert 10 in mem.groups[0].idx[0, 0].tolist()


def test_head_groups_hold_different_token_counts():
    q, k, v = qkv(100)
    mem = EvictingMemory([([0], FullKV()), ([1], StreamingLLM(sinks=2, window=10))], 2, KeyRotation(INV))
    feed(mem, q, k, v, chunk=9)
    assert mem.tokens_per_head().tolist() == [[100, 12]]
    with pytest.raises(ValueError, match="cover key heads"):
        EvictingMemory([([0], FullKV())], 2, None)


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="budget"):
        H2O(budget=0)
    with pytest.raises(ValueError, match="exceed budget"):
        TOVA(budget=8, sinks=6, window=6)
    with pytest.raises(ValueError, match="odd"):
        SnapKV(budget=64, kernel=4)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("lru", budget=4)
    with pytest.raises(ValueError, match="positions"):
        EvictingMemory([([0], FullKV())], 1, None, positions="relative")


# -- the paged memory --------------------------------------------------------------------------


def test_paged_memory_at_full_budget_is_exact_with_padding():
    q, k, v = qkv(150, b=2)
    pos = torch.arange(150)
    qr, kr = rope(q, pos), rope(k, pos)
    ok = torch.ones(2, 150, dtype=torch.bool)
    ok[1, :37] = False  # left padding
    mem = PagedMemory(2, KeyRotation(INV), page=16, sinks=16, window=32, topk=100)
    got = feed(mem, qr, kr, v, chunk=13, ok=ok)
    want = reference(qr, kr, v, ok[:, None].expand(2, 2, 150), 150, 0.25)
    torch.testing.assert_close(got[:, :, :].double()[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double()[1, :, 37:], want[1, :, 37:], atol=1e-5, rtol=1e-5)


def test_paged_memory_retrieves_the_planted_block_and_bounds_the_fast_tier(tmp_path):
    q, k, v = qkv(2000, hq=2, h=1, seed=3)
    target = 700  # a block far outside the window that the last queries point at
    k[:, :, target:target + 16] = q[:, :, -1:].expand(1, 2, 16, D).mean(1, keepdim=True) * 4
    mem = PagedMemory(1, None, page=16, sinks=16, window=64, topk=2, host_tokens=256, disk_dir=tmp_path)
    feed(mem, q, k, v, chunk=50)
    assert mem.peak_fast_tokens <= mem.fast_budget == 16 + 64 + 16
    nb = mem.nbytes()
    assert nb["disk"] > 0 and nb["host"] <= 256 * 16 * 4 * 2 and nb["fast"] <= mem.fast_budget * 16 * 4 * 2
    assert list(tmp_path.glob("segment-*.safetensors"))
    sel = mem._select(q[:, :, -1:], 1, mem._regions(mem.seen)[1] // 16, 2, 0.25, 2)
    assert target // 16 in sel[0, 0].tolist()
    # tiers never change the numbers
    same = PagedMemory(1, None, page=16, sinks=16, window=64, topk=2)
    a = feed(PagedMemory(1, None, page=16, sinks=16, window=64, topk=2, host_tokens=0, disk_dir=tmp_path / "d"),
             q, k, v, chunk=50)
    assert torch.equal(a, feed(same, q, k, v, chunk=50))


# -- save / load -------------------------------------------------------------------------------


def _roundtrip(make, tmp_path):
    q, k, v = qkv(300)
    a = make()
    feed(a, q[:, :, :299], k[:, :, :299], v[:, :, :299], chunk=23)
    path = tmp_path / "m.safetensors"
    store.save(path, [a.state()], {"model": "x"})
    b = make()
    (tensors, meta), = store.load(path, {"model": "x"})
    b.load_state(tensors, meta, DEVICE)
    last = (q[:, :, 299:], k[:, :, 299:], v[:, :, 299:], None, 0.25)
    assert torch.equal(a.attend(*last), b.attend(*last))  # bit-identical
    return path


def test_save_load_is_bit_identical_and_refuses_tampering_and_mismatch(tmp_path):
    _roundtrip(lambda: EvictingMemory([([0, 1], H2O(budget=50))], 2, KeyRotation(INV)), tmp_path)
    path = _roundtrip(lambda: PagedMemory(2, KeyRotation(INV), page=16, sinks=16, window=32, topk=3, host_tokens=32,
                                          disk_dir=tmp_path / "disk"), tmp_path)
    with pytest.raises(ValueError, match="different model"):
        store.load(path, {"model": "y"})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        store.load(bad, {"model": "x"})
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable"):
        store.load(tmp_path / "junk.safetensors", {"model": "x"})
    with pytest.raises(FileNotFoundError):
        store.load(tmp_path / "missing.safetensors", {"model": "x"})
    (tensors, meta), = store.load(path, {"model": "x"})
    with pytest.raises(ValueError, match="this cache uses"):
        PagedMemory(2, None, page=16, sinks=16, window=32, topk=4).load_state(tensors, meta, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_disk_tier_reads_back_every_dtype_bit_for_bit(dtype, tmp_path):
    from longattn.memory.tiers import DiskTier

    g = torch.Generator().manual_seed(1)
    pages = {p: (torch.randn(2, 3, 8, 4, generator=g).to(dtype), torch.randn(2, 3, 8, 4, generator=g).to(dtype))
             for p in range(10)}
    tier = DiskTier(tmp_path)
    tier.write({p: pages[p] for p in range(6)})
    tier.write({p: pages[p] for p in range(6, 10)})
    for p in (0, 5, 9):
        k, v = tier.read(p, DEVICE)
        assert k.dtype == dtype and torch.equal(k, pages[p][0]) and torch.equal(v, pages[p][1])
    got = tier.read_many([9, 1, 7, 3], DEVICE)  # across both segments, any order
    assert sorted(got) == [1, 3, 7, 9]
    for p, (k, v) in got.items():
        assert torch.equal(k, pages[p][0]) and torch.equal(v, pages[p][1])
    with pytest.raises(TypeError, match="disk tier stores"):
        tier.write({20: (torch.zeros(1, 1, 8, 4, dtype=torch.int32), torch.zeros(1, 1, 8, 4, dtype=torch.int32))})
