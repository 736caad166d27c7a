"""A byte-bounded store of prepared prefix states, one per prompt, in tiers.

A prompt's prefix state (see `losses.PrefixLoss`) does not depend on the test
sample's pathway. References recur as neighbours across test samples, and
both references and test samples already pass through the model once (the
reference-set build, the base analysis), which yields their states
(`losses.analyze_and_prepare`): `put` keeps them, `states` returns the states
of a batch and prepares only the prompts it has not got (in one jitted call,
the count padded to a power of two so few shapes compile).

Each state is kept at its own bucketed shape and padded to the largest
bucket of a batch when stacked, so a batch of states has bucketed shapes.
Tiers, least recently used first out of each:

* device: jax arrays, at most `max_bytes`;
* host: numpy copies of what the device tier evicts, at most `host_bytes`
  (0 on a CPU backend, where device memory is host memory);
* disk (optional): one `.npz` per state under `spill_dir`, unbounded; a
  later run with the same `namespace` finds them (the tree structure comes
  from the first state of the run, so a state is read back once one exists).

Dimensions: R prompts asked for, M prompts prepared in one call.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from c3po_jax.remix import scoring
from c3po_jax.tasks.encoding import EncodedPrompt

# Share of the free memory an automatic budget takes.
AUTO_SHARE = 0.25


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def nbytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def host_available_bytes() -> int:
  """MemAvailable of /proc/meminfo (Linux), else 0."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def auto_budgets() -> tuple[int, int]:
  """(device bytes, host bytes): a share of the free memory of each.

  On a CPU backend the device is the host: all of the share goes to the
  device tier and the host tier gets none.
  """
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() if dev.platform != 'cpu' else None
  host = int(AUTO_SHARE * host_available_bytes())
  if not stats or 'bytes_limit' not in stats:
    return host, 0
  free = stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  return int(AUTO_SHARE * max(free, 0)), host


class StateCache:
  """States with a leading axis of 1, by key, in tiers (see the module docstring).

  Args:
    prepare: (params, ChoiceBatch [1, M, ...]) -> state [1, M, ...], e.g. a
      jitted `engine.Engine.prepare`.
    fit: (state, num_tokens, window) -> the state padded or cut to those
      sizes (`losses.fit`); states expose `num_tokens` and `window_size`.
    max_bytes: the device tier's bound.
    host_bytes: the host tier's bound (0: none; evicted states go to disk or away).
    spill_dir: the disk tier's folder, or None (none).
    namespace: what the states depend on besides their key (model, layers,
      lengths): it names the disk files, so other settings never read them.
  """

  def __init__(
    self,
    prepare: Callable,
    fit: Callable,
    max_bytes: int,
    *,
    host_bytes: int = 0,
    spill_dir: str | None = None,
    namespace: str = '',
  ):
    if max_bytes < 1 or host_bytes < 0:
      raise ValueError(f'max_bytes={max_bytes} must be >= 1 and host_bytes={host_bytes} >= 0')
    self._prepare, self._fit = prepare, fit
    self.max_bytes, self.host_bytes = max_bytes, host_bytes
    self.spill_dir, self.namespace = spill_dir, namespace
    self._device: collections.OrderedDict = collections.OrderedDict()
    self._host: collections.OrderedDict = collections.OrderedDict()
    self._size = {'device': 0, 'host': 0}
    self._treedef = None
    self.hits = 0
    self.misses = 0
    self.spilled = 0  # states written to disk

  def __len__(self) -> int:
    return len(self._device) + len(self._host)

  def __contains__(self, key: Hashable) -> bool:
    return key in self._device or key in self._host

  @property
  def device_bytes(self) -> int:
    return self._size['device']

  def put(self, key: Hashable, state, *, evict: bool = True) -> None:
    """Keeps a state [1, ...] (at its own buckets) as the most recently used."""
    self._treedef = self._treedef or jax.tree.structure(state)
    self._drop(key)
    self._device[key] = state
    self._size['device'] += nbytes(state)
    if evict:
      self._evict()

  def put_rows(self, keys, state, prompts, *, num_choices: int, max_len: int) -> None:
    """Row r of a state [M, ...] under keys[r], cut to prompts[r]'s buckets (None: skipped)."""
    for r, (key, prompt) in enumerate(zip(keys, prompts)):
      if key is not None:
        self.put(key, self._own(state, r, prompt, num_choices, max_len))

  def get(self, key: Hashable):
    """The state [1, ...] of key, moved to the device tier, or None."""
    if key in self._device:
      self._device.move_to_end(key)
      return self._device[key]
    state = self._host.get(key)
    if state is None:
      state = self._read(key)
    if state is None:
      return None
    state = jax.tree.map(jnp.asarray, state)
    self.put(key, state, evict=False)  # evicted once the batch is complete (`states`)
    return state

  def states(
    self,
    params,
    keys: Sequence[Hashable],
    prompts: Sequence[EncodedPrompt],
    *,
    num_choices: int,
    max_len: int,
  ):
    """States of the given prompts stacked: [R, ...] (keys may repeat)."""
    if len(keys) != len(prompts):
      raise ValueError(f'{len(keys)} keys for {len(prompts)} prompts')
    got, new = {}, {}
    for key, prompt in zip(keys, prompts):
      if key in got or key in new:
        continue
      state = self.get(key)
      if state is None:
        new[key] = prompt
      else:
        got[key] = state
    self.misses += len(new)
    self.hits += len(keys) - len(new)
    if new:
      got.update(self._compute(params, new, num_choices, max_len, len(keys)))
      for key in new:
        self.put(key, got[key], evict=False)
    for key in keys:  # in order of use: the last used go last
      if key in self._device:
        self._device.move_to_end(key)
    self._evict()
    rows = [got[k] for k in keys]
    t = max(s.num_tokens for s in rows)
    u = max(s.window_size for s in rows)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *[self._fit(s, t, u) for s in rows])

  def _own(self, state, r: int, prompt, num_choices: int, max_len: int):
    """Row r of state [M, ...] as [1, ...], cut to the prompt's own buckets."""
    own = scoring.make_batch([prompt], num_choices=num_choices, max_len=max_len)
    one = jax.tree.map(lambda x: x[r : r + 1], state)
    return self._fit(one, own.tokens.shape[-1], own.cont_pos.shape[-1])

  def _compute(self, params, new: dict, num_choices: int, max_len: int, most: int) -> dict:
    """Prepares the new prompts in one call; each cut to its own buckets."""
    prompts = list(new.values())
    m = min(_pow2_at_least(len(prompts)), max(most, len(prompts)))
    padded = prompts + [prompts[-1]] * (m - len(prompts))
    data = scoring.make_batch(padded, num_choices=num_choices, max_len=max_len)
    state = self._prepare(params, jax.tree.map(lambda x: x[None], data))  # [1, M, ...]
    state = jax.tree.map(lambda x: x[0], state)  # [M, ...]
    return {k: self._own(state, r, p, num_choices, max_len) for r, (k, p) in enumerate(new.items())}

  # ---- tiers ----
  def _drop(self, key) -> None:
    for tier, entries in (('device', self._device), ('host', self._host)):
      if key in entries:
        self._size[tier] -= nbytes(entries.pop(key))

  def _evict(self) -> None:
    while self._size['device'] > self.max_bytes and self._device:
      key, state = self._device.popitem(last=False)
      size = nbytes(state)
      self._size['device'] -= size
      if self.host_bytes:
        self._host[key] = jax.device_get(state)
        self._size['host'] += size
      else:
        self._write(key, state)
    while self._size['host'] > self.host_bytes and self._host:
      key, state = self._host.popitem(last=False)
      self._size['host'] -= nbytes(state)
      self._write(key, state)

  def _path(self, key) -> str:
    name = hashlib.sha256(f'{self.namespace}|{key!r}'.encode()).hexdigest()[:32]
    return os.path.join(self.spill_dir, f'state-{name}.npz')

  def _write(self, key, state) -> None:
    if self.spill_dir is None:
      return
    path = self._path(key)
    if os.path.exists(path):
      return
    leaves = {f'leaf{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    os.makedirs(self.spill_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'  # renamed: a reader never sees half a file
    with open(tmp, 'wb') as f:
      np.savez(f, **leaves)
    os.replace(tmp, path)
    self.spilled += 1

  def _read(self, key):
    if self.spill_dir is None or self._treedef is None:
      return None
    path = self._path(key)
    if not os.path.exists(path):
      return None
    with np.load(path, allow_pickle=False) as z:
      leaves = [z[f'leaf{i}'] for i in range(len(z.files))]
    return jax.tree.unflatten(self._treedef, leaves)
