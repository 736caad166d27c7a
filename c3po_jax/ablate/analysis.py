"""The numbers of a study from its per-sample records; the tables next to the paper's.

Records are `context.run_setting`'s, one per test sample. Accuracy of a
benchmark is the share of correct records; a study's `avg` is the mean over
benchmarks (the paper averages its six benchmarks the same way). Next to the
paper, two comparisons: the accuracy itself (diff = ours - paper; on a model
of another scale this says little) and the gain over the base model (ours
over our base, the paper's over its 69.9).

Dimensions: P points of a path (steps + 1), C critical layers, Kc core experts.
"""

from __future__ import annotations

import numpy as np

from c3po_jax.ablate import paper


def accuracy(records: list[dict], read_step: int | None = None) -> float:
  """% correct; read_step: after that step of the path (records need step_correct)."""
  if read_step is None:
    return 100.0 * float(np.mean([r['correct'] for r in records]))
  paths = [r['step_correct'] for r in records]
  if any(p is None or len(p) <= read_step for p in paths):
    raise ValueError(f'records have no accuracy path through step {read_step}')
  return 100.0 * float(np.mean([p[read_step] for p in paths]))


def coverage(records: list[dict], top_k: int, num_experts: int) -> list[float]:
  """Fig. 5: % of the final top-k inside the base top-n, for n = k..E (mean over samples, layers).

  Each record's `after` [C, E] holds the optimized weights of every expert in
  the base ranking's order (the core is every expert, sorted by base
  probability), so an expert of the final top-k lies in the base top-n when
  its position is below n. Ties keep the base order (a stable sort).
  """
  positions = []
  for r in records:
    after = np.asarray(r['after'], np.float64)  # [C, E]
    if after.shape[-1] != num_experts:
      raise ValueError(f'coverage needs every expert optimized: {after.shape[-1]} of {num_experts}')
    positions.append(np.argsort(-after, axis=-1, kind='stable')[:, :top_k])  # [C, K]
  pos = np.stack(positions)  # [Q, C, K]
  return [100.0 * float(np.mean(pos < n)) for n in range(top_k, num_experts + 1)]


def trajectory(records: list[dict]) -> dict:
  """Fig. 6: accuracy after each step, and the share of flips at each step (%).

  flip: of the samples the base answers correctly, the share answered wrong
  (correct -> wrong); fix: of those it answers wrongly, the share answered right.
  """
  paths = np.asarray([r['step_correct'] for r in records], bool)  # [Q, P]
  base = np.asarray([r['base_correct'] for r in records], bool)
  right, wrong = max(int(base.sum()), 1), max(int((~base).sum()), 1)
  return {
    'accuracy': (100.0 * paths.mean(axis=0)).round(2).tolist(),
    'flip': (100.0 * (base[:, None] & ~paths).sum(axis=0) / right).round(2).tolist(),
    'fix': (100.0 * (~base[:, None] & paths).sum(axis=0) / wrong).round(2).tolist(),
    'base_correct': int(base.sum()),
    'n': len(records),
  }


def row(label: str, ours: dict, base: dict, paper_value: float | None, **extra) -> dict:
  """One table row: accuracy per benchmark, its mean, and the comparison with the paper."""
  avg = float(np.mean(list(ours.values())))
  base_avg = float(np.mean(list(base.values())))
  out = {
    'label': label,
    'ours': {k: round(v, 2) for k, v in ours.items()},
    'avg': round(avg, 2),
    'gain': round(avg - base_avg, 2),
    'paper': paper_value,
    'diff': None if paper_value is None else round(avg - paper_value, 2),
    'paper_gain': None if paper_value is None else round(paper_value - paper.BASE_AVG, 2),
  }
  out.update(extra)
  return out


def _cell(x, width: int, sign: bool = False) -> str:
  if x is None:
    return f'{"-":>{width}}'
  return f'{x:>+{width}.1f}' if sign else f'{x:>{width}.1f}'


def format_table(study: str, rows: list[dict], names: list[str], extra: tuple = ()) -> str:
  """A study's rows: per benchmark, the average, the paper's, and both comparisons."""
  width = max(6, *(len(n) for n in names))
  lw = max(14, *(len(r['label']) for r in rows))
  cols = ''.join(f' {n:>{width}}' for n in names)
  more = ''.join(f' {e:>10}' for e in extra)
  head = f'{"setting":<{lw}}{cols} {"avg":>6} {"paper":>6} {"diff":>6} {"gain":>6} {"p.gain":>6}'
  lines = [f'{study} (NGD accuracy %; paper: OLMoE-1B-7B, 6-benchmark average)', head + more]
  lines.append('-' * len(lines[-1]))
  for r in rows:
    cells = ''.join(' ' + _cell(r['ours'].get(n), width) for n in names)
    tail = ''.join(f' {fmt(r.get(e)):>10}' for e in extra)
    lines.append(
      f'{r["label"]:<{lw}}{cells} {_cell(r["avg"], 6)} {_cell(r["paper"], 6)} '
      f'{_cell(r["diff"], 6, True)} {_cell(r["gain"], 6, True)} {_cell(r["paper_gain"], 6, True)}'
      + tail
    )
  lines.append('(diff: ours - paper; gain: ours - our base; p.gain: paper - its base 69.9)')
  return '\n'.join(lines)


def fmt(x) -> str:
  if x is None:
    return '-'
  if isinstance(x, float):
    return f'{x:.4g}'
  if isinstance(x, list):
    return ','.join(str(i) for i in x)
  return str(x)
