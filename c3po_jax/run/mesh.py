"""Scale-out: the device mesh, parameter and batch shardings, and processes.

A run is one JAX multi-controller program: every process (one per host)
runs the same code. Test samples are independent, so processes never talk
while they compute. Process k of P takes test samples k, k + P, k + 2P, ...
and runs them on a Mesh over its own local devices (all devices when P = 1):
each batch split over the `data` axis, parameters replicated, or their
experts split over `expert` and their widths over `model`. Each process
appends to its own results file (`results.process-k.jsonl`; plain
`results.jsonl` when P = 1); at the end every process's rows are gathered
to process 0 by a collective (no shared filesystem needed), which drops
duplicates and writes `results.jsonl`.

Why per-process meshes rather than one global SPMD program: a global array's
shape must agree on every process, but each batch's token bucket depends on
its own prompts, and after a crash the processes have different amounts left
to do. Independent processes need no lockstep; the price is that one host's
devices must hold the model (OLMoE-1B-7B in bf16 needs 14 GB: any TPU VM host).

Dimensions: P processes, Q test samples in a batch, D model, V vocab,
E experts, F expert hidden, H heads, KV key/value heads, Dh head dim.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from c3po_jax.common import files
from c3po_jax.run import results
from models.olmoe import transformer
from models.olmoe.config import OlmoeConfig

MESH_AXES = ('data', 'expert', 'model')
PROCESS_FILE = 'results.process-{}.jsonl'

# Mesh axis of each parameter dimension, by leaf name (None: replicated).
# Experts split over 'expert'; attention heads, expert hidden units and the
# vocabulary over 'model' (Megatron-style column / row splits). Norm scales
# are tiny and stay replicated. GSPMD inserts the collectives.
_LEAF_AXES = {
  'embed': ('model', None),  # [V, D]
  'lm_head': (None, 'model'),  # [D, V]
  'q': (None, 'model'),  # [D, H * Dh]
  'k': (None, 'model'),  # [D, KV * Dh]
  'v': (None, 'model'),
  'o': ('model', None),  # [H * Dh, D]
  'router': (None, 'expert'),  # [D, E]
  'gate': ('expert', None, 'model'),  # [E, D, F]
  'up': ('expert', None, 'model'),
  'down': ('expert', 'model', None),  # [E, F, D]
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


def param_specs(config: OlmoeConfig) -> dict:
  """A PartitionSpec per parameter, in the tree of transformer.param_shapes."""

  def spec(path, shape):
    name = path[-1].key
    axes = _LEAF_AXES.get(name, (None,) * len(shape))
    if len(axes) != len(shape):
      raise ValueError(f'{jax.tree_util.keystr(path)}: rank {len(shape)} != {axes}')
    return P(*axes)

  return jax.tree_util.tree_map_with_path(spec, transformer.param_shapes(config), is_leaf=_is_shape)


def param_shardings(config: OlmoeConfig, mesh: Mesh) -> dict:
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


def results_filename(index: int | None = None, count: int | None = None) -> str:
  """results.jsonl for a single process, else results.process-{k}.jsonl."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return results.RESULTS_FILE if count == 1 else PROCESS_FILE.format(index)


def _process_files(output_dir: str) -> dict[int, str]:
  pattern = re.compile(r'results\.process-(\d+)\.jsonl$')
  found = {}
  for path in glob.glob(os.path.join(output_dir, PROCESS_FILE.format('*'))):
    m = pattern.search(path)
    if m:
      found[int(m.group(1))] = path
  return found


def results_writer(
  output_dir: str, resume: bool, index: int | None = None, count: int | None = None
) -> results.ResultsWriter:
  """This process's ResultsWriter; refuses to mix runs of other process counts."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  stray = sorted(k for k in _process_files(output_dir) if k >= count)
  if resume and stray:
    raise results.ResultsExistError(
      f'{output_dir} holds results of a run with more than {count} process(es) '
      f'(results.process-{stray[-1]}.jsonl): resume it with the same number of processes'
    )
  merged = os.path.join(output_dir, results.RESULTS_FILE)
  if count > 1 and not resume and os.path.exists(merged) and os.path.getsize(merged) > 0:
    raise results.ResultsExistError(
      f'{merged} already has results: pass --resume to continue that run, '
      'or choose another --output_dir'
    )
  return results.ResultsWriter(output_dir, resume, results_filename(index, count))


def _gather_bytes(data: bytes) -> list[bytes]:
  """Every process's bytes, on every process (two all-gathers)."""
  sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int64))  # [P, 1]
  buf = np.zeros(max(1, int(sizes.max())), np.uint8)
  buf[: len(data)] = np.frombuffer(data, np.uint8)
  every = multihost_utils.process_allgather(buf)  # [P, max bytes]
  return [every[k, : int(sizes[k, 0])].tobytes() for k in range(len(sizes))]


def merge_rows(
  row_lists: Sequence[Sequence[dict]], methods: Sequence[str], ids: Sequence[str]
) -> list[dict]:
  """One row per (method, id), the first seen, in single-process order.

  That order is methods as listed, samples in test-set order; rows of other
  methods or samples (an earlier run's) follow, in the order seen.
  """
  seen: dict[tuple[str, str], dict] = {}
  for rows in row_lists:
    for row in rows:
      seen.setdefault((row['method'], row['id']), row)
  m_rank = {m: i for i, m in enumerate(methods)}
  i_rank = {i: n for n, i in enumerate(ids)}
  order = {key: n for n, key in enumerate(seen)}

  def rank(key):
    return (m_rank.get(key[0], len(m_rank)), i_rank.get(key[1], len(i_rank)), order[key])

  return [seen[key] for key in sorted(seen, key=rank)]


def _parse_lines(data: bytes, source: str) -> list[dict]:
  """JSON lines; a torn last line (no newline: a crash mid-write) is dropped.

  A line that is not a result row raises ResultsFileError naming `source`
  and the line, as `results.read_rows` does for a single process.
  """
  rows = []
  for number, raw in enumerate(data[: data.rfind(b'\n') + 1].splitlines(), start=1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode('utf-8'))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      row, why = None, str(e)
    else:
      why = 'no method and id'
    if not isinstance(row, dict) or not {'method', 'id'} <= set(row):
      raise results.ResultsFileError(
        f'{source}, line {number}: not a result row ({why}); delete that line and pass '
        '--resume, or --overwrite to start over'
      )
    rows.append(row)
  return rows


def write_rows(path: str, rows: Sequence[dict]) -> None:
  """Replaces path atomically with rows, one sorted-key JSON line each."""
  with files.atomic_open(path, sync=True) as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + '\n')


def collect_rows(
  writer_path: str, output_dir: str, methods: Sequence[str], ids: Sequence[str]
) -> list[dict]:
  """Every process's rows; process 0 also writes them to results.jsonl.

  One process: its results.jsonl as written. Several: a collective gathers
  each process's file to all; process 0 merges them after any rows of an
  earlier results.jsonl it holds (so a resume never drops them).
  """
  if jax.process_count() == 1:
    return results.read_rows(writer_path)
  with open(writer_path, 'rb') as f:
    mine = f.read()
  parts = [
    _parse_lines(b, f'results of process {i} ({writer_path} there)')
    for i, b in enumerate(_gather_bytes(mine))
  ]
  merged_path = os.path.join(output_dir, results.RESULTS_FILE)
  if jax.process_index() == 0 and os.path.exists(merged_path):
    with open(merged_path, 'rb') as f:
      parts.insert(0, _parse_lines(f.read(), merged_path))
  rows = merge_rows(parts, methods, ids)
  if jax.process_index() == 0:
    write_rows(merged_path, rows)
    logging.info('merged %d rows of %d processes into %s', len(rows), len(parts), merged_path)
  return rows
