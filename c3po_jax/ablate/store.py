"""Ablation results per (benchmark, setting), one JSON file each, keyed by content.

The key hashes what the setting's numbers depend on: the model, the test
samples, the reference set and every run setting outside the execution
groups, normalized (critical layers as indices, the core size as the number
of experts it selects), so two studies asking for the same setting share one
file and a rerun skips every setting already written. Files are written
atomically when a setting finishes: an interrupted study resumes at the
setting it was in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from c3po_jax.common import files
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.run.config import EXECUTION_GROUPS, GROUPS, RunConfig

SETTINGS_DIR = 'settings'


def effective(rc: RunConfig, config) -> dict:
  """rc's settings that change results, normalized against the model config."""
  out = {}
  for group in GROUPS:
    if group not in EXECUTION_GROUPS:
      out.update(dataclasses.asdict(getattr(rc, group)))
  m = rc.method
  out['critical_layers'] = list(
    pw_lib.parse_layers(m.critical_layers, config.num_hidden_layers, config.moe_layers)
  )
  e = config.num_experts
  out['core_experts'] = e if m.core_experts <= 0 else min(m.core_experts, e)
  for name in ('checkpoint_dir', 'benchmark', 'split', 'reference', 'max_test_samples'):
    out.pop(name, None)  # named by the key's benchmark and test/reference fingerprints
  if not out.get('per_method'):  # none (the study folds NGD's into the run's settings)
    out.pop('per_method', None)
  return out


def key(parts: dict) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class SettingStore:
  def __init__(self, output_dir: str):
    self.dir = os.path.join(output_dir, SETTINGS_DIR)
    os.makedirs(self.dir, exist_ok=True)

  def path(self, k: str) -> str:
    return os.path.join(self.dir, f'{k}.json')

  def get(self, k: str) -> dict | None:
    try:
      with open(self.path(k)) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # missing or torn: computed again

  def put(self, k: str, value: dict) -> None:
    files.write_json(self.path(k), value, indent=None)
