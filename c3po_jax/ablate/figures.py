"""The study's figures with the paper's points overlaid (PNG).

Accuracy levels of a small model and OLMoE are not comparable, so the
accuracy figures plot the gain over each model's own base (ours over our
base pass, the paper's over its base: 69.9 average, 51.3 on ARC-C); core
sizes are in multiples of the model's top-k (the paper's 8 of 64 experts,
top-8, is 1x .. 8x), FLOPs as a multiple of the base forward pass.
"""

from __future__ import annotations

import os

from c3po_jax.ablate import paper


def _plt():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def accuracy_vs_flops(rows: list[dict], out_dir: str) -> str | None:
  """Fig. 4: NGD's gain over base against its FLOPs per test sample, one point per core size."""
  rows = [r for r in rows if r.get('flops_vs_base') is not None]
  if not rows:
    return None
  plt, fig, ax = _figure()
  xs = [r['flops_vs_base'] for r in rows]
  ax.plot(xs, [r['gain'] for r in rows], 'o-', label='ours (NGD, n core experts)')
  for r, x in zip(rows, xs):
    ax.annotate(f'n={r["label"]}', (x, r['gain']), textcoords='offset points', xytext=(4, 4))
  if any(r['dense_flops_vs_base'] != x for r, x in zip(rows, xs)):
    dense = [r['dense_flops_vs_base'] for r in rows]
    gains = [r['gain'] for r in rows]
    ax.plot(dense, gains, 'o:', mfc='none', color='C0', label='same, at dense-mode FLOPs')
  gain = paper.CORE[paper.CORE_PLATEAU] - paper.BASE_AVG
  ax.axhline(gain, color='C1', ls='--', label=f'paper: plateau from n={paper.CORE_PLATEAU}')
  labels = ('FLOPs per test sample (x base forward)', 'accuracy gain over base (points)')
  title = 'Fig. 4: accuracy vs FLOPs as the core grows'
  return _finish(plt, fig, ax, title, labels, os.path.join(out_dir, 'fig4_accuracy_vs_flops.png'))


def coverage(cov: dict, out_dir: str) -> str | None:
  """Fig. 5: share of the final top-k inside the base top-n, n in multiples of k."""
  if not cov:
    return None
  plt, fig, ax = _figure()
  k = cov['top_k']
  ax.plot([n / k for n in cov['n']], cov['ours'], 'o-', label=f'ours (k={k}, E={cov["n"][-1]})')
  px = [n / 8 for n in paper.COVERAGE]
  ax.plot(px, list(paper.COVERAGE.values()), 's', color='C1', ms=8, label='paper (k=8, E=64)')
  labels = ('base top-n, n / k', 'final top-k inside the base top-n (%)')
  title = 'Fig. 5: coverage of the optimized top-k'
  return _finish(plt, fig, ax, title, labels, os.path.join(out_dir, 'fig5_coverage.png'))


def steps(traj: dict, out_dir: str) -> str | None:
  """Fig. 6: gain over base after each NGD step; the paper's ARC-C points."""
  if not traj:
    return None
  plt, fig, ax = _figure()
  acc = traj['accuracy']
  ax.plot(range(len(acc)), [a - acc[0] for a in acc], 'o-', label='ours (mean over benchmarks)')
  p0 = paper.TRAJECTORY[0]
  ax.plot(
    list(paper.TRAJECTORY),
    [v - p0 for v in paper.TRAJECTORY.values()],
    's--',
    color='C1',
    label='paper (ARC-C)',
  )
  labels = ('NGD step (0 = base routing)', 'accuracy gain over base (points)')
  title = f'Fig. 6: accuracy per step (flips: ours {traj["flip"][-1]:.1f}%, paper 5.1%)'
  path = os.path.join(out_dir, 'fig6_accuracy_per_step.png')
  return _finish(plt, fig, ax, title, labels, path)


def _figure():
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
  return plt, fig, ax


def _finish(plt, fig, ax, title: str, labels: tuple, path: str) -> str:
  ax.set_xlabel(labels[0])
  ax.set_ylabel(labels[1])
  ax.set_title(title)
  ax.legend()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
