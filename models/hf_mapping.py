"""Reading Hugging Face tensors into our parameter tree, for any supported family.

Each family's tensor names live in its file under `models/families/` (a table
of regex rules); `hf_target(name, rules)` maps an HF tensor name to where it
lands in our parameter tree (see `models.params.param_shapes`), with the
expert index for per-expert tensors and the layout hook that turns the HF
array into ours. `ParamAssembler` fills the tree and checks that every slot
is filled exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from models import families
from models.config import MoeConfig
from models.families.common import Rule, Target
from models.params import param_shapes

_COMPILED: dict[int, list] = {}


def _compiled(rules: Sequence[Rule]) -> list:
  key = id(rules)
  if key not in _COMPILED:
    _COMPILED[key] = [(re.compile(p + r'$'), f) for p, f in rules]
  return _COMPILED[key]


def hf_target(name: str, rules: Sequence[Rule]) -> Target | None:
  """The Target of an HF tensor name under a family's rules, or None if it has none."""
  for pattern, make in _compiled(rules):
    m = pattern.match(name)
    if m:
      return make(*m.groups())
  return None


def place(
  target: Target, array: np.ndarray
) -> list[tuple[tuple[str, ...], int | None, np.ndarray]]:
  """Applies a target's layout hook: [(path, expert, our-layout array)]."""
  if target.split is not None:  # a fused tensor: one whole leaf per split path
    return [(path, None, part) for path, part in zip(target.split, target.transform(array))]
  return [(target.path, target.expert, target.transform(array))]


class ConversionError(ValueError):
  """An HF checkpoint that does not match its family's expected layout."""


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


class ParamAssembler:
  """Builds our parameter tree from HF tensors fed one at a time.

  Pre-allocates every leaf (numpy, target dtype), places each HF tensor as it
  arrives (so a caller can stream shard by shard), and checks on `finish` that
  every slot was filled exactly once. Unknown names, duplicates and
  mis-shaped tensors raise ConversionError naming the tensor (and its source).
  """

  def __init__(self, config: MoeConfig, dtype):
    import flax.traverse_util as tu

    shapes = param_shapes(config)
    self._rules = families.family(config.model_type).rules
    self._family = config.model_type
    self._dtype = np.dtype(dtype)
    self._leaves = {
      path: np.zeros(shape, self._dtype)
      for path, shape in tu.flatten_dict(shapes, is_leaf=lambda _, x: _is_shape(x)).items()
    }
    # Per leaf: how many times each (expert or whole) slot was written.
    self._filled: dict[tuple[str, ...], np.ndarray] = {}
    for path, leaf in self._leaves.items():
      n = leaf.shape[0] if 'experts' in path else 1  # routed experts: one slot each
      self._filled[path] = np.zeros(n, np.int32)
    self.consumed: list[str] = []

  def add(self, name: str, array: np.ndarray, source: str = '') -> None:
    where = f' (in {source})' if source else ''
    target = hf_target(name, self._rules)
    if target is None:
      raise ConversionError(f'unexpected tensor {name!r}{where}: not part of {self._family}')
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
