"""Scale-out: the device mesh, parameter and batch shardings, and processes.

A run is one JAX multi-controller program: every process (one per host)
runs the same code. Test samples are independent, so processes never talk
while they compute. Process k of P takes test samples k, k + P, k + 2P, ...
and runs them on a Mesh over its own local devices (all devices when P = 1):
each batch split over the `data` axis, parameters replicated, or their
experts split over `expert` and their widths over `model`. Each process
appends to its own results file, merged at the end by process 0 (the file
protocol is in `results`).

Why per-process meshes rather than one global SPMD program: a global array's
shape must agree on every process, but each batch's token bucket depends on
its own prompts, and after a crash the processes have different amounts left
to do. Independent processes need no lockstep; the price is that one host's
devices must hold the model (OLMoE-1B-7B in bf16 needs 14 GB: any TPU VM host).

Dimensions: P processes, Q test samples in a batch, D model, V vocab,
E experts, F expert hidden, H heads, KV key/value heads, Dh head dim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import transformer
from models.config import MoeConfig

MESH_AXES = ('data', 'expert', 'model')

# Mesh axis of each parameter dimension, by leaf name and rank (None:
# replicated). Routed experts split over 'expert'; attention heads, expert and
# MLP hidden units and the vocabulary over 'model' (Megatron-style column /
# row splits). Norm scales and the shared-expert gate are tiny and stay
# replicated. GSPMD inserts the collectives.
_LEAF_AXES = {
  ('embedding', 2): ('model', None),  # [V, D]
  ('lm_head', 2): (None, 'model'),  # [D, V]
  ('q', 2): (None, 'model'),  # [D, H * Dh]
  ('k', 2): (None, 'model'),  # [D, KV * Dh]
  ('v', 2): (None, 'model'),
  ('o', 2): ('model', None),  # [H * Dh, D]
  ('q_bias', 1): ('model',),  # [H * Dh]
  ('k_bias', 1): ('model',),
  ('v_bias', 1): ('model',),
  ('kernel', 2): (None, 'expert'),  # router [D, E]
  ('gate', 3): ('expert', None, 'model'),  # routed experts [E, D, F]
  ('up', 3): ('expert', None, 'model'),
  ('down', 3): ('expert', 'model', None),  # [E, F, D]
  ('gate', 2): (None, 'model'),  # dense MLP, shared experts [D, F]
  ('up', 2): (None, 'model'),
  ('down', 2): ('model', None),  # [F, D]
}


# ---- the mesh ----


def parse_mesh_shape(spec: str | None) -> dict[str, int]:
  """'data:4,expert:2' -> {'data': 4, 'expert': 2}; '' or None -> {}.

  One size may be -1: it takes the devices the others leave.
  """
  out: dict[str, int] = {}
  for part in (spec or '').split(','):
    if not part.strip():
      continue
    name, sep, size = part.partition(':')
    name = name.strip()
    if not sep or name not in MESH_AXES or not re.fullmatch(r'\s*-?\d+\s*', size):
      raise ValueError(f'bad mesh_shape entry {part!r}: expected AXIS:SIZE, AXIS in {MESH_AXES}')
    if name in out:
      raise ValueError(f'mesh_shape names {name!r} twice')
    out[name] = int(size)
    if out[name] == 0 or out[name] < -1:
      raise ValueError(f'mesh_shape {name}:{out[name]}: sizes are positive (or one -1)')
  if list(out.values()).count(-1) > 1:
    raise ValueError(f'mesh_shape {spec!r}: at most one size may be -1')
  return out


def _resolve(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  sizes = {a: shape.get(a, 1) for a in MESH_AXES}
  if 'data' not in shape and -1 not in sizes.values():
    sizes['data'] = -1  # by default every device left over goes to 'data'
  known = math.prod(s for s in sizes.values() if s != -1)
  for axis, size in sizes.items():
    if size == -1:
      if num_devices % known:
        raise ValueError(f'{num_devices} devices do not split into a mesh {shape} (x{known})')
      sizes[axis] = num_devices // known
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(shape: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A ('data', 'expert', 'model') Mesh over this process's devices.

  Args:
    shape: a mesh_shape string or dict; axes left out have size 1, except
      'data', which by default takes every remaining device.
    devices: defaults to jax.local_devices(). A mesh smaller than the device
      list uses its first devices (with a warning).
  """
  if isinstance(shape, str) or shape is None:
    shape = parse_mesh_shape(shape)
  devices = list(jax.local_devices() if devices is None else devices)
  sizes = _resolve(shape, len(devices))
  n = math.prod(sizes)
  if n > len(devices):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices; have {len(devices)}')
  if n < len(devices):
    logging.warning('mesh uses %d of %d devices', n, len(devices))
    grid = np.asarray(devices[:n], dtype=object).reshape(sizes)
  else:
    grid = mesh_utils.create_device_mesh(sizes, devices)  # topology-aware on TPU
  mesh = Mesh(grid, MESH_AXES)
  logging.info('process %d mesh %s', jax.process_index(), dict(mesh.shape))
  return mesh


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  data = mesh.shape['data']
  if batch_size % data:
    raise ValueError(
      f'batch_size={batch_size} is not a multiple of the data axis ({data} devices): '
      f'use --batch_size={data * max(1, round(batch_size / data))} or change --mesh_shape'
    )


# ---- shardings ----


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_specs(config: MoeConfig) -> dict:
  """A PartitionSpec per parameter, in the tree of transformer.param_shapes."""

  def spec(path, shape):
    return P(*_LEAF_AXES.get((path[-1].key, len(shape)), (None,) * len(shape)))

  return jax.tree_util.tree_map_with_path(spec, transformer.param_shapes(config), is_leaf=_is_shape)


def param_shardings(config: MoeConfig, mesh: Mesh) -> dict:
  """NamedShardings for load_checkpoint; checks every split dimension divides."""
  specs = param_specs(config)
  bad = []

  def check(path, shape, spec):
    for dim, axis in zip(shape, spec):
      if axis is not None and dim % mesh.shape[axis]:
        bad.append(f'{jax.tree_util.keystr(path)} dim {dim} over {axis}:{mesh.shape[axis]}')
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(
    check, transformer.param_shapes(config), specs, is_leaf=_is_shape
  )
  if bad:
    raise ValueError(f'the mesh does not divide the parameters: {"; ".join(bad[:4])}')
  return out


def shard_batch(tree, mesh: Mesh):
  """Puts every leaf's leading (sample) axis on the mesh's 'data' axis."""
  data = mesh.shape['data']
  sharding = NamedSharding(mesh, P('data'))

  def put(x):
    if np.shape(x)[0] % data:
      raise ValueError(f'leading axis {np.shape(x)[0]} is not a multiple of data:{data}')
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


# ---- processes ----


def initialize(
  multihost: bool = False,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """jax.distributed.initialize when asked for (must precede any JAX work).

  On TPU VMs (and SLURM, Open MPI, GKE) JAX detects every argument itself:
  `multihost=True` is enough. Elsewhere pass all three. CPU processes
  exchange their results through gloo collectives (JAX's default).
  """
  if not multihost and coordinator_address is None:
    if num_processes is not None or process_id is not None:
      raise ValueError(
        'num_processes / process_id need coordinator_address (or multihost on a TPU VM, '
        'where JAX finds all three)'
      )
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info('process %d of %d', jax.process_index(), jax.process_count())


def process_share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
  """This process's items: k, k + P, k + 2P, ... (balanced, fixed by P)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return list(items[index::count])
