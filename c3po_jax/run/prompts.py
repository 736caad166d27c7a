"""The trained-prompt baselines in the paper's form: one prompt per benchmark, trained once.

`--baseline_scope=references`: soft prompt and prefix tuning are trained on
the benchmark's reference set with the model frozen ("trained on the full
reference sets with the base model frozen", the paper's section 4.1), then
applied unchanged to every test sample. What they train on is
`--baseline_references`: 'all' (default) the labelled reference candidates,
the data the paper's reference sets are made of; 'correct' only those the
base model answers, C3PO's reference set. 'all' is the default because a
trained prompt is a supervised baseline: the questions the model gets wrong
are the ones a prompt can learn from, while on C3PO's reference set the
loss is already small (the model answers every one correctly).

The prompt is saved in the run directory, `{kind}_prompt.npz` (its arrays)
and `{kind}_prompt.json` (its key, settings and training losses), and is
reused by a later run in that directory (`--resume`) only when the key
matches: a sha256 over what it was computed from (the model's fingerprint,
every training example's content, the prompt's hyper-parameters, the
format, the token budget). Anything else retrains it.

Dimensions: R training references, S sequences per sample, T tokens, P prompt
length, D model, KV key/value heads, Dh head dim, St steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import logging

from c3po_jax.common import files
from c3po_jax.neighbours import references
from c3po_jax.remix import baselines
from c3po_jax.remix.scoring import make_batch
from models import transformer


@dataclasses.dataclass
class Prompt:
  """A benchmark's trained prompt and what the rows and summary say of it."""

  prompt: dict  # baselines.prompt_init's structure
  finite: bool
  info: dict  # the `{kind}_prompt.json` record


def training_examples(rc, pool: list, refs) -> list:
  """The examples a benchmark's prompt is trained on (`--baseline_references`)."""
  if rc.method.baseline_references == 'correct':
    return list(refs.examples) if refs is not None else []
  return list(pool)


def _settings(rc) -> dict:
  m = rc.method
  return {
    'baseline_prefix_len': m.baseline_prefix_len,
    'baseline_epochs': m.baseline_epochs,
    'baseline_batch_size': m.baseline_batch_size,
    'baseline_lr': m.baseline_lr,
    'baseline_init_text': m.baseline_init_text,
    'baseline_references': m.baseline_references,
    'prefix_layers': m.prefix_layers,
    'critical_layers': m.critical_layers,
    'loss': m.loss,
    'format': rc.data.fmt,
    'max_len': rc.model.max_len,
    'token_position': m.token_position,
    'token_count': m.token_count,
  }


def prompt_key(rc, runner, kind: str, examples: list) -> str:
  """sha256 of everything the prompt is computed from."""
  parts = {
    'kind': kind,
    'model': references.params_fingerprint(runner.params),
    'data': references.examples_fingerprint(examples),
    'num_choices': runner.num_choices,
    'settings': _settings(rc),
    'version': 1,
  }
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _paths(output_dir: str, kind: str) -> tuple[str, str]:
  base = os.path.join(output_dir, f'{kind}_prompt')
  return base + '.npz', base + '.json'


def _flatten(kind: str, prompt: dict) -> dict[str, np.ndarray]:
  if kind == 'soft_prompt':
    return {'embeds': np.asarray(prompt['embeds'])}
  out = {}
  for layer, cache in prompt.items():
    out[f'layer{layer}_k'] = np.asarray(cache.k)
    out[f'layer{layer}_v'] = np.asarray(cache.v)
  return out


def _unflatten(kind: str, arrays) -> dict:
  if kind == 'soft_prompt':
    return {'embeds': jax.numpy.asarray(arrays['embeds'])}
  layers = sorted({int(n[len('layer') :].split('_')[0]) for n in arrays.files})
  return {
    i: transformer.LayerCache(
      k=jax.numpy.asarray(arrays[f'layer{i}_k']), v=jax.numpy.asarray(arrays[f'layer{i}_v'])
    )
    for i in layers
  }


def _load(output_dir: str, kind: str, key: str) -> Prompt | None:
  npz, meta = _paths(output_dir, kind)
  if not (os.path.exists(npz) and os.path.exists(meta)):
    return None
  try:
    with open(meta, encoding='utf-8') as f:
      info = json.load(f)
    if info.get('key') != key:
      logging.info('%s: trained for other inputs (key differs); retraining', npz)
      return None
    with np.load(npz) as arrays:
      prompt = _unflatten(kind, arrays)
  except (OSError, ValueError, KeyError) as e:
    logging.warning('%s: unreadable (%s); retraining', npz, e)
    return None
  logging.info('%s: reusing the trained prompt (key %s)', npz, key[:12])
  return Prompt(prompt=prompt, finite=bool(info['finite']), info=info)


def _save(output_dir: str, kind: str, prompt: Prompt) -> None:
  npz, meta = _paths(output_dir, kind)
  tmp = npz + '.tmp.npz'
  np.savez(tmp, **_flatten(kind, prompt.prompt))
  os.replace(tmp, npz)
  files.write_json(meta, prompt.info)


def trained_prompt(rc, runner, kind: str, examples: list) -> Prompt:
  """The benchmark's prompt for `kind`: from its run directory, or trained now (and saved).

  rc: the benchmark's own run config (a suite's runner is shared by its
  benchmarks and keeps the first one's output directory).
  """
  out_dir = rc.execution.output_dir
  if not examples:
    raise ValueError(
      f'{kind}: no references to train the prompt on (--baseline_references='
      f'{rc.method.baseline_references})'
    )
  key = prompt_key(rc, runner, kind, examples)
  found = _load(out_dir, kind, key)
  if found is not None:
    return found
  m = rc.method
  data = make_batch(
    runner.encode(examples),
    num_choices=runner.num_choices,
    max_len=rc.model.max_len,
    position=m.token_position,
    count=m.token_count,
  )
  order = baselines.minibatch_order(len(examples), m.baseline_batch_size, m.baseline_epochs)
  ids = baselines.init_ids(runner.tokenizer, m.baseline_init_text, m.baseline_prefix_len)
  logging.info(
    '%s: training one prompt on %d references (%d steps of %d)',
    kind,
    len(examples),
    order.shape[0],
    order.shape[1],
  )
  t0 = time.perf_counter()
  out = jax.device_get(runner.engine.train_prompt(kind, runner.params, data, order, ids))
  seconds = time.perf_counter() - t0
  losses = np.asarray(out.losses, np.float64)
  finite = bool(out.finite)
  if not finite:
    logging.warning('%s: training was not finite; its test samples keep the base answers', kind)
  info = {
    'kind': kind,
    'key': key,
    'finite': finite,
    'num_references': len(examples),
    'steps': int(order.shape[0]),
    'seconds': round(seconds, 2),
    'settings': _settings(rc),
    'losses': np.round(losses, 5).tolist(),
  }
  prompt = Prompt(prompt=out.prompt, finite=finite, info=info)
  if jax.process_index() == 0:
    _save(out_dir, kind, prompt)
  return prompt
