"""Per-sample results (JSONL, resumable, one file per process then merged), the summary
and the printed table."""

from __future__ import annotations

import glob
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from c3po_jax.common import files
from c3po_jax.run.stats import chance, mcnemar_p, wilson_interval  # noqa: F401 (re-exported)

RESULTS_FILE = 'results.jsonl'
SUMMARY_FILE = 'summary.json'
METHOD_ORDER = (
  'base',
  'icl',
  'prefix_tuning',
  'soft_prompt',
  'mode_finding',
  'kernel_regression',
  'ngd',
  'oracle',
  'random_pathway',
)


class ResultsExistError(FileExistsError):
  """Results already at the output: a usage error (pass --resume or --overwrite)."""

  exit_code = 2


class ResultsFileError(ValueError):
  """A results file that cannot be read back; names the file and line."""


class ResultsWriter:
  """Appends one JSON line per (method, sample) as each finishes.

  With resume, a torn last line (a crash mid-write) is cut off and the pairs
  already written are reported as done; without resume an existing non-empty
  file is an error (nothing is overwritten).
  """

  def __init__(self, output_dir: str, resume: bool, filename: str = RESULTS_FILE):
    os.makedirs(output_dir, exist_ok=True)
    self.path = os.path.join(output_dir, filename)
    self.done: set[tuple[str, str]] = set()
    self.samples: set[str] = set()  # ids with a row: their question and prompt are written
    if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
      if not resume:
        raise ResultsExistError(
          f'{self.path} already has results: pass --resume to continue that run, '
          '--overwrite to replace it, or choose another --output_dir'
        )
      self._repair()
      for row in read_rows(self.path):
        self.done.add((row['method'], row['id']))
        self.samples.add(row['id'])
    self._file = open(self.path, 'a', encoding='utf-8')

  def _repair(self):
    with open(self.path, 'rb+') as f:
      data = f.read()
      end = data.rfind(b'\n') + 1
      if end != len(data):
        f.truncate(end)

  def write(self, row: dict) -> None:
    key = (row['method'], row['id'])
    if key in self.done:
      return
    self._file.write(json.dumps(row, sort_keys=True) + '\n')
    self._file.flush()
    os.fsync(self._file.fileno())
    self.done.add(key)
    self.samples.add(row['id'])

  def drop_stale(self, current: dict[str, str]) -> int:
    """Drops the rows of samples whose content changed under the same id -> rows dropped.

    current: {id: `encoding.content_hash`} of this run's samples. A row whose
    `sample_hash` differs was computed for another question (ids repeat across
    draws and files): it is removed from the file, so the sample is computed
    again. Rows without a hash (older runs) and of other ids are kept.
    """
    stale = lambda r: (
      r['id'] in current and r.get('sample_hash', current[r['id']]) != current[r['id']]
    )
    if not self.done:  # nothing written yet (a fresh run): nothing to check
      return 0
    rows = read_rows(self.path)
    keep = [r for r in rows if not stale(r)]
    if len(keep) == len(rows):
      return 0
    self._file.close()
    write_rows(self.path, keep)
    self.done = {(r['method'], r['id']) for r in keep}
    self.samples = {r['id'] for r in keep}
    self._file = open(self.path, 'a', encoding='utf-8')
    return len(rows) - len(keep)

  def close(self):
    self._file.close()


def read_rows(path: str) -> list[dict]:
  """The rows of a results file; a bad line raises ResultsFileError naming it."""
  rows = []
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode('utf-8')
        row = json.loads(line) if line.strip() else None
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ResultsFileError(
          f'{path}, line {number}: not a result row ({e}); delete that line (the rows '
          'of other lines are kept) and pass --resume, or --overwrite to start over'
        ) from None
      if row is None:
        continue
      if not isinstance(row, dict) or not {'method', 'id'} <= set(row):
        raise ResultsFileError(
          f'{path}, line {number}: not a result row (no method and id); delete that '
          'line and pass --resume, or --overwrite to start over'
        )
      rows.append(row)
  return rows


OUR_FILES = ('results.jsonl', 'results.process-*.jsonl', SUMMARY_FILE, 'run_config.json')
OUR_FILES += ('routing_*.png', 'accuracy.png', 'ngd_steps.png', '*_prompt.npz', '*_prompt.json')


def remove_results(output_dir: str) -> list[str]:
  """Deletes only the files a run writes in output_dir (for --overwrite)."""
  import glob

  gone = []
  for pattern in OUR_FILES:
    for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))):
      os.remove(path)
      gone.append(path)
  return gone


def summarize(rows: list[dict]) -> dict:
  """Per-method accuracy, acc_norm, changes versus base, fallbacks, timing.

  Timing: rows that carry `compile_seconds` (their batch's jit compilation,
  shared out) have it left out of `seconds`: seconds_per_sample is the mean
  steady-state time and compile_seconds the method's total compilation.
  Older rows include compilation in `seconds`: each method's first batch is
  then left out of seconds_per_sample when the method has other rows, and
  reported as first_batch_seconds_per_sample. A batch's rows share one
  per-sample time, so the first batch is the leading run of rows (in file
  order) whose time equals the first row's. (A resumed run compiles again;
  that batch is not told apart.)
  """
  by_method: dict[str, dict[str, dict]] = defaultdict(dict)
  for r in rows:
    by_method[r['method']][r['id']] = r
  base = by_method.get('base', {})
  out = {}
  for method, per_id in by_method.items():
    n = len(per_id)
    correct = sum(r['correct'] for r in per_id.values())
    norm = sum(r.get('correct_norm', r['correct']) for r in per_id.values())
    paired = [(base[i]['correct'], r['correct']) for i, r in per_id.items() if i in base]
    improved = sum(1 for b, m in paired if m and not b)
    worsened = sum(1 for b, m in paired if b and not m)
    out[method] = {
      'n': n,
      'accuracy': round(correct / n, 6),
      'accuracy_pct': round(100 * correct / n, 1),  # as the printed table shows it
      'accuracy_ci95': [round(x, 4) for x in wilson_interval(correct, n)],
      'acc_norm': round(norm / n, 6),
      'improved_vs_base': improved,
      'worsened_vs_base': worsened,
      'mcnemar_p_vs_base': float(f'{mcnemar_p(improved, worsened):.4g}'),
      'nan_fallbacks': sum(1 for r in per_id.values() if r.get('fallback') == 'nan'),
      'no_neighbour_fallbacks': sum(
        1 for r in per_id.values() if r.get('fallback') == 'no_neighbours'
      ),
      **_timing(list(per_id.values())),
    }
  return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _timing(rows: list[dict]) -> dict:
  """seconds_per_sample without compilation; see summarize."""
  times = [r.get('seconds', 0.0) for r in rows]
  if rows and all('compile_seconds' in r for r in rows):
    return {
      'seconds_per_sample': round(sum(times) / len(times), 5),
      'compile_seconds': round(sum(r['compile_seconds'] for r in rows), 3),
    }
  first = 0
  while first < len(times) and times[first] == times[0]:
    first += 1
  rest = times[first:] or times
  return {
    'seconds_per_sample': round(sum(rest) / len(rest), 5),
    'first_batch_seconds_per_sample': round(times[0], 5),
  }


def _order(method: str) -> int:
  return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def format_table(summary: dict, benchmark: str, chance_acc: float | None = None) -> str:
  """A Table-1-style text table (accuracy in %); chance_acc: a last row for guessing."""
  name = short_name(benchmark)
  w = max(14, len(name))
  head = (
    f'{"method":<18} {name:>{w}} {"95% CI":>13} {"acc_norm":>9} {"vs base":>8} '
    f'{"+":>4} {"-":>4} {"p":>7} {"NaN":>4} {"s/sample":>9}'
  )
  lines = [head, '-' * len(head)]
  base_acc = summary.get('base', {}).get('accuracy')
  for method, s in summary.items():
    delta = '' if base_acc is None else f'{100 * (s["accuracy"] - base_acc):+.1f}'
    lo, hi = s.get('accuracy_ci95', (float('nan'),) * 2)
    ci = f'[{100 * lo:.1f}, {100 * hi:.1f}]'
    lines.append(
      f'{method:<18} {100 * s["accuracy"]:>{w}.1f} {ci:>13} {100 * s["acc_norm"]:>9.1f} {delta:>8} '
      f'{s["improved_vs_base"]:>4} {s["worsened_vs_base"]:>4} '
      f'{s["mcnemar_p_vs_base"]:>7.3f} {s["nan_fallbacks"]:>4} {s["seconds_per_sample"]:>9.3f}'
    )
  if chance_acc is not None:
    lines.append(f'{"chance":<18} {100 * chance_acc:>{w}.1f}')
  n = max((s['n'] for s in summary.values()), default=0)
  lines.append(
    f'({n} test samples; accuracy % with its 95% Wilson interval; +/-: answers fixed/broken '
    'versus base; p: exact McNemar; s/sample: steady state, jit compilation left out)'
  )
  return '\n'.join(lines)


def short_name(benchmark: str) -> str:
  """A column title: the name of a registry benchmark or of a JSONL file."""
  name = os.path.basename(benchmark)
  for ext in ('.jsonl.gz', '.jsonl'):
    name = name.removesuffix(ext)
  return name


def write_summary(output_dir: str, summary: dict, extra: dict) -> str:
  path = os.path.join(output_dir, SUMMARY_FILE)
  files.write_json(path, {'methods': summary, **extra})
  return path


# ---- the multi-process file protocol ----
# Each process appends to its own results file (`results.process-k.jsonl`;
# plain `results.jsonl` when P = 1); at the end every process's rows are
# gathered to process 0 by a collective (no shared filesystem needed), which
# drops duplicates and writes `results.jsonl`.
PROCESS_FILE = 'results.process-{}.jsonl'


def results_filename(index: int | None = None, count: int | None = None) -> str:
  """results.jsonl for a single process, else results.process-{k}.jsonl."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return RESULTS_FILE if count == 1 else PROCESS_FILE.format(index)


def _process_files(output_dir: str) -> dict[int, str]:
  pattern = re.compile(r'results\.process-(\d+)\.jsonl$')
  found = {}
  for path in glob.glob(os.path.join(output_dir, PROCESS_FILE.format('*'))):
    m = pattern.search(path)
    if m:
      found[int(m.group(1))] = path
  return found


def results_writer(
  output_dir: str, resume: bool, index: int | None = None, count: int | None = None
) -> ResultsWriter:
  """This process's ResultsWriter; refuses to mix runs of other process counts."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  stray = sorted(k for k in _process_files(output_dir) if k >= count)
  if resume and stray:
    raise ResultsExistError(
      f'{output_dir} holds results of a run with more than {count} process(es) '
      f'(results.process-{stray[-1]}.jsonl): resume it with the same number of processes'
    )
  merged = os.path.join(output_dir, RESULTS_FILE)
  if count > 1 and not resume and os.path.exists(merged) and os.path.getsize(merged) > 0:
    raise ResultsExistError(
      f'{merged} already has results: pass --resume to continue that run, '
      'or choose another --output_dir'
    )
  return ResultsWriter(output_dir, resume, results_filename(index, count))


def _gather_bytes(data: bytes) -> list[bytes]:
  """Every process's bytes, on every process (two all-gathers)."""
  sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int64))  # [P, 1]
  buf = np.zeros(max(1, int(sizes.max())), np.uint8)
  buf[: len(data)] = np.frombuffer(data, np.uint8)
  every = multihost_utils.process_allgather(buf)  # [P, max bytes]
  return [every[k, : int(sizes[k, 0])].tobytes() for k in range(len(sizes))]


def merge_rows(
  row_lists: Sequence[Sequence[dict]], methods: Sequence[str], ids: Sequence[str]
) -> list[dict]:
  """One row per (method, id), the first seen, in single-process order.

  That order is methods as listed, samples in test-set order; rows of other
  methods or samples (an earlier run's) follow, in the order seen.
  """
  seen: dict[tuple[str, str], dict] = {}
  for rows in row_lists:
    for row in rows:
      seen.setdefault((row['method'], row['id']), row)
  m_rank = {m: i for i, m in enumerate(methods)}
  i_rank = {i: n for n, i in enumerate(ids)}
  order = {key: n for n, key in enumerate(seen)}

  def rank(key):
    return (m_rank.get(key[0], len(m_rank)), i_rank.get(key[1], len(i_rank)), order[key])

  return [seen[key] for key in sorted(seen, key=rank)]


def parse_rows(data: bytes, source: str) -> list[dict]:
  """JSON lines; a torn last line (no newline: a crash mid-write) is dropped.

  A line that is not a result row raises ResultsFileError naming `source`
  and the line, as `read_rows` does for one file.
  """
  rows = []
  for number, raw in enumerate(data[: data.rfind(b'\n') + 1].splitlines(), start=1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode('utf-8'))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      row, why = None, str(e)
    else:
      why = 'no method and id'
    if not isinstance(row, dict) or not {'method', 'id'} <= set(row):
      raise ResultsFileError(
        f'{source}, line {number}: not a result row ({why}); delete that line and pass '
        '--resume, or --overwrite to start over'
      )
    rows.append(row)
  return rows


def write_rows(path: str, rows: Sequence[dict]) -> None:
  """Replaces path atomically with rows, one sorted-key JSON line each."""
  with files.atomic_open(path, sync=True) as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + '\n')


def collect_rows(
  writer_path: str, output_dir: str, methods: Sequence[str], ids: Sequence[str]
) -> list[dict]:
  """Every process's rows; process 0 also writes them to results.jsonl.

  One process: its results.jsonl as written. Several: a collective gathers
  each process's file to all; process 0 merges them after any rows of an
  earlier results.jsonl it holds (so a resume never drops them).
  """
  if jax.process_count() == 1:
    return read_rows(writer_path)
  with open(writer_path, 'rb') as f:
    mine = f.read()
  parts = [
    parse_rows(b, f'results of process {i} ({writer_path} there)')
    for i, b in enumerate(_gather_bytes(mine))
  ]
  merged_path = os.path.join(output_dir, RESULTS_FILE)
  if jax.process_index() == 0 and os.path.exists(merged_path):
    with open(merged_path, 'rb') as f:
      parts.insert(0, parse_rows(f.read(), merged_path))
  rows = merge_rows(parts, methods, ids)
  if jax.process_index() == 0:
    write_rows(merged_path, rows)
    logging.info('merged %d rows of %d processes into %s', len(rows), len(parts), merged_path)
  return rows
