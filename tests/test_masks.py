"""Block bounds of every mask are sound: ``block_any`` never misses a visible pair and
``block_all`` never claims a block whose pairs are not all visible."""

import torch
from hypothesis import given, settings, strategies as st

from longattn import masks
from longattn.core.masks import Causal, KeyPadding
from longattn.kernels.layout import build_layout


def mask_strategy(tk):
    g = torch.Generator().manual_seed(tk)
    return st.sampled_from([
        masks.Causal(),
        masks.Window(5),
        masks.Window(4, dilation=3),
        masks.Sinks(3) | masks.Window(7),
        masks.a_shape(2, 9) & Causal(),
        masks.triangle(2, 5, 6, tk),
        masks.power(4),
        masks.power(8, sinks=3),
        masks.lsg(6, 3, 4, 4),
        masks.document(torch.arange(tk) // 7),
        masks.document(torch.randint(0, 3, (tk,), generator=g)),  # unsorted ids
        masks.prefix_lm(11),
        masks.block_map(torch.rand(20, 20, generator=g) > 0.5, 5),
        masks.Strided(3, 4) | masks.GlobalTokens(2),
        KeyPadding(torch.rand(2, tk, generator=g) > 0.3) & Causal(),
    ])


@settings(max_examples=200, deadline=None)
@given(data=st.data(), tq=st.integers(1, 60), extra=st.integers(0, 40), block=st.sampled_from([1, 3, 4, 8, 16]))
def test_block_bounds_are_sound(data, tq, extra, block):
    tk = tq + extra
    mask = data.draw(mask_strategy(tk))
    dense = mask.dense(2, 1, tq, tk)  # [2, 1, tq, tk]
    layout = build_layout(mask, tq, tk, block)
    for qi in range(layout.n_q_blocks):
        for kj in range(layout.n_k_blocks):
            tile = dense[:, :, qi * block:(qi + 1) * block, kj * block:(kj + 1) * block]
            true_any = tile.flatten(2).any(-1)
            true_all = tile.flatten(2).all(-1)
            got_any = layout.any[..., qi, kj].expand_as(true_any)
            got_all = layout.all[..., qi, kj].expand_as(true_all)
            assert not (true_any & ~got_any).any(), f"block ({qi},{kj}) has a visible pair but block_any is False"
            assert not (got_all & ~true_all).any(), f"block ({qi},{kj}) claimed full but is not"


def test_block_bounds_are_tight_for_contiguous_masks():
    # causal and window blocks are classified exactly, so kernels do no wasted work there
    for mask in (Causal(), masks.Window(16), masks.Sinks(8) | masks.Window(16)):
        layout = build_layout(mask, 64, 64, 8)
        dense = mask.dense(1, 1, 64, 64)[0, 0].view(8, 8, 8, 8).permute(0, 2, 1, 3).flatten(2)
        assert torch.equal(layout.any[0, 0], dense.any(-1))
        assert torch.equal(layout.all[0, 0], dense.all(-1))


def test_window_counts_keys_per_query():
    d = masks.Window(4).dense(1, 1, 20, 20)[0, 0]
    assert int(d[10].sum()) == 7  # 3 on each side + itself
    assert int((d & Causal().dense(1, 1, 20, 20)[0, 0])[10].sum()) == 4
    dil = masks.Window(3, dilation=2).dense(1, 1, 20, 20)[0, 0]
    assert dil[10].nonzero().flatten().tolist() == [6, 8, 10, 12, 14]


def test_power_pattern_sees_power_of_two_block_distances():
    d = masks.power(1).dense(1, 1, 20, 20)[0, 0]
    assert d[19].nonzero().flatten().tolist() == [3, 11, 15, 17, 18, 19]


def test_layout_of_block_map_is_the_map():
    m = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    layout = build_layout(masks.block_map(m, 16), 96, 96, 16)
    assert torch.equal(layout.any[0, 0], m) and torch.equal(layout.all[0, 0], m)


def test_masks_move_their_tensors_to_the_inputs_device():
    """``Mask.to``: document ids, block maps, prefixes and padding move (both sides of a combined
    mask too), masks without tensors come back as they are; masked methods call it with the
    inputs' device, so a mask built on the CPU serves CUDA inputs."""
    ids = torch.arange(256) // 64
    block_map = torch.rand(2, 2, generator=torch.Generator().manual_seed(0)) < 0.5
    m = masks.document(ids) & masks.block_map(block_map, block_size=128) & masks.prefix_lm(torch.tensor([3, 5]))
    moved = m.to("meta")
    tensors = []

    def collect(x):
        for f in ("a", "b"):
            if hasattr(x, f):
                collect(getattr(x, f))
        tensors.extend(getattr(x, f) for f in ("key_ids", "map", "prefix") if isinstance(getattr(x, f, None), torch.Tensor))

    collect(moved)
    assert len(tensors) == 3 and all(t.device.type == "meta" for t in tensors)
    assert m.to("cpu") is m  # nothing to move
    w = masks.band(16, 0)
    assert w.to("meta") is w
    pad = KeyPadding(torch.ones(2, 8, dtype=torch.bool))
    assert pad.to("meta").valid.device.type == "meta"
