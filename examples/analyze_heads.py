"""Which heads of the tiny retrieval model retrieve, what the others do, and what happens when the
retrievers are masked (docs/analysis.md)."""

from longattn.analysis import CopyProbe, ablate, capture, head_statistics, retrieval_scores, retrieval_subject
from longattn.analysis.studies import task_accuracy
from longattn.tasks import synthetic

subject = retrieval_subject()  # 2 layers × 4 heads, trained here at <= 512 tokens
probe = CopyProbe.from_passkey(synthetic.passkey(512, 0.5, 8, seed=1), digits=5)
scores = retrieval_scores(subject, probe)
print("retrieval heads:", scores.retrieval_heads())

# what layer 0 does: statistics from its captured q/k, one query tile at a time
tokens = synthetic.passkey(512, 0.5, 1, seed=2).tokens
c = capture(subject, tokens, layers=[0])[0]
stats = head_statistics(c.q, c.k, scale=c.site.scale, causal=True)
print("layer 0 previous-token share:", [round(x, 2) for x in stats.previous.tolist()])

evalset = [synthetic.passkey(512, d, 4, seed=3) for d in (0.1, 0.5, 0.9)]
print("passkey accuracy:", task_accuracy(subject, evalset))
print("all retrieval heads masked:", task_accuracy(subject, evalset, ablate(scores.retrieval_heads())))
print("layer-0 head 1 masked:", task_accuracy(subject, evalset, ablate([(0, 1)])))
