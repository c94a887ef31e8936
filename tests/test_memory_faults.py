"""The KV memory under faults: a failing or vanished disk tier, tiers sharing one folder, a save
killed or failing midway, files whose fields were edited (and re-hashed, so the checksum passes),
non-finite keys for the retrieval index, and temporary disk folders at exit."""

import errno
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from longattn.memory import H2O, EvictingMemory, KeyRotation, PagedMemory, store
from longattn.memory.retrieval import RetrievalMemory
from longattn.memory.tiers import DiskTier
from conftest import DEVICE
from test_memory import INV, feed, qkv

import safetensors.torch as st


def paged(disk_dir=None, host_tokens=32):
    return PagedMemory(2, KeyRotation(INV), page=16, sinks=16, window=32, topk=3, host_tokens=host_tokens,
                       disk_dir=disk_dir)


def snapshot(mem):
    tensors, meta = mem.state()
    return {k: v.clone() for k, v in tensors.items()}, json.dumps(meta, sort_keys=True)


def assert_same_state(a, b):
    (ta, ma), (tb, mb) = a, b
    assert ma == mb
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def failing_save_file(tensors, filename, metadata=None):
    """A ``save_file`` that dies of a full disk halfway: a partial file is left behind."""
    with open(filename, "wb") as f:
        f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


# -- 1. a failed disk-tier write loses nothing ---------------------------------------------------


def test_a_failed_disk_write_keeps_every_page_and_the_memory_usable(tmp_path, monkeypatch):
    q, k, v = qkv(400, seed=4)
    mem, ref = paged(tmp_path / "disk"), paged(host_tokens=None)  # ref: no disk tier, same numbers
    assert torch.equal(feed(mem, q[:, :, :150], k[:, :, :150], v[:, :, :150], 23),
                       feed(ref, q[:, :, :150], k[:, :, :150], v[:, :, :150], 23))
    assert len(mem.disk) > 0
    segments = sorted(os.listdir(tmp_path / "disk"))
    monkeypatch.setattr(st, "save_file", failing_save_file)
    with pytest.warns(RuntimeWarning, match="disk tier"):
        got = feed(mem, q[:, :, 150:250], k[:, :, 150:250], v[:, :, 150:250], 23)
    assert torch.equal(got, feed(ref, q[:, :, 150:250], k[:, :, 150:250], v[:, :, 150:250], 23))
    assert sorted(os.listdir(tmp_path / "disk")) == segments  # no partial segment left
    pages = list(range(mem.n_pages))
    assert all(p in mem.fast or p in mem.host or p in mem.disk for p in pages)
    for (ka, va), (kb, vb) in zip(mem._pages(pages), ref._pages(pages)):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    monkeypatch.undo()  # the disk is back
    assert len(mem.host) * mem.page > mem.host_tokens  # what could not be spilled is still held
    store.save(tmp_path / "during.safetensors", [mem.state()], {"model": "x"})
    # the next step spills what the host holds over budget
    got = feed(mem, q[:, :, 250:399], k[:, :, 250:399], v[:, :, 250:399], 23)
    assert torch.equal(got, feed(ref, q[:, :, 250:399], k[:, :, 250:399], v[:, :, 250:399], 23))
    assert len(mem.host) * mem.page <= mem.host_tokens
    store.save(tmp_path / "after.safetensors", [mem.state()], {"model": "x"})
    back = paged(tmp_path / "disk2")
    (tensors, meta), = store.load(tmp_path / "after.safetensors", {"model": "x"})
    back.load_state(tensors, meta, DEVICE)
    last = (q[:, :, 399:], k[:, :, 399:], v[:, :, 399:], None, 0.25)
    assert torch.equal(back.attend(*last), mem.attend(*last))


def test_a_deleted_disk_folder_loses_nothing(tmp_path):
    q, k, v = qkv(300, seed=5)
    mem, ref = paged(tmp_path / "disk"), paged(host_tokens=None)
    feed(mem, q[:, :, :150], k[:, :, :150], v[:, :, :150], 23)
    feed(ref, q[:, :, :150], k[:, :, :150], v[:, :, :150], 23)
    shutil.rmtree(tmp_path / "disk")
    got = feed(mem, q[:, :, 150:], k[:, :, 150:], v[:, :, 150:], 23)
    assert torch.equal(got, feed(ref, q[:, :, 150:], k[:, :, 150:], v[:, :, 150:], 23))
    pages = list(range(mem.n_pages))
    for (ka, va), (kb, vb) in zip(mem._pages(pages), ref._pages(pages)):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    store.save(tmp_path / "m.safetensors", [mem.state()], {"model": "x"})
    (tensors, _), = store.load(tmp_path / "m.safetensors", {"model": "x"})
    assert torch.equal(tensors["pages_k"], ref.state()[0]["pages_k"])


def test_a_disk_tier_write_is_all_or_nothing_and_reports_an_os_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    page = lambda i: (torch.full((1, 1, 4, 2), float(i)), torch.full((1, 1, 4, 2), -float(i)))  # noqa: E731
    tier = DiskTier(tmp_path)
    tier.write({0: page(0), 1: page(1)})
    files, nbytes = sorted(os.listdir(tmp_path)), tier.nbytes
    monkeypatch.setattr(st, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        tier.write({2: page(2)})

    def safetensors_error(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(st, "save_file", safetensors_error)
    with pytest.raises(OSError) as err:
        tier.write({2: page(2)})
    assert err.value.errno == errno.ENOSPC and str(tmp_path) in str(err.value)
    assert sorted(os.listdir(tmp_path)) == files and tier.nbytes == nbytes and 2 not in tier and len(tier) == 2
    monkeypatch.undo()
    tier.write({2: page(2)})
    assert [tier.read(p, DEVICE)[0][0, 0, 0, 0].item() for p in range(3)] == [0.0, 1.0, 2.0]


# -- 2. tiers sharing a folder keep their own pages ------------------------------------------------


def test_two_tiers_in_one_folder_keep_their_own_pages(tmp_path, monkeypatch):
    def in_place(tensors, filename, metadata=None):  # how older safetensors wrote: into the file itself
        data = st.save(tensors, metadata)
        with open(filename, "r+b" if os.path.exists(filename) else "wb") as f:
            f.write(data)
            f.truncate()
    monkeypatch.setattr(st, "save_file", in_place)
    a, b = DiskTier(tmp_path), DiskTier(tmp_path)
    a.write({0: (torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))})
    b.write({0: (torch.full((1, 1, 4, 2), 2.0), torch.full((1, 1, 4, 2), 2.0))})
    assert torch.equal(a.read(0, DEVICE)[0], torch.ones(1, 1, 4, 2))
    assert torch.equal(b.read(0, DEVICE)[0], torch.full((1, 1, 4, 2), 2.0))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    a.close()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # a removes its segments, not b's
    assert torch.equal(b.read(0, DEVICE)[0], torch.full((1, 1, 4, 2), 2.0))


# -- 3. a save killed or failing midway keeps the previous file -------------------------------------


@pytest.mark.cpu_only(reason="runs its memory on the CPU in a subprocess")
def test_a_save_killed_midway_keeps_the_previous_file(tmp_path):
    path = tmp_path / "m.safetensors"
    script = textwrap.dedent(f"""
        import sys, time, torch
        import safetensors.torch as st
        from longattn.memory import PagedMemory, store
        mem = PagedMemory(1, None, page=16, sinks=16, window=32, topk=2)
        x = torch.randn(1, 1, 100, 16, generator=torch.Generator().manual_seed(0))
        mem.attend(x, x, x, None, 0.25)
        store.save({str(path)!r}, [mem.state()], {{"model": "x"}})
        def slow(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(st.save(tensors, metadata)[:1000])
                f.flush()
            print("writing", flush=True)
            time.sleep(120)
        st.save_file = slow
        mem.attend(x, x, x, None, 0.25)
        store.save({str(path)!r}, [mem.state()], {{"model": "x"}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        proc.stdout.close()
    (tensors, meta), = store.load(path, {"model": "x"})
    assert meta["seen"] == 100


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    mem = paged()
    q, k, v = qkv(100)
    feed(mem, q, k, v, 23)
    path = tmp_path / "m.safetensors"
    store.save(path, [mem.state()], {"model": "x"})
    feed(mem, q, k, v, 23)
    monkeypatch.setattr(st, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        store.save(path, [mem.state()], {"model": "x"})
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert store.load(path, {"model": "x"})[0][1]["seen"] == 100


# -- 5. save errors are OSErrors naming the path --------------------------------------------------


def test_a_safetensors_error_while_saving_is_an_os_error_naming_the_path(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(st, "save_file", full)
    mem = paged()
    q, k, v = qkv(40)
    feed(mem, q, k, v, 23)
    path = tmp_path / "m.safetensors"
    with pytest.raises(OSError) as err:
        store.save(path, [mem.state()], {"model": "x"})
    assert not isinstance(err.value, SafetensorError)
    assert err.value.errno == errno.ENOSPC and str(path) in str(err.value) and "No space left" in str(err.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.cpu_only(reason="runs its memory on the CPU in a subprocess")
def test_a_real_write_failure_while_saving_is_an_os_error(tmp_path):
    # a file-size limit makes the real safetensors writer fail (EFBIG) as a full disk would
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from longattn.memory import store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))
        try:
            store.save({str(tmp_path / "m.safetensors")!r}, [({{"x": torch.zeros(100000)}}, {{}})], {{}})
        except OSError as e:
            print(type(e).__name__, e.errno, e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"OSError {errno.EFBIG}" in proc.stdout and str(tmp_path / "m.safetensors") in proc.stdout
    assert os.listdir(tmp_path) == []


# -- 4. a load validates every field first and is all-or-nothing ----------------------------------


def rewrite(path, out, edit):
    """``path`` with ``edit(tensors, info)`` applied, re-hashed so that the checksum passes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    info = json.loads(header["longattn"])
    edit(tensors, info)
    tensors = {n: t.contiguous() for n, t in tensors.items()}  # safetensors refuses a sliced edit's view
    description = json.dumps(info, sort_keys=True)
    st.save_file(tensors, str(out), metadata={"longattn": description, "sha256": store._digest(tensors, description)})
    return out


def set_meta(key, fn):
    def edit(tensors, info):
        info["layers"][0][key] = fn(info["layers"][0][key])
    return edit


def set_tensor(name, fn):
    def edit(tensors, info):
        tensors[f"layer0.{name}"] = fn(tensors[f"layer0.{name}"].clone())
    return edit


def poke(value, *at):
    def fn(t):
        t[at] = value
        return t
    return fn


def drop(name):
    def edit(tensors, info):
        del tensors[f"layer0.{name}"]
    return edit


PAGED_EDITS = {
    "seen + 1000": (set_meta("seen", lambda s: s + 1000), "seen"),
    "seen negative": (set_meta("seen", lambda s: -1), "seen"),
    "seen a string": (set_meta("seen", lambda s: "12"), "seen"),
    "seen a float": (set_meta("seen", lambda s: s + 0.5), "seen"),
    "NaN page": (set_tensor("pages_k", poke(math.nan, 3, 0, 1, 2, 3)), "pages_k"),
    "inf value in the tail": (set_tensor("tail_v", poke(math.inf, 0, 0, 1, 2)), "tail_v"),
    "a page short": (set_tensor("pages_k", lambda t: t[:-1]), "pages_k"),
    "pages of another dtype": (set_tensor("pages_v", lambda t: t.double()), "pages_v"),
    "pages of another head count": (set_tensor("pages_k", lambda t: torch.cat([t, t[:, :, :1]], 2)), "pages_k"),
    "tail one token long": (set_tensor("tail_k", lambda t: torch.cat([t, t[:, :, :1]], 2)), "tail_k"),
    "ok mask short": (set_tensor("ok", lambda t: t[:, :-1]), "ok"),
    "ok mask not bool": (set_tensor("ok", lambda t: t.long()), "ok"),
    "block counts": (set_tensor("sum.count", lambda t: t + 1), "sum.count"),
    "NaN summary": (set_tensor("sum.kmin", poke(math.nan, 0, 1, 2, 3)), "sum.kmin"),
    "summary shape": (set_tensor("sum.kmax", lambda t: t[:, :, :-1]), "sum.kmax"),
    "missing tensor": (drop("tail_v"), "tail_v"),
    "unexpected tensor": (lambda tensors, info: tensors.__setitem__("layer0.bogus", torch.zeros(2)), "bogus"),
}


def check_refused(tmp_path, make, data, edit, field):
    """Save ``make()`` fed ``data``; load the edited file into another ``make()`` fed other data:
    a ValueError naming ``field``, and that memory exactly as before (state and next step)."""
    (q, k, v), (q2, k2, v2) = data
    src = make(tmp_path / "src")
    feed(src, q[:, :, :299], k[:, :, :299], v[:, :, :299], 23)
    good = tmp_path / "good.safetensors"
    store.save(good, [src.state()], {"model": "x"})
    bad = rewrite(good, tmp_path / "bad.safetensors", edit)
    dst, twin = make(tmp_path / "dst"), make(tmp_path / "twin")
    feed(dst, q2[:, :, :150], k2[:, :, :150], v2[:, :, :150], 23)
    feed(twin, q2[:, :, :150], k2[:, :, :150], v2[:, :, :150], 23)
    before = snapshot(dst)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        (tensors, meta), = store.load(bad, {"model": "x"})
        dst.load_state(tensors, meta, DEVICE)
    assert "expected" in str(err.value)
    assert_same_state(snapshot(dst), before)
    step = (q2[:, :, 150:160], k2[:, :, 150:160], v2[:, :, 150:160], None, 0.25)
    assert torch.equal(dst.attend(*step), twin.attend(*step))
    return err.value


@pytest.mark.parametrize("case", sorted(PAGED_EDITS))
def test_an_edited_paged_memory_file_is_refused_and_changes_nothing(case, tmp_path):
    edit, field = PAGED_EDITS[case]
    check_refused(tmp_path, lambda d: paged(d), (qkv(300, seed=1), qkv(300, seed=2)), edit, field)


EVICTING_EDITS = {
    "positions + 1e6": (set_tensor("g0.idx", lambda t: t + 1_000_000), "g0.idx"),
    "positions out of order": (set_tensor("g0.idx", lambda t: t.flip(-1)), "g0.idx"),
    "NaN key": (set_tensor("g0.k", poke(math.nan, 0, 1, 2, 3)), "g0.k"),
    "score shape": (set_tensor("g0.score", lambda t: t[..., :-1]), "g0.score"),
    "ok not bool": (set_tensor("g0.ok", lambda t: t.float()), "g0.ok"),
    "missing values": (drop("g0.v"), "g0.v"),
    "seen negative": (set_meta("seen", lambda s: -5), "seen"),
}


@pytest.mark.parametrize("case", sorted(EVICTING_EDITS))
def test_an_edited_evicting_memory_file_is_refused_and_changes_nothing(case, tmp_path):
    edit, field = EVICTING_EDITS[case]
    make = lambda d: EvictingMemory([([0, 1], H2O(budget=50))], 2, KeyRotation(INV))  # noqa: E731
    check_refused(tmp_path, make, (qkv(300, seed=1), qkv(300, seed=2)), edit, field)


def test_seen_beyond_what_an_unfilled_evicting_memory_holds_is_refused(tmp_path):
    make = lambda d: EvictingMemory([([0, 1], H2O(budget=500))], 2, KeyRotation(INV))  # noqa: E731
    check_refused(tmp_path, make, (qkv(300, seed=1), qkv(300, seed=2)), set_meta("seen", lambda s: s + 1000), "seen")


RETRIEVAL_EDITS = {
    "indexed + 1000": (set_meta("indexed", lambda s: s + 1000), "indexed"),
    "NaN page": (set_tensor("pages_k", poke(math.nan, 3, 0, 1, 2, 3)), "pages_k"),
    "seen + 1000": (set_meta("seen", lambda s: s + 1000), "seen"),
}


@pytest.mark.parametrize("case", sorted(RETRIEVAL_EDITS))
def test_an_edited_retrieval_memory_file_is_refused_and_changes_nothing(case, tmp_path):
    edit, field = RETRIEVAL_EDITS[case]
    make = lambda d: RetrievalMemory(2, KeyRotation(INV), retrieve=40, page=16, sinks=16, window=32,  # noqa: E731
                                     backend="exact", host_tokens=64, disk_dir=d)
    check_refused(tmp_path, make, (qkv(300, seed=1), qkv(300, seed=2)), edit, field)


def test_a_cache_load_failing_at_layer_3_changes_no_layer(stories, tmp_path):
    import longattn.hf as hf
    from longattn.hf import LongattnCache

    model, tok = stories
    kw = dict(page=16, sinks=16, window=32, topk=2, host_tokens=32)
    text = tok.encode("Once upon a time, there was a big red ball. Tom and Sue played with it.") * 3
    other = tok.encode("The little dog ran to the park and found a stick under a tree.") * 3
    with torch.no_grad(), hf.apply(model, "dense"):
        a = LongattnCache(model, "blocks", disk_dir=tmp_path / "a", **kw)
        model(torch.tensor([[1] + text]), past_key_values=a)
        a.save(tmp_path / "a.safetensors")

        def edit(tensors, info):
            tensors["layer3.pages_k"][0, 0, 0, 0, 0] = math.nan
        bad = rewrite(tmp_path / "a.safetensors", tmp_path / "bad.safetensors", edit)
        b = LongattnCache(model, "blocks", disk_dir=tmp_path / "b", **kw)
        twin = LongattnCache(model, "blocks", disk_dir=tmp_path / "t", **kw)
        model(torch.tensor([[1] + other]), past_key_values=b)
        model(torch.tensor([[1] + other]), past_key_values=twin)
        before = [snapshot(m) for m in b.memories]
        with pytest.raises(ValueError, match=r"layer 3.*pages_k"):
            b.load(bad)
        for mem, snap in zip(b.memories, before):
            assert_same_state(snapshot(mem), snap)
        nxt = torch.tensor([[tok.encode(" The")[0]]])
        assert torch.equal(model(nxt, past_key_values=b).logits, model(nxt, past_key_values=twin).logits)


# -- 6. a non-finite key never reaches the retrieval index ----------------------------------------


def test_a_non_finite_key_is_refused_before_the_retrieval_memory_stores_anything(tmp_path):
    q, k, v = qkv(400, seed=6)
    make = lambda: RetrievalMemory(2, KeyRotation(INV), retrieve=24, page=16, sinks=16, window=32,  # noqa: E731
                                   backend="exact", host_tokens=64, disk_dir=tmp_path / "d")
    mem, twin = make(), make()
    feed(mem, q[:, :, :200], k[:, :, :200], v[:, :, :200], 23)
    feed(twin, q[:, :, :200], k[:, :, :200], v[:, :, :200], 23)
    before = snapshot(mem)
    for bad in (math.nan, math.inf):
        kb = k[:, :, 200:210].clone()
        kb[0, 1, 4, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            mem.attend(q[:, :, 200:210], kb, v[:, :, 200:210], None, 0.25)
        assert_same_state(snapshot(mem), before)
    assert torch.equal(feed(mem, q[:, :, 200:], k[:, :, 200:], v[:, :, 200:], 23),
                       feed(twin, q[:, :, 200:], k[:, :, 200:], v[:, :, 200:], 23))


# -- 7. temporary disk folders go with the memory, and at exit -------------------------------------


@pytest.mark.cpu_only(reason="runs its memory on the CPU in a subprocess")
def test_temporary_disk_folders_are_removed_at_exit(tmp_path):
    script = textwrap.dedent("""
        import glob, os, tempfile, torch
        from longattn.memory import PagedMemory
        from longattn.memory.retrieval import RetrievalMemory
        x = torch.randn(1, 1, 200, 16, generator=torch.Generator().manual_seed(0))
        kept = []
        for make in (lambda: PagedMemory(1, None, page=16, sinks=16, window=32, topk=2, host_tokens=0),
                     lambda: RetrievalMemory(1, None, retrieve=8, page=16, sinks=16, window=32, host_tokens=0,
                                             backend="exact")):
            mem = make()
            mem.attend(x, x, x, None, 0.25)
            mem.cycle = mem  # only the cycle collector (which need not run at exit) would free it
            kept.append(mem)
        print(len(glob.glob(os.path.join(tempfile.gettempdir(), "longattn-kv-*"))))
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2"]
    assert not list(tmp_path.glob("longattn-kv-*"))


def test_closing_or_dropping_a_memory_removes_its_disk_segments(tmp_path):
    x = torch.randn(1, 1, 200, 16, generator=torch.Generator().manual_seed(0))
    mem = PagedMemory(1, None, page=16, sinks=16, window=32, topk=2, host_tokens=0)
    mem.attend(x, x, x, None, 0.25)
    folder = mem.disk.directory
    assert any(folder.iterdir())
    mem.close()
    assert not folder.exists() and mem.seen == 0 and mem.disk is None
    mem.attend(x, x, x, None, 0.25)  # usable again, from empty
    folder = mem.disk.directory
    del mem
    gc.collect()
    assert not folder.exists()
    mine = PagedMemory(1, None, page=16, sinks=16, window=32, topk=2, host_tokens=0, disk_dir=tmp_path)
    mine.attend(x, x, x, None, 0.25)
    assert list(tmp_path.glob("segment-*.safetensors"))
    mine.close()
    assert tmp_path.exists() and not list(tmp_path.iterdir())  # its own segments gone, the folder kept


@pytest.mark.parametrize("kind", ["paged", "evicting"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_every_memory_refuses_a_non_finite_chunk_before_storing_it(kind, where):
    """A memory holds finite tokens only, so that everything it saves loads back."""
    q, k, v = qkv(80, seed=8)
    if kind == "paged":
        mem = PagedMemory(2, KeyRotation(INV), page=16, sinks=16, window=16, topk=1)
    else:
        mem = EvictingMemory([([0, 1], H2O(budget=32))], 2, KeyRotation(INV))
    feed(mem, q[:, :, :40], k[:, :, :40], v[:, :, :40], 10)
    seen = mem.seen
    kb, vb = k[:, :, 40:50].clone(), v[:, :, 40:50].clone()
    (kb if where == "k" else vb)[0, 1, 3, 0] = math.nan
    with pytest.raises(ValueError, match=f"{where}_new holds 1 non-finite values .*position {seen + 3}"):
        mem.attend(q[:, :, 40:50], kb, vb, None, 0.25)
    assert mem.seen == seen
