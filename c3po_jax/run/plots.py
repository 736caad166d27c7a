"""The run's figures: accuracy per method, accuracy and loss per NGD step, routing heatmaps.

Every figure gives a method the same colour (`colour`), and its title says
what it covers: one benchmark and its sample count, or a suite pooled.
"""

from __future__ import annotations

import os

import numpy as np

from c3po_jax.run.results import METHOD_ORDER, short_name

# One colour per method in every figure (matplotlib's tab10, in Table 1 order).
_TAB10 = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f')
COLOURS = dict(zip(METHOD_ORDER, _TAB10))


def colour(method: str) -> str:
  return COLOURS.get(method, '#17becf')


def scope(summary: dict, name: str) -> str:
  """What a figure covers: 'NAME (N test samples)'; name: a benchmark, file or phrase."""
  n = max((d.get('n', 0) for d in summary.values()), default=0)
  return f'{short_name(name)} ({n} test samples)'


def _answer(row: dict, index) -> str:
  """Choice `index` of a row as its text ('#3' without the choices)."""
  choices = row.get('choices') or []
  if index is None or not 0 <= index < len(choices):
    return f'#{index}'
  text = str(choices[index])
  return repr(text if len(text) <= 24 else text[:23] + '…')


def routing_heatmaps(rows: list[dict], output_dir: str, max_plots: int = 4) -> list[str]:
  """One PNG per sample (up to max_plots) from rows with a `pathway` record.

  Samples whose answer the method changed come first (fixed before broken),
  then the largest changes of the weights; the change panel's colour scale
  fits that change, not the weights.
  """
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  def order(r):
    pw = r['pathway']
    moved = float(np.abs(np.asarray(pw['after']) - np.asarray(pw['before'])).max())
    changed = r.get('base_prediction') is not None and r['prediction'] != r['base_prediction']
    return (not changed, not r.get('correct'), -moved)

  paths = []
  for row in sorted([r for r in rows if r.get('pathway')], key=order)[:max_plots]:
    pw = row['pathway']
    before, after = np.asarray(pw['before']), np.asarray(pw['after'])
    vmax = float(max(before.max(), after.max()))
    dmax = max(float(np.abs(after - before).max()), 1e-6)
    fig, axes = plt.subplots(1, 3, figsize=(13, 2.8), constrained_layout=True)
    panels = (
      (before, 'before (router)', 'viridis', 0.0, vmax),
      (after, f'after ({row["method"]})', 'viridis', 0.0, vmax),
      (after - before, 'change', 'coolwarm', -dmax, dmax),
    )
    for ax, (data, title, cmap, lo, hi) in zip(axes, panels):
      im = ax.imshow(data, aspect='auto', cmap=cmap, vmin=lo, vmax=hi)
      ax.set_title(title)
      ax.set_yticks(range(len(pw['layers'])), [f'L{i}' for i in pw['layers']])
      ax.set_xlabel('core expert rank (by base routing)')
      fig.colorbar(im, ax=ax)
    fig.suptitle(
      f'{row["task"]}/{row["id"]}: gold {_answer(row, row["gold"])}, base answered '
      f'{_answer(row, row.get("base_prediction"))}, {row["method"]} {_answer(row, row["prediction"])}'
    )
    path = os.path.join(output_dir, f'routing_{row["method"]}_{_safe(row["id"])}.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths


def _safe(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)[:60]


def ngd_steps(
  diag: dict, output_dir: str, summary: dict | None = None, title: str = ''
) -> str | None:
  """Accuracy and neighbour loss after each optimization step (the paper's Fig. 6).

  diag: `diagnostics.summarize` output; one line per method with a path.
  summary: `results.summarize` output: every other method's final accuracy is
  drawn as a dashed level, so each method of the run appears. title: what the
  figure covers (`scope`), e.g. one benchmark or a suite pooled.
  """
  fig = steps_figure(diag, summary, title)
  if fig is None:
    return None
  import matplotlib.pyplot as plt

  path = os.path.join(output_dir, 'ngd_steps.png')
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def steps_figure(diag: dict, summary: dict | None = None, title: str = ''):
  """The figure of `ngd_steps` (None when no method has steps)."""
  curves = {m: d for m, d in diag.items() if d.get('step_accuracy') or d.get('step_loss')}
  if not curves:
    return None
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
  steps = max(len(d.get('step_accuracy') or d.get('step_loss')) for d in curves.values())
  for method, d in curves.items():
    if d.get('step_accuracy'):
      acc = 100 * np.asarray(d['step_accuracy'])
      acc_ax.plot(range(len(acc)), acc, marker='o', color=colour(method), label=method)
    if d.get('step_loss'):
      loss = d['step_loss']
      loss_ax.plot(range(len(loss)), loss, marker='o', color=colour(method), label=method)
  for method, s in (summary or {}).items():
    if not (curves.get(method) or {}).get('step_accuracy'):  # no per-step path: its final level
      level = 100 * s['accuracy']
      acc_ax.plot([0, steps - 1], [level] * 2, ls='--', color=colour(method), label=method)
  acc_ax.set(
    xlabel='step (0 = base pathway; dashed: methods without steps, final)',
    ylabel='test accuracy (%)',
    title='accuracy after each step',
  )
  loss_ax.set(
    xlabel='step', ylabel='mean loss', title='optimized loss (neighbours; oracle: its own)'
  )
  for ax in (acc_ax, loss_ax):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if ax.get_lines():
      ax.legend(fontsize=8)
  fig.suptitle(f'{title}: accuracy and loss after each optimization step'.lstrip(': '))
  return fig


def accuracy(summary: dict, output_dir: str, title: str = '') -> str | None:
  """Accuracy per method with its 95% Wilson interval (`results.summarize` output).

  title: what the figure covers (`scope`); a benchmark name or path is made one.
  """
  methods = [m for m, d in summary.items() if 'accuracy' in d]
  if not methods:
    return None
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  acc = np.asarray([100 * summary[m]['accuracy'] for m in methods])
  ci = np.asarray([summary[m].get('accuracy_ci95', [np.nan, np.nan]) for m in methods]) * 100
  err = np.stack([acc - ci[:, 0], ci[:, 1] - acc])
  fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 3.4), constrained_layout=True)
  colours = [colour(m) for m in methods]
  ax.bar(range(len(methods)), acc, yerr=np.nan_to_num(err), capsize=4, color=colours)
  if 'base' in summary:
    ax.axhline(100 * summary['base']['accuracy'], color='grey', ls='--', lw=1, label='base')
    ax.legend()
  ax.set_xticks(range(len(methods)), methods, rotation=20)
  if title and '(' not in title:
    title = scope(summary, title)
  ax.set(ylabel='accuracy (%)', title=f'{title}: accuracy, 95% Wilson intervals'.lstrip(': '))
  path = os.path.join(output_dir, 'accuracy.png')
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
