"""Routing heatmaps: the critical layers' core-expert weights before/after."""

from __future__ import annotations

import os

import numpy as np


def routing_heatmaps(rows: list[dict], output_dir: str, max_plots: int = 4) -> list[str]:
  """One PNG per sample (up to max_plots) from rows with a `pathway` record."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  for row in [r for r in rows if r.get('pathway')][:max_plots]:
    pw = row['pathway']
    before, after = np.asarray(pw['before']), np.asarray(pw['after'])
    vmax = float(max(before.max(), after.max()))
    fig, axes = plt.subplots(1, 3, figsize=(13, 2.8), constrained_layout=True)
    panels = (
      (before, 'before (router)', 'viridis', 0.0, vmax),
      (after, f'after ({row["method"]})', 'viridis', 0.0, vmax),
      (after - before, 'change', 'coolwarm', -vmax, vmax),
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
