"""The parameter tree: its layout, the module bound to it, a random init, old layouts.

The layout is `nnx.to_pure_dict` of `Transformer`'s state (a plain nested
dict, as Orbax saves it); `param_shapes` gives it as shape tuples without
allocating anything (`nnx.eval_shape`). `bind` puts a params dict (arrays or
tracers) into the module graph, so the pure functions of `models.transformer`
run the modules with no NNX transform in sight.

Layout version 1 (checkpoints written before the model became modules) held
the same arrays one level flatter: a norm's scale, the embedding and the
router's kernel as leaves, the routed experts' gate/up/down directly under
`moe`. `from_v1` / `to_v1` convert.

Dimensions: D model, F expert hidden, E experts, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import MoeConfig
from models.nn.decoder import Transformer
from models.nn.decoder import layer_name as layer_name

Params = dict


class _OneKey(nnx.RngStream):
  """A stream that gives every draw the same key and keeps no count.

  For `_skeleton`, which needs shapes only: bumping a stream's count while
  tracing takes time quadratic in the model's size (nnx asks the traced count
  for its sharding, and JAX's answer walks the whole trace so far), 16 s for
  DeepSeek-V3's 61 layers.
  """

  def __call__(self) -> jax.Array:
    return self.key[...]


def _abstract_model(config: MoeConfig) -> Transformer:
  rngs = nnx.Rngs(0)
  rngs.default = _OneKey(0, tag='default')
  return Transformer(config, rngs=rngs)


@functools.lru_cache(maxsize=32)
def _skeleton(config: MoeConfig):
  """(graphdef, abstract state) of the model: shapes only, nothing allocated."""
  return nnx.split(nnx.eval_shape(functools.partial(_abstract_model, config)))


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_shapes(config: MoeConfig) -> dict:
  """The full parameter tree as shape tuples: the single source of the layout."""
  _, state = _skeleton(config)
  return jax.tree.map(lambda s: tuple(s.shape), nnx.to_pure_dict(state))


def param_structs(config: MoeConfig, dtype=jnp.float32) -> dict:
  """`param_shapes` as jax.ShapeDtypeStruct leaves (for eval_shape, Orbax)."""
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(config), is_leaf=_is_shape
  )


def bind(params: Params, config: MoeConfig) -> Transformer:
  """The model with `params` (a pure dict of arrays or tracers) as its parameters."""
  graphdef, abstract = _skeleton(config)
  state = jax.tree.map(lambda v: v, abstract)  # fresh Variables: the cached skeleton stays abstract
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


# ---- layout version 1 ----

_V1_DROPPED = ('scale', 'embedding', 'kernel')


def _v1_path(path: tuple[str, ...]) -> tuple[str, ...]:
  """Our key path -> its version-1 key path."""
  if path[-1] in _V1_DROPPED:
    path = path[:-1]
  return tuple(k for k in path if k != 'experts')


def _paths(config: MoeConfig) -> list[tuple[str, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=_is_shape)[0]
  return [tuple(k.key for k in p) for p, _ in flat]


def _nest(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def _get(tree: dict, path):
  for k in path:
    tree = tree[k]
  return tree


def to_v1(tree: dict, config: MoeConfig) -> dict:
  """A tree in our layout (any leaves) -> the same leaves in layout version 1."""
  return _nest({_v1_path(p): _get(tree, p) for p in _paths(config)})


def from_v1(tree: dict, config: MoeConfig) -> dict:
  """A layout-version-1 tree -> our layout (same leaves)."""
  return _nest({p: _get(tree, _v1_path(p)) for p in _paths(config)})


# ---- random init ----


def init_params(config: MoeConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
  """Random parameters as HF initializes them: N(0, 0.02); norm scales 1, biases 0.

  Leaf i takes key i of `split(rng, n)` in the order of the version-1 layout,
  so a seed gives the parameters it gave before the model became modules.
  """
  shapes = param_shapes(config)
  paths = _paths(config)
  order = sorted(range(len(paths)), key=lambda i: _v1_path(paths[i]))
  keys = jax.random.split(rng, len(paths))
  flat = {}
  for rank, i in enumerate(order):
    path = paths[i]
    shape = _get(shapes, path)
    if path[-1] == 'scale':
      flat[path] = jnp.ones(shape, dtype)
    elif path[-1].endswith('_bias'):
      flat[path] = jnp.zeros(shape, dtype)
    else:
      flat[path] = (0.02 * jax.random.normal(keys[rank], shape, jnp.float32)).astype(dtype)
  return _nest(flat)
