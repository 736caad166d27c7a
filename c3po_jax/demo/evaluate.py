"""Base mc accuracy of a demo checkpoint on its suite, per benchmark family.

  python -m c3po_jax.demo.evaluate --checkpoint=checkpoints/demo --split=test

--split: 'dev' or 'test' (the test-source questions of each family) or
'reference' (each family's reference sources together).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from c3po_jax.ckpts import checkpoint
from c3po_jax.demo import bpe, choice_scores, suite


def read_split(suite_dir: str, split: str) -> dict[str, list[dict]]:
  """family -> rows of `split`, read from the files the manifest names."""
  manifest = suite.read_manifest(suite_dir)
  out = {}
  for family, bench in manifest['benchmarks'].items():
    names = bench['reference'] if split == 'reference' else [bench[split]]
    rows = []
    for name in names:
      with open(os.path.join(suite_dir, name)) as f:
        rows += [json.loads(line) for line in f]
    out[family] = rows
  return out


def evaluate(checkpoint_dir: str, split: str) -> dict[str, float]:
  """family -> accuracy of the checkpoint on `split` of its shipped suite."""
  config, params = checkpoint.load_checkpoint(checkpoint_dir)
  tok = bpe.load_tokenizer(checkpoint_dir)
  suite_dir = os.path.join(checkpoint_dir, 'suite')
  fmt = suite.read_manifest(suite_dir)['prompt']['format']
  rows = read_split(suite_dir, split)
  return {name: choice_scores.accuracy(params, config, tok, r, fmt=fmt) for name, r in rows.items()}


def main(argv, *, checkpoint_dir: str, split: str):
  del argv
  for name, acc in evaluate(checkpoint_dir, split).items():
    logging.info('%s %-9s %.3f', split, name, acc)
    print(f'{split} {name:9s} {acc:.3f}')


if __name__ == '__main__':
  _checkpoint = flags.DEFINE_string('checkpoint', 'checkpoints/demo', 'Demo checkpoint.')
  _split = flags.DEFINE_enum('split', 'dev', ['dev', 'test', 'reference'], 'Split to score.')
  app.run(lambda argv: main(argv, checkpoint_dir=_checkpoint.value, split=_split.value))
