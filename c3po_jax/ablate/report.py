"""The study's results: one table per study next to the paper's, ablations.json, figures.

Also says where the model's shape makes a study degenerate (`notes`): names
of layer sets that collide in a shallow model, core sizes beyond the
model's experts, FLOPs that cannot grow with the core in top-k mode.
"""

from __future__ import annotations

import os

import numpy as np

from c3po_jax.ablate import analysis, figures, flops, paper, studies
from c3po_jax.common import files
from c3po_jax.remix import pathway as pw_lib

RESULTS_FILE = 'ablations.json'


def _per_benchmark(benches, study: str, setting: studies.Setting) -> dict:
  return {
    b.name: analysis.accuracy(b.records[study, setting.label], setting.read_step) for b in benches
  }


def _flops(config, rc, benches, setting: studies.Setting) -> dict:
  s_rc = rc.replace(**setting.fields)
  m = s_rc.method
  layers = pw_lib.parse_layers(m.critical_layers, config.num_hidden_layers, config.moe_layers)
  core = config.num_experts if m.core_experts <= 0 else min(m.core_experts, config.num_experts)
  recs = [r for b in benches for r in b.records[setting.study, setting.label]]
  return flops.per_sample(
    config,
    test_tokens=float(np.mean([b.test_tokens for b in benches])),
    ref_tokens=float(np.mean([b.ref_tokens for b in benches])),
    neighbours=float(np.mean([r['neighbours'] for r in recs])),
    steps=m.ngd_steps,
    layers=layers,
    core=core,
    opt_mode=m.opt_pathway_mode,
  )


def complete(grids: dict, benches) -> dict:
  """The grids less the settings some benchmark has no records of; studies left empty dropped."""
  out = {}
  for study, grid in grids.items():
    done = [s for s in grid if all((study, s.label) in b.records for b in benches)]
    if done:
      out[study] = done
  return out


def notes(config, rc, grids: dict) -> list[str]:
  """Where the model's shape makes a study degenerate, and what runs instead."""
  out = []
  e, k = config.num_experts, config.num_experts_per_tok
  if 'layers' in grids:
    merged = [s.label for s in grids['layers'] if '=' in s.label]
    if merged:
      out.append(
        f'layers: {len(config.moe_layers)} MoE layers, so names collide ({"; ".join(merged)});'
        ' each distinct set runs once.'
      )
  if 'core' in grids and e < paper.CORE_PLATEAU:
    grid = studies.core_grid(e, k)
    out.append(
      f'core: {e} experts, top-{k}: n = {", ".join(map(str, grid))} (k..E) instead of the '
      f"paper's 8..64; its plateau n = {paper.CORE_PLATEAU} does not exist here."
    )
  if 'core' in grids and rc.method.opt_pathway_mode == 'topk':
    out.append(
      'core: NGD optimizes in top-k mode here, so the window token runs k experts whatever n is:'
      ' FLOPs do not grow with n (they do in dense mode).'
    )
  if 'coverage' in grids:
    out.append(f'coverage: n = {k}..{e} (top-{k} of {e}) instead of 8..64 (top-8 of 64).')
    if rc.method.core_experts <= 0 or rc.method.core_experts >= e:
      out.append('coverage: the run already optimizes every expert: its setting is the run one.')
  if 'tokens' in grids and not studies.has_token_count():
    out.append('tokens: the run config has no token_count setting: only 1-token rows run.')
  return out


def build(benches, config, rc, grids: dict, schedule: str) -> dict:
  names = [b.name for b in benches]
  base = {b.name: 100.0 * float(np.mean(b.base)) for b in benches}
  out = {
    'benchmarks': names,
    'base': base,
    'base_avg': float(np.mean(list(base.values()))),
    'steps_schedule': schedule,
    'studies': {},
    'notes': notes(config, rc, grids),
  }
  for study, grid in grids.items():
    if study in ('coverage', 'trajectory'):
      continue
    rows = []
    for s in grid:
      extra = dict(s.info)
      recs = [r for b in benches for r in b.records[study, s.label]]
      extra['neighbours'] = round(float(np.mean([r['neighbours'] for r in recs])), 2)
      extra['new_topk'] = round(100 * float(np.mean([r['topk_new'] or 0 for r in recs])), 1)
      if study == 'core':
        f = _flops(config, rc, benches, s)
        extra['flops'] = f['ngd']
        extra['flops_vs_base'] = round(f['ngd']['total'] / f['base']['total'], 3)
        dense = _flops(config, rc.replace(opt_pathway_mode='dense'), benches, s)
        extra['dense_flops_vs_base'] = round(dense['ngd']['total'] / dense['base']['total'], 3)
      rows.append(analysis.row(s.label, _per_benchmark(benches, study, s), base, s.paper, **extra))
    out['studies'][study] = rows
  if 'coverage' in grids:
    s = grids['coverage'][0]
    k = config.num_experts_per_tok
    per = [
      analysis.coverage(b.records['coverage', s.label], k, config.num_experts) for b in benches
    ]
    out['coverage'] = {
      'top_k': k,
      'n': list(range(k, config.num_experts + 1)),
      'ours': np.round(np.mean(per, axis=0), 2).tolist(),
      'per_benchmark': dict(zip(names, per)),
      'paper': paper.COVERAGE,
    }
  if 'trajectory' in grids:
    s = grids['trajectory'][0]
    per = {b.name: analysis.trajectory(b.records['trajectory', s.label]) for b in benches}
    out['trajectory'] = {
      key: np.round(np.mean([p[key] for p in per.values()], axis=0), 2).tolist()
      for key in ('accuracy', 'flip', 'fix')
    }
    out['trajectory']['per_benchmark'] = per
    out['trajectory']['paper'] = {'arc_challenge': paper.TRAJECTORY, 'flip': paper.FLIP_RATE}
  return out


EXTRA_COLUMNS = {
  'layers': ('layers',),
  'neighbourhood': ('neighbours',),
  'core': ('flops_vs_base', 'new_topk'),
}


def _in_order(by_study: dict):
  """(study, rows) in the order of `studies.STUDIES` (ablations.json sorts its keys)."""
  return [(s, by_study[s]) for s in studies.STUDIES if s in by_study]


def tables(result: dict) -> str:
  names = result['benchmarks']
  base = ' '.join(f'{n} {v:.1f}' for n, v in result['base'].items())
  parts = [f'base accuracy %: {base} (avg {result["base_avg"]:.1f}; paper {paper.BASE_AVG})']
  for study, rows in _in_order(result['studies']):
    parts.append(analysis.format_table(study, rows, names, EXTRA_COLUMNS.get(study, ())))
  cov = result.get('coverage')
  if cov:
    k = cov['top_k']
    lines = ['coverage (Fig. 5): % of the final top-k inside the base top-n']
    lines.append('n    n/k   ours  paper (at the same n/k; its k = 8)')
    for n, v in zip(cov['n'], cov['ours']):
      p = next((pv for pn, pv in paper.COVERAGE.items() if abs(pn / 8 - n / k) < 1e-9), '-')
      lines.append(f'{n:<4} {n / k:<5.2f} {v:5.1f}  {p}')
    parts.append('\n'.join(lines))
  tr = result.get('trajectory')
  if tr:
    pt = paper.TRAJECTORY
    lines = ['trajectory (Fig. 6): accuracy % after each NGD step (paper: ARC-C)']
    lines.append('step  ours  flip  fix   paper')
    for i, (a, fl, fx) in enumerate(zip(tr['accuracy'], tr['flip'], tr['fix'])):
      lines.append(f'{i:<5} {a:5.1f} {fl:5.1f} {fx:5.1f}  {pt.get(i, "-")}')
    lines.append(
      f'flip (correct -> wrong) after the last step: ours {tr["flip"][-1]:.1f}%, '
      f'paper {paper.FLIP_RATE}% (ARC-C)'
    )
    parts.append('\n'.join(lines))
  if result['notes']:
    parts.append('notes:\n' + '\n'.join(f'- {n}' for n in result['notes']))
  return '\n\n'.join(parts)


def write(result: dict, out_dir: str) -> list[str]:
  """ablations.json, tables.txt and the figures; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, RESULTS_FILE)
  files.write_json(path, result)
  text = os.path.join(out_dir, 'tables.txt')
  with open(text, 'w') as f:
    f.write(tables(result) + '\n')
  md = os.path.join(out_dir, 'ablations.md')
  with open(md, 'w') as f:
    f.write(markdown(result) + '\n')
  written = [path, text, md]
  for p in (
    figures.accuracy_vs_flops(result['studies'].get('core', []), out_dir),
    figures.coverage(result.get('coverage'), out_dir),
    figures.steps(result.get('trajectory'), out_dir),
  ):
    if p:
      written.append(p)
  return written


def markdown(result: dict) -> str:
  """The study tables as Markdown (ablations.md): one row per setting, averages only."""
  names = result['benchmarks']
  out = [f'Base accuracy: {result["base_avg"]:.1f}% (paper: {paper.BASE_AVG}%).', '']
  for study, rows in _in_order(result['studies']):
    more = EXTRA_COLUMNS.get(study, ())
    head = ['setting', *names, 'avg', 'gain', 'paper', 'paper gain', *more]
    out += [f'**{study}**', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
      cells = [r['label'], *(f'{r["ours"][n]:.1f}' for n in names), f'{r["avg"]:.1f}']
      cells += [f'{r["gain"]:+.1f}', analysis.fmt(r['paper'])]
      cells += ['-' if r['paper_gain'] is None else f'{r["paper_gain"]:+.1f}']
      cells += [analysis.fmt(r.get(e)) for e in more]
      out.append('| ' + ' | '.join(cells) + ' |')
    out.append('')
  return '\n'.join(out)
