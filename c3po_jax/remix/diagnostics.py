"""What re-mixing did, per method: the numbers that say whether it moved anything.

From the result rows: the neighbour loss before and after (NGD, oracle and
the trained-prompt baselines: the first and last of its trajectory; kernel regression: alpha = 1, i.e. the
base pathway, and the chosen alpha), the share of the final top-k experts
that were not in the base top-k (the paper's Fig. 5 statistic, mean over
critical layers and samples), the mean |w - w_base| over the core weights,
and the accuracy after each optimization step (the paper's Fig. 6), from the
rows' `step_correct`.
"""

from __future__ import annotations

import numpy as np


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(f'{np.mean(values):.6g}') if values else None  # 6 significant digits


def summarize(rows: list[dict]) -> dict:
  """{method: {n, loss_before, loss_after, topk_new, mean_abs_delta, step_accuracy, step_loss}}."""
  by_method: dict[str, list[dict]] = {}
  for r in rows:
    if r['method'] != 'base' and ('pathway' in r or 'losses' in r):
      by_method.setdefault(r['method'], []).append(r)
  out = {}
  for method, rs in by_method.items():
    d = {
      'n': len(rs),
      'loss_before': _mean(r.get('loss_before') for r in rs),
      'loss_after': _mean(r.get('loss_after') for r in rs),
      'topk_new': _mean(r.get('topk_new') for r in rs),
      'mean_abs_delta': _mean(r.get('mean_abs_delta') for r in rs),
    }
    steps = [r['step_correct'] for r in rs if r.get('step_correct')]
    if steps and len({len(s) for s in steps}) == 1:
      d['step_accuracy'] = np.mean(np.asarray(steps, float), axis=0).round(4).tolist()
    losses = [r['losses'] for r in rs if r.get('losses')]
    if losses and len({len(x) for x in losses}) == 1:
      d['step_loss'] = np.mean(np.asarray(losses, float), axis=0).round(5).tolist()
    out[method] = d
  return out


def _fmt(x, spec='.4f') -> str:
  return '-' if x is None else format(x, spec)


def format_table(diag: dict) -> str:
  """A small text table; then accuracy after each step for the optimizing methods."""
  if not diag:
    return ''
  head = (
    f'{"method":<18} {"loss before":>12} {"loss after":>11} {"new top-k":>10} {"mean |dw|":>10}'
  )
  lines = ['re-mixing diagnostics', head, '-' * len(head)]
  for method, d in diag.items():
    new = '-' if d['topk_new'] is None else f'{100 * d["topk_new"]:.1f}%'
    lines.append(
      f'{method:<18} {_fmt(d["loss_before"]):>12} {_fmt(d["loss_after"]):>11} '
      f'{new:>10} {_fmt(d["mean_abs_delta"], ".5f"):>10}'
    )
  for method, d in diag.items():
    if d.get('step_accuracy'):
      acc = ' '.join(f'{100 * a:.1f}' for a in d['step_accuracy'])
      lines.append(f'{method} accuracy after each step (0 = base): {acc}')
  lines.append('(new top-k: share of the final top-k experts outside the base top-k, Fig. 5)')
  return '\n'.join(lines)
