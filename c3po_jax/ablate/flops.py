"""Analytic FLOPs per test sample (the paper's Fig. 4), from the model config.

A multiply-add is 2 FLOPs; norms, softmaxes and rotary embeddings are left
out (they are O(D) per token, next to O(D^2) matmuls). Per token and layer:
the attention projections 2 D (2 Hq + 2 Hkv) hd, scores and values 4 Hq hd
per attended key, the router 2 D E, each routed expert it runs 6 D F (a
SwiGLU: gate, up, down), shared experts and dense MLPs likewise; the LM head
2 D V per scored position. A backward pass costs twice its forward.

What a method costs per test sample (the prefix-cached backend, `losses`):
* base: one forward of the test prompt.
* NGD: the base pass; each of the N neighbours' prefix (its prompt up to the
  first critical layer and the keys/values from there on: one forward, kept
  from the reference pass when the store holds it, counted here anyway);
  per step, forward and backward of each neighbour's window (the last context
  token) through the layers from the first critical one on, attending to its
  whole prompt; then the test sample's window once with the final pathway.
While optimizing, the window token runs all n core experts of a critical
layer in 'dense' mode (the paper's reading of Fig. 4: cost grows with n) and
its top-k in 'topk' mode (cost independent of n).

Dimensions: D model, E experts, K top-k, F expert width, V vocabulary,
N neighbours, T prompt tokens, U window tokens.
"""

from __future__ import annotations

from models.config import MoeConfig


def layer_flops(config: MoeConfig, layer: int, keys: float, experts: int | None = None) -> float:
  """One token through one layer, attending to `keys` positions; `experts`: routed experts run."""
  c = config
  d = c.hidden_size
  attn = 2 * d * (2 * c.q_width + 2 * c.kv_width) + 4 * c.q_width * keys
  if not c.is_moe_layer(layer):
    return attn + 6 * d * c.intermediate_size
  active = c.num_experts_per_tok if experts is None else experts
  mlp = 2 * d * c.num_experts + active * 6 * d * c.expert_intermediate_size
  if c.num_shared_experts:
    mlp += 6 * d * c.shared_intermediate_size
  return attn + mlp


def head_flops(config: MoeConfig, positions: int = 1) -> float:
  return 2.0 * config.hidden_size * config.vocab_size * positions


def forward_flops(config: MoeConfig, tokens: float, *, head_positions: int = 1) -> float:
  """A prompt of `tokens` tokens through every layer (causal: token t attends to t + 1 keys)."""
  mean_keys = (tokens + 1) / 2
  body = sum(tokens * layer_flops(config, i, mean_keys) for i in range(config.num_hidden_layers))
  return body + head_flops(config, head_positions)


def window_flops(
  config: MoeConfig, tokens: float, layers, first: int, experts: int | None, window: int = 1
) -> float:
  """The last `window` tokens through layers first..L-1 and the head; the critical
  `layers` run `experts` routed experts (None: the router's top-k)."""
  total = 0.0
  for i in range(first, config.num_hidden_layers):
    total += window * layer_flops(config, i, tokens, experts if i in layers else None)
  return total + head_flops(config, window)


def per_sample(
  config: MoeConfig,
  *,
  test_tokens: float,
  ref_tokens: float,
  neighbours: float,
  steps: int,
  layers,
  core: int,
  opt_mode: str,
) -> dict:
  """{'base': {...}, 'ngd': {...}}: forward, backward and total FLOPs per test sample."""
  layers = tuple(layers)
  first = min(layers)
  base = forward_flops(config, test_tokens)
  experts = core if opt_mode == 'dense' else None
  window = window_flops(config, ref_tokens, layers, first, experts)
  prefix = forward_flops(config, ref_tokens, head_positions=0)
  evaluate = window_flops(config, test_tokens, layers, first, None)
  fwd = base + neighbours * prefix + steps * neighbours * window + evaluate
  bwd = 2.0 * steps * neighbours * window
  return {
    'base': {'forward': base, 'backward': 0.0, 'total': base},
    'ngd': {'forward': fwd, 'backward': bwd, 'total': fwd + bwd},
  }
