"""Trainable sparse attention: the bundled landmark model retrieving a passkey at 4x its trained
length by landmark retrieval, and MoBA / NSA / DSA as registered methods that gradients flow through."""

import torch

import longattn
from longattn.models import landmark_tiny
from longattn.tasks import synthetic
from longattn.train import load_model
from longattn.train.data import evaluate
from longattn.train.landmarks import with_landmarks

model = load_model(landmark_tiny())  # trained at <= 512 tokens, a landmark token every 64
batch = with_landmarks(synthetic.passkey(2048, 0.5, 4, seed=1), block=64)
top4 = longattn.method("landmark_trained", block=64, top_k=4)  # 4 blocks per head and query block
print("passkey at 2,048 tokens:", evaluate(model, batch, top4, batch_size=4).accuracy)

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 4, 1024, 32, generator=g, requires_grad=True) for _ in range(3))
for name, m in {"moba": longattn.method("moba", block=64, top_k=4),
                "nsa": longattn.method("nsa", block=64, top_n=4, local=1, window=128),
                "dsa_indexer": longattn.method("dsa_indexer", budget=128)}.items():
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    out.sum().backward()  # trainable: gradients reach q, k and v through the kept keys
    print(f"{name}: density {stats.density:.2f}, grad reaches q: {bool(q.grad.abs().sum() > 0)}")
