"""A Hugging Face model with a longattn method inside: the bundled stories260K (a real Llama trained
on TinyStories) generating a left-padded batch with Landmark block retrieval."""

import longattn.hf

model, tok = longattn.hf.load_llama2c()                  # the bundled stories260K
enc = tok(["Once upon a time", "Tom had a red"])         # left-padded batch
with longattn.hf.apply(model, "landmark", budget=256, block=32, q_block=32, sinks=32, window=64):
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
for text in tok.batch_decode(out):
    print(text)
