"""MixLLM (Wang et al., NAACL 2025, arXiv 2502.18482): the flagship routing policy.

`policy.MixLLMPolicy` (registered as ``mixllm``) assembles `predictors` (per-LLM quality and
length models), `decision` (meta decision score, LinUCB uncertainty, latency penalty),
`online` (dynamic-feedback score network) and, optionally, `encoder` (tag-enhanced query
embeddings). Nothing here imports torch unless tag-enhanced embeddings are asked for.
"""
