"""Context parallelism inside a transformers model: each rank runs the model on its part of the
sequence, and every attention layer attends over the whole sequence by Ring Attention (or
Ulysses) across the group.

    with context_parallel(model, layout="zigzag"):
        ids_r = shard(ids, rank, world, "zigzag", dim=1)
        pos_r = positions(ids.shape[1], world, rank, "zigzag")[None]
        logits_r = model(input_ids=ids_r, position_ids=pos_r).logits

Everything but attention (embeddings, norms, MLPs, the head) works token by token, so only the
attention layers need the other ranks; the model's RoPE gets each token's global position from
``position_ids``. Through ``longattn.hf.intercept``: nothing in the model is patched.
"""

from __future__ import annotations

from longattn.distributed.layout import check_layout


def context_parallel(model, *, group=None, layout: str = "zigzag", method="dense", scheme: str = "ring",
                     timeout_s: float = 60.0):
    """Route every attention layer of a transformers ``model`` through ``ring_attention``
    (``scheme="ring"``) or ``ulysses_attention`` (``"ulysses"``) over ``group``. Returns the
    ``Intercepted`` handle (a context manager). Each rank must pass its tokens (``shard`` along
    the sequence dimension) with their global ``position_ids`` (``positions``); padding is refused."""
    from longattn.distributed.ring import ring_attention
    from longattn.distributed.ulysses import ulysses_attention
    from longattn.hf import intercept

    check_layout(layout)
    if scheme not in ("ring", "ulysses"):
        raise ValueError(f"scheme must be 'ring' or 'ulysses', got {scheme!r}")
    run = ring_attention if scheme == "ring" else ulysses_attention

    def attend(layer, q, k, v, *, scale, causal, key_padding_mask):
        if key_padding_mask is not None and not bool(key_padding_mask.all()):
            raise NotImplementedError("context parallelism here takes unpadded sequences (batch rows of one length)")
        return run(q, k, v, group=group, causal=causal, method=method, scale=scale, layout=layout,
                   timeout_s=timeout_s)

    return intercept(model, attend)
