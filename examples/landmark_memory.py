"""A landmark model reading 8k tokens through LandmarkMemory: only the landmark keys, the open block
and the retrieved blocks stay hot; closed blocks go to the host and, past 2,048 tokens per layer,
to disk."""

import torch

from longattn.memory import landmark_memories
from longattn.models import landmark_tiny
from longattn.tasks import synthetic
from longattn.train import load_model
from longattn.train.landmarks import with_landmarks

model = load_model(landmark_tiny())
batch = with_landmarks(synthetic.passkey(8192, 0.25, 1, seed=3), block=64)
tokens, answer = batch.tokens, batch.answer_pos[0]
memories = landmark_memories(model.config.n_layers, block=64, top_k=4, host_tokens=2048)
with torch.no_grad():  # one block of 64 tokens per step
    logits = torch.cat([model(tokens[:, s:s + 64], state=memories) for s in range(0, tokens.shape[1], 64)], 1)
print("passkey read back:", bool((logits[0, answer - 1].argmax(-1) == tokens[0, answer]).all()))
print(f"hot k/v tokens per layer: at most {max(m.peak_hot_tokens for m in memories)} of {tokens.shape[1]}")
print({tier: f"{n / 2**20:.2f} MiB" for tier, n in memories[0].nbytes().items()})
for m in memories:
    m.close()
