"""The OLMoE parameter tree: its layout as shapes, its layer names, a random init.

`param_shapes` is the single source of the layout (a plain nested dict, as
Orbax saves it); `transformer` re-exports these names.

Dimensions: D model, F expert hidden, E experts, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.olmoe.config import OlmoeConfig

Params = dict


def layer_name(i: int) -> str:
  return f'layer_{i}'


def param_shapes(config: OlmoeConfig) -> dict:
  """The full parameter tree as shapes: the single source of the layout."""
  d, f, e = config.hidden_size, config.intermediate_size, config.num_experts
  layer = {
    'input_norm': (d,),
    'post_attn_norm': (d,),
    'attn': {
      'q': (d, config.q_width),
      'k': (d, config.kv_width),
      'v': (d, config.kv_width),
      'o': (config.q_width, d),
      'q_norm': (config.q_width,),
      'k_norm': (config.kv_width,),
    },
    'moe': {
      'router': (d, e),
      'gate': (e, d, f),
      'up': (e, d, f),
      'down': (e, f, d),
    },
  }
  tree = {'embed': (config.vocab_size, d), 'final_norm': (d,)}
  for i in range(config.num_hidden_layers):
    tree[layer_name(i)] = layer
  if not config.tie_word_embeddings:
    tree['lm_head'] = (d, config.vocab_size)
  return tree


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_structs(config: OlmoeConfig, dtype=jnp.float32) -> dict:
  """`param_shapes` as jax.ShapeDtypeStruct leaves (for eval_shape, Orbax)."""
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(config), is_leaf=_is_shape
  )


def init_params(config: OlmoeConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
  """Random parameters (normal, std 0.02; norm scales 1), as HF initializes."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]
  ]
  keys = jax.random.split(rng, len(leaves))
  out = []
  for path, shape, key in zip(paths, leaves, keys):
    if 'norm' in path:
      out.append(jnp.ones(shape, dtype))
    else:
      out.append((0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)
