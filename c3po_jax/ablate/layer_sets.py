"""Fig. 3's layer sets by name (F1, M2L3, All16, ...) for a model of any depth.

A name is a concatenation of groups `F<n>` (the first n MoE layers), `M<n>`
(the middle n), `L<n>` (the last n), or `All<n>` (every MoE layer). Layers
are counted over the MoE layers only (a dense layer, e.g. DeepSeekMoE's
first, has no router to re-mix), in model order. The middle n of m MoE layers
start at index (m - n) // 2, so for OLMoE's 16: M1 = {7}, M2 = {7, 8},
M3 = {6, 7, 8}, M5 = {5, ..., 9}; F5 = {0..4}, L5 = {11..15}.

Other depths keep the counts of the names (F2 is the first two MoE layers at
any depth), each group clamped to the m MoE layers, and the union of the
groups is the set. In a shallow model names then collide (with 4 layers F5 =
M5 = L5 = All4, F2L3 = All4): the study runs each distinct set once and
reports every name with the set it stands for. `All<n>` is named after the
model's MoE-layer count (`All16` for OLMoE).
"""

from __future__ import annotations

import re

# Fig. 3's sets, in the paper's order; 'All' becomes All<m> for m MoE layers.
PAPER_NAMES = (
  'F1', 'M1', 'L1', 'F1M1', 'F1L1', 'M1L1', 'F2', 'M2', 'L2',
  'F2M3', 'F2L3', 'M2L3', 'F5', 'M5', 'L5', 'All',
)  # fmt: skip

_GROUP = re.compile(r'(F|M|L|All)(\d+)')


def group(kind: str, n: int, moe: tuple[int, ...]) -> tuple[int, ...]:
  """One group's layers: kind F/M/L/All, n layers, of the MoE layers `moe`."""
  m = len(moe)
  n = min(n, m)
  if kind == 'F':
    return moe[:n]
  if kind == 'L':
    return moe[m - n :]
  if kind == 'M':
    start = (m - n) // 2
    return moe[start : start + n]
  return moe  # All


def layers(name: str, moe_layers) -> tuple[int, ...]:
  """The layer indices a name stands for (sorted); ValueError on a malformed name."""
  moe = tuple(moe_layers)
  parts = _GROUP.findall(name)
  if not parts or ''.join(k + n for k, n in parts) != name:
    raise ValueError(f'layer set {name!r}: expected groups like F2, M3, L5 or All16')
  out = set()
  for kind, n in parts:
    if int(n) < 1:
      raise ValueError(f'layer set {name!r}: a group needs at least one layer')
    out.update(group(kind, int(n), moe))
  return tuple(sorted(out))


def paper_sets(moe_layers) -> dict[str, tuple[int, ...]]:
  """{name: layers} of Fig. 3's sets for this model (All named All<m>)."""
  moe = tuple(moe_layers)
  names = [f'All{len(moe)}' if n == 'All' else n for n in PAPER_NAMES]
  return {name: layers(name, moe) for name in names}


def spec(layer_indices) -> str:
  """The --critical_layers spec of a layer set ('I,J,K')."""
  return ','.join(str(i) for i in layer_indices)
