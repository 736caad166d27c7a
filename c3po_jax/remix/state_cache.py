"""A bounded (LRU) cache of prepared neighbour states, one per reference.

Neighbours recur across test samples, and a reference's prefix state (see
`losses.PrefixLoss`) does not depend on the test sample. `StateCache.states`
prepares only the references it has not seen (in one jitted call, the count
padded to a power of two so few shapes compile), keeps each at its own
bucketed shape, and pads them to the largest bucket of the batch when
stacking, so a batch of states always has bucketed shapes.

Dimensions: R references asked for, M references prepared in one call.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp

from c3po_jax.remix import scoring
from c3po_jax.tasks.encoding import EncodedPrompt


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class StateCache:
  """LRU of per-reference states with a leading axis of 1.

  Args:
    prepare: (params, ChoiceBatch [1, M, ...]) -> state [1, M, ...], e.g. a
      jitted `engine.Engine.prepare`.
    fit: (state, num_tokens, window) -> the state padded or cut to those
      sizes (`losses.fit`); states expose `num_tokens` and `window_size`.
    capacity: references kept; the least recently used go first.
  """

  def __init__(self, prepare: Callable, fit: Callable, capacity: int):
    if capacity < 1:
      raise ValueError(f'capacity={capacity} must be >= 1')
    self._prepare, self._fit, self.capacity = prepare, fit, capacity
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self.hits = 0
    self.misses = 0

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: Hashable) -> bool:
    return key in self._entries

  def states(
    self,
    params,
    keys: Sequence[Hashable],
    prompts: Sequence[EncodedPrompt],
    *,
    num_choices: int,
    max_len: int,
  ):
    """States of the given references stacked: [R, ...] (keys may repeat)."""
    if len(keys) != len(prompts):
      raise ValueError(f'{len(keys)} keys for {len(prompts)} prompts')
    new = {}
    for key, prompt in zip(keys, prompts):
      if key not in self._entries and key not in new:
        new[key] = prompt
    self.misses += len(new)
    self.hits += len(keys) - len(new)
    if new:
      new = self._compute(params, new, num_choices, max_len, len(keys))
    got = [new[k] if k in new else self._entries[k] for k in keys]
    for key in keys:  # in order of use: the last used go last
      if key in new:
        self._entries[key] = new[key]
      self._entries.move_to_end(key)
    while len(self._entries) > self.capacity:
      self._entries.popitem(last=False)
    t = max(s.num_tokens for s in got)
    u = max(s.window_size for s in got)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *[self._fit(s, t, u) for s in got])

  def _compute(self, params, new: dict, num_choices: int, max_len: int, most: int) -> dict:
    """Prepares the new references in one call; each cut to its own buckets."""
    prompts = list(new.values())
    m = min(_pow2_at_least(len(prompts)), max(most, len(prompts)))
    padded = prompts + [prompts[-1]] * (m - len(prompts))
    data = scoring.make_batch(padded, num_choices=num_choices, max_len=max_len)
    state = self._prepare(params, jax.tree.map(lambda x: x[None], data))  # [1, M, ...]
    out = {}
    for r, (key, prompt) in enumerate(new.items()):
      own = scoring.make_batch([prompt], num_choices=num_choices, max_len=max_len)
      one = jax.tree.map(lambda x, r=r: x[0, r : r + 1], state)
      out[key] = self._fit(one, own.tokens.shape[-1], own.cont_pos.shape[-1])
    return out
