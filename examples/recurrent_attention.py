"""The recurrent ops as methods of longattn.attention: the state goes in with initial_state and
comes back with return_state, so prefill in pieces and decoding equal one call."""

import torch

import longattn

torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 96, 32) for _ in range(3))
m = longattn.method("lightning", decay=0.95)  # also "linear", "based", "rat"

# one call; or 64 tokens, then 31 with the state carried, then one decoding step
whole = longattn.attention(q, k, v, causal=True, method=m)
first, state = longattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True, method=m,
                                  return_state=True)
rest, state = longattn.attention(q[:, :, 64:95], k[:, :, 64:95], v[:, :, 64:95], causal=True, method=m,
                                 initial_state=state, return_state=True)
step, state, stats = longattn.attention(q[:, :, 95:], k[:, :, 95:], v[:, :, 95:], causal=True, method=m,
                                        initial_state=state, return_state=True, return_stats=True)
print("pieces + step == one call:", torch.allclose(torch.cat([first, rest, step], 2), whole, atol=1e-5))
print("path:", stats.path, "| lse:", stats.lse, "| state:", type(state).__name__, tuple(state.s.shape))
print("recurrent methods:", [s.name for s in longattn.methods() if s.capabilities.state])
