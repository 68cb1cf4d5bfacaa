"""Inference: KV-cache formats and decoding (see README, "Generate").

cache.py / kvformat.py / pages.py  the paged caches (window ring, MODEL1 FP8 entries, index keys)
step.py      prefill in chunks and the one-token decode step
verify.py    several tokens per slot in one step, committed only where accepted
speculative.py  greedy decoding with MTP drafts verified by the main model
experts.py   routed experts for decode steps (gathered);  layout.py  layers out of their stacks
sample.py    sampling and `generate`;  __main__.py  python -m infer;  memory.py  KV bytes report
"""
