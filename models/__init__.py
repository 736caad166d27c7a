"""Decoder-only MoE language models in JAX: OLMoE, DeepSeekMoE, Qwen2/3-MoE, Mixtral.

`models.transformer.forward(params, tokens, *, config, pathway=...)` is the
model as a pure function of a plain parameter dict; `models.nn` holds its
`flax.nnx` modules; `models.families` the HF config and tensor-name mapping
of each family; `models.prefix` and `models.decode` the prefix-cached window
pass and cached decoding.
"""
