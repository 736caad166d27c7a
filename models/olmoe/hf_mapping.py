"""The one place that knows Hugging Face's OLMoE tensor names and layouts.

`hf_target(name)` maps an HF tensor name to where it lands in our parameter
tree (see `models.olmoe.transformer.param_shapes`), with the expert index for
per-expert tensors and the layout hook that turns the HF array into ours.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

_LAYER = r'model\.layers\.(\d+)\.'


def _t(x: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] -> ours [in, out]."""
  return np.ascontiguousarray(x.T)


def _t_stacked(x: np.ndarray) -> np.ndarray:
  """[E, out, in] -> [E, in, out]."""
  return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def _same(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one HF tensor goes.

  path: key path into our tree. expert: index on the leading expert axis for
  per-expert tensors (None: the whole leaf). split: for HF's fused
  `gate_up_proj` [E, 2F, D], the paths of its two halves along dim 1 (gate
  first, then up); None otherwise.
  """

  path: tuple[str, ...]
  transform: Callable[[np.ndarray], np.ndarray]
  expert: int | None = None
  split: tuple[tuple[str, ...], ...] | None = None


# (regex, function of the match groups -> Target)
_TABLE: list[tuple[str, Callable[..., Target]]] = [
  (r'model\.embed_tokens\.weight', lambda: Target(('embed',), _same)),
  (r'model\.norm\.weight', lambda: Target(('final_norm',), _same)),
  (r'lm_head\.weight', lambda: Target(('lm_head',), _t)),
  (_LAYER + r'input_layernorm\.weight', lambda i: Target((f'layer_{i}', 'input_norm'), _same)),
  (
    _LAYER + r'post_attention_layernorm\.weight',
    lambda i: Target((f'layer_{i}', 'post_attn_norm'), _same),
  ),
  (
    _LAYER + r'self_attn\.(q|k|v|o)_proj\.weight',
    lambda i, n: Target((f'layer_{i}', 'attn', n), _t),
  ),
  (
    _LAYER + r'self_attn\.(q|k)_norm\.weight',
    lambda i, n: Target((f'layer_{i}', 'attn', f'{n}_norm'), _same),
  ),
  (_LAYER + r'mlp\.gate\.weight', lambda i: Target((f'layer_{i}', 'moe', 'router'), _t)),
  (
    _LAYER + r'mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight',
    lambda i, e, n: Target((f'layer_{i}', 'moe', n), _t, expert=int(e)),
  ),
  # Fused layouts written by some transformers versions.
  (
    _LAYER + r'mlp\.experts\.gate_up_proj',
    lambda i: Target(
      (f'layer_{i}', 'moe', 'gate'),
      _t_stacked,
      split=((f'layer_{i}', 'moe', 'gate'), (f'layer_{i}', 'moe', 'up')),
    ),
  ),
  (
    _LAYER + r'mlp\.experts\.down_proj',
    lambda i: Target((f'layer_{i}', 'moe', 'down'), _t_stacked),
  ),
]
_COMPILED = [(re.compile(p + r'$'), f) for p, f in _TABLE]


def hf_target(name: str) -> Target | None:
  """The Target of an HF tensor name, or None if the name is not OLMoE's."""
  for pattern, make in _COMPILED:
    m = pattern.match(name)
    if m:
      return make(*m.groups())
  return None


def place(
  target: Target, array: np.ndarray
) -> list[tuple[tuple[str, ...], int | None, np.ndarray]]:
  """Applies a target's layout hook: [(path, expert, our-layout array)]."""
  if target.split is not None:
    # HF fused gate_up: [E, 2F, D]; gate is the first half of dim 1.
    f = array.shape[1] // 2
    gate, up = array[:, :f], array[:, f:]
    return [(target.split[0], None, _t_stacked(gate)), (target.split[1], None, _t_stacked(up))]
  return [(target.path, target.expert, target.transform(array))]


class ConversionError(ValueError):
  """An HF checkpoint that does not match the expected OLMoE layout."""


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


class ParamAssembler:
  """Builds our parameter tree from HF tensors fed one at a time.

  Pre-allocates every leaf (numpy, target dtype), places each HF tensor as it
  arrives (so a caller can stream shard by shard), and checks on `finish` that
  every slot was filled exactly once. Unknown names, duplicates and
  mis-shaped tensors raise ConversionError naming the tensor (and its source).
  """

  def __init__(self, shapes: dict, dtype):
    import flax.traverse_util as tu

    self._dtype = np.dtype(dtype)
    self._leaves = {
      path: np.zeros(shape, self._dtype)
      for path, shape in tu.flatten_dict(shapes, is_leaf=lambda _, x: _is_shape(x)).items()
    }
    # Per leaf: how many times each (expert or whole) slot was written.
    self._filled: dict[tuple[str, ...], np.ndarray] = {}
    for path, leaf in self._leaves.items():
      n = leaf.shape[0] if path[-1] in ('gate', 'up', 'down') else 1
      self._filled[path] = np.zeros(n, np.int32)
    self.consumed: list[str] = []

  def add(self, name: str, array: np.ndarray, source: str = '') -> None:
    where = f' (in {source})' if source else ''
    target = hf_target(name)
    if target is None:
      raise ConversionError(f'unexpected tensor {name!r}{where}: not part of OLMoE')
    for path, expert, value in place(target, np.asarray(array)):
      if path not in self._leaves:
        raise ConversionError(
          f'unexpected tensor {name!r}{where}: no parameter {"/".join(path)} '
          '(layer index beyond num_hidden_layers, or lm_head with tied embeddings?)'
        )
      leaf = self._leaves[path]
      filled = self._filled[path]
      want = leaf.shape if expert is None else leaf.shape[1:]
      if value.shape != want:
        raise ConversionError(
          f'tensor {name!r}{where} has shape {tuple(array.shape)}; '
          f'expected {want} for {"/".join(path)} in our layout'
        )
      if expert is None:
        if filled.any():
          raise ConversionError(f'tensor {name!r}{where} fills {"/".join(path)} twice')
        leaf[...] = value
        filled += 1
      else:
        if not 0 <= expert < leaf.shape[0]:
          raise ConversionError(f'tensor {name!r}{where}: expert {expert} out of range')
        if filled[expert]:
          raise ConversionError(f'tensor {name!r}{where} fills expert {expert} twice')
        leaf[expert] = value
        filled[expert] += 1
    self.consumed.append(name)

  def missing(self) -> list[str]:
    out = []
    for path, filled in self._filled.items():
      if (filled == 0).all():
        out.append('/'.join(path))
      elif (filled == 0).any():
        experts = np.flatnonzero(filled == 0).tolist()
        out.append(f'{"/".join(path)} experts {experts}')
    return out

  def finish(self) -> dict:
    import flax.traverse_util as tu

    missing = self.missing()
    if missing:
      raise ConversionError(f'missing tensors for: {", ".join(missing[:10])}')
    return tu.unflatten_dict(self._leaves)
