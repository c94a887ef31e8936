"""Linear and recurrent attention: mixers that carry a state along the sequence instead of
attending over every past key.

Each op here is a plain function of its inputs and an explicit state, in three forms that
compute the same thing:

* ``<op>_naive`` — the specification: a step-by-step recurrence in float64, one token at a time,
  written to read like the paper's equations. Tests compare the other forms with it.
* ``<op>`` — the chunked parallel form (the fast path for prefill and training): within a chunk
  of ``chunk`` tokens a masked dense product, across chunks the recurrent state.
* ``<op>_step`` — one token (decoding): ``q, k, v`` of ``T = 1`` and the state in, the output and
  the next state out.

Conventions shared by every op (so that prefill in pieces equals one pass, and decoding continues
from prefill exactly):

* Shapes: ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``; where an op allows it, ``k`` and ``v`` may
  have fewer heads ``Hkv`` (``H`` a multiple of ``Hkv``: grouped heads, each key/value head serving
  ``H / Hkv`` query heads). Per-token gates are ``[B, H, T]`` (or ``[B, H, T, Dk]`` for
  vector-valued ones), per-head constants ``[H]``.
* Every op takes ``initial_state`` (None: zeros) and returns ``(out, final_state)``; the state
  is a ``typing.NamedTuple`` of float32 tensors whose fields the op's docstring lists with shapes.
* Inputs may be float32, bfloat16 or float16; states accumulate in float32, outputs come back in
  the input dtype. The naive forms compute in float64.
* ``<op>_state_size(...)`` gives the state's size in bytes per sequence (Zoology's convention:
  what a model must carry per layer to continue), for the MQAR state-size figure.
* Bad arguments raise ``ValueError`` / ``TypeError`` naming the argument, what it got and what
  was expected.

The ops that are functions of ``q, k, v`` alone (linear, lightning, based, and RAT with a constant
gate) are also methods of ``longattn.attention`` (:mod:`longattn.methods.recurrent`), the state
passed with ``initial_state=`` and returned with ``return_state=True``.
"""
