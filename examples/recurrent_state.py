"""Linear and recurrent attention with an explicit state: prefill in one call or in pieces, then
decode token by token — the same answer every way (longattn.recurrent)."""

import torch

from longattn.recurrent.delta import gated_deltanet_attention, gated_deltanet_attention_step
from longattn.recurrent.lightning import lightning_attention

torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 96, 32) for _ in range(3))
beta = torch.rand(1, 4, 96)  # Gated DeltaNet's writing strength per token
log_gate = -0.05 * torch.rand(1, 4, 96)  # and its forgetting gate (log of a value in (0, 1])

# Lightning (TransNormer): one pass, or 64 tokens then 32 with the state carried
whole, _ = lightning_attention(q, k, v)
first, state = lightning_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])
rest, _ = lightning_attention(q[:, :, 64:], k[:, :, 64:], v[:, :, 64:], initial_state=state)
print("lightning, pieces == one pass:", torch.allclose(torch.cat([first, rest], 2), whole, atol=1e-5))

# Gated DeltaNet: prefill 95 tokens, then decode the last one from the state
out, state = gated_deltanet_attention(q[:, :, :95], k[:, :, :95], v[:, :, :95], beta[:, :, :95],
                                      log_gate[:, :, :95])
step, state = gated_deltanet_attention_step(q[:, :, 95:], k[:, :, 95:], v[:, :, 95:], beta[:, :, 95:],
                                            log_gate[:, :, 95:], state)
full, _ = gated_deltanet_attention(q, k, v, beta, log_gate)
print("gated deltanet, decode after prefill == one pass:", torch.allclose(step, full[:, :, 95:], atol=1e-5))
print("state:", tuple(state.s.shape), state.s.dtype)
