"""What a run checks before its model loads: everything that needs no weights.

A mistake in the data, the checkpoint folder, the critical layers or the
output directory fails in seconds, before minutes of loading a 7B model:

* the test and reference data load (a missing file, an unknown benchmark, a
  malformed row name the file and line);
* the checkpoint exists and its `config.json` reads (a hub id is fetched at
  load time, so only its name is checked here);
* `--critical_layers` and `--core_experts` fit the model's layer and expert
  counts from `config.json`;
* the tokenizer encodes the first test prompt (an answer letter that is not
  one token refuses `--format=mc`);
* the output directory is usable: `--output_dir` names a folder that can be
  written, holds no results unless `--resume` or `--overwrite`, and a
  resumed `results.jsonl` reads back (its rows kept, dropped and to do are
  logged).

`inputs(rc)` runs them all and returns the loaded data; the pipeline calls it
inside `errors.usage_errors()`, so each failure is one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from c3po_jax.ckpts import hub
from c3po_jax.ckpts.hf_snapshot import read_config
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.run import output as run_output
from c3po_jax.run import results
from c3po_jax.tasks import Example, encoding, load_examples, load_references
from c3po_jax.tasks.tokenizer import load_tokenizer


class MissingCheckpointError(FileNotFoundError):
  """--checkpoint_dir names no folder (and no hub id)."""


@dataclasses.dataclass(frozen=True)
class Inputs:
  """A run's data, loaded and checked."""

  test: list[Example]
  pool: list[Example]  # the reference candidates of every source
  ref_sources: list[dict]  # per source: its name, split and size


def checkpoint_dir(rc) -> str:
  """The local checkpoint folder of rc (a hub id is downloaded and converted once)."""
  path = hub.checkpoint_path(rc.model.checkpoint_dir, rc.execution.cache_dir, rc.model.dtype)
  if not os.path.isdir(path):
    raise MissingCheckpointError(
      f'--checkpoint_dir: no checkpoint at {path!r}. Convert a Hugging Face OLMoE snapshot '
      f'first: python -m c3po_jax.ckpts.convert --hf_dir=PATH/TO/OLMoE-1B-7B-0924 '
      f'--output_dir={path} (or pass --checkpoint_dir=PATH to a local HF snapshot directory, '
      'converted in memory)'
    )
  return path


def check_model(rc, example: Example | None) -> None:
  """The checkpoint's config and tokenizer against rc's settings (no weights read)."""
  if hub.is_hub_id(rc.model.checkpoint_dir):
    return  # fetched and converted when the model loads
  path = checkpoint_dir(rc)
  config = read_config(path)
  m = rc.method
  try:
    pw_lib.PathwaySpec.for_model(config, m.critical_layers, m.core_experts)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f'--critical_layers={m.critical_layers} --core_experts={m.core_experts}: {e} (the model '
      f'in {path} has {config.num_hidden_layers} layers of {config.num_experts} experts)'
    ) from None
  if example is not None:
    has_tokenizer = os.path.exists(os.path.join(path, 'tokenizer.json'))
    tokenizer = load_tokenizer(path if has_tokenizer else None)
    encoding.encode(tokenizer, example, rc.data.fmt, max_len=rc.model.max_len)


def check_output(rc, test_ids: list[str]) -> None:
  """--output_dir can be written; a resumed results file reads back (its counts logged)."""
  out = rc.execution.output_dir
  if os.path.exists(out) and not os.path.isdir(out):
    raise NotADirectoryError(f'--output_dir={out}: exists and is not a directory')
  probe = out
  while not os.path.exists(probe):  # the nearest folder that exists must be writable
    probe = os.path.dirname(os.path.abspath(probe))
  if not os.path.isdir(probe):
    raise NotADirectoryError(f'--output_dir={out}: {probe} is not a directory')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise PermissionError(f'--output_dir={out}: {probe} is not writable')
  run_output.check_existing(rc)
  path = os.path.join(out, results.RESULTS_FILE)
  if rc.execution.resume and os.path.isfile(path) and os.path.getsize(path) > 0:
    log_resume(path, rc.methods, test_ids)


def log_resume(path: str, methods, test_ids: list[str]) -> tuple[int, int, int]:
  """Logs and returns (rows kept, lines dropped, pairs to do) of resuming results at path.

  Kept: the complete rows (every one stays in the file, also of other methods
  or samples); dropped: a torn last line (a crash mid-write), recomputed; to
  do: the (method, sample) pairs of this run without a row.
  """
  with open(path, 'rb') as f:
    data = f.read()
  torn = int(not data.endswith(b'\n'))
  rows = results.parse_rows(data[: data.rfind(b'\n') + 1], path)
  done = {(r['method'], r['id']) for r in rows}
  todo = sum((m, i) not in done for m in methods for i in test_ids)
  logging.info(
    '--resume: %s keeps %d rows, drops %d torn last line(s); %d of %d (method, sample) pairs to do',
    path,
    len(rows),
    torn,
    todo,
    len(methods) * len(test_ids),
  )
  return len(rows), torn, todo


def inputs(rc) -> Inputs:
  """Loads rc's data and runs every check that needs no weights (module docstring)."""
  d = rc.data
  test = load_examples(d.benchmark, split=d.split, source=d.source, limit=d.max_test_samples)
  if not test:
    raise ValueError(f'no test samples in {d.benchmark!r}')
  pool, ref_sources = [], []
  if d.reference:
    pool, ref_sources = load_references(d.reference, d.reference_split, d.max_reference_samples)
  check_model(rc, test[0])
  check_output(rc, [e.id for e in test])
  return Inputs(test, pool, ref_sources)
