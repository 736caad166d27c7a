"""Routing heatmaps: the critical layers' core-expert weights before/after."""

from __future__ import annotations

import os

import numpy as np


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
      f'{row["task"]}/{row["id"]}: gold {row["gold"]}, base {row.get("base_prediction")}, '
      f'after {row["prediction"]}'
    )
    path = os.path.join(output_dir, f'routing_{row["method"]}_{_safe(row["id"])}.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths


def _safe(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)[:60]


def ngd_steps(diag: dict, output_dir: str) -> str | None:
  """Accuracy and neighbour loss after each optimization step (the paper's Fig. 6).

  diag: `diagnostics.summarize` output; one line per method with a path.
  """
  curves = {m: d for m, d in diag.items() if d.get('step_accuracy') or d.get('step_loss')}
  if not curves:
    return None
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.4), constrained_layout=True)
  for method, d in curves.items():
    if d.get('step_accuracy'):
      acc = 100 * np.asarray(d['step_accuracy'])
      acc_ax.plot(range(len(acc)), acc, marker='o', label=method)
    if d.get('step_loss'):
      loss_ax.plot(range(len(d['step_loss'])), d['step_loss'], marker='o', label=method)
  acc_ax.set(xlabel='step (0 = base pathway)', ylabel='test accuracy (%)', title='accuracy')
  loss_ax.set(xlabel='step', ylabel='mean loss', title='optimized loss (neighbours; oracle: own)')
  for ax in (acc_ax, loss_ax):
    ax.grid(alpha=0.3)
    if ax.get_lines():  # the trained-prompt baselines have losses but no step accuracy
      ax.legend()
  path = os.path.join(output_dir, 'ngd_steps.png')
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def accuracy(summary: dict, output_dir: str, title: str = '') -> str | None:
  """Accuracy per method with its 95% Wilson interval (`results.summarize` output)."""
  methods = [m for m, d in summary.items() if 'accuracy' in d]
  if not methods:
    return None
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  acc = np.asarray([100 * summary[m]['accuracy'] for m in methods])
  ci = np.asarray([summary[m].get('accuracy_ci95', [np.nan, np.nan]) for m in methods]) * 100
  err = np.stack([acc - ci[:, 0], ci[:, 1] - acc])
  fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 3.2), constrained_layout=True)
  ax.bar(range(len(methods)), acc, yerr=np.nan_to_num(err), capsize=4, color='#4c72b0')
  if 'base' in summary:
    ax.axhline(100 * summary['base']['accuracy'], color='grey', ls='--', lw=1, label='base')
    ax.legend()
  ax.set_xticks(range(len(methods)), methods, rotation=20)
  ax.set(ylabel='accuracy (%)', title=f'{os.path.basename(title)} (95% Wilson intervals)')
  path = os.path.join(output_dir, 'accuracy.png')
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
