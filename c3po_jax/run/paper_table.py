"""A suite's accuracies next to the paper's Table 1, with the difference.

`paper` is a suite's {"model", "benchmarks": (names...), "accuracy": {method:
(one % per benchmark..., the paper's average)}} (see `tasks.suites.PAPER_TABLE1`).
"""

from __future__ import annotations


def _pct(summary: dict, method: str) -> float | None:
  acc = summary.get(method, {}).get('accuracy')
  return None if acc is None else 100 * acc


def compare(per_benchmark: dict, paper: dict) -> dict:
  """Per method the paper reports: ours and the paper's accuracy (%) per
  benchmark and on average, and ours minus the paper's (None where we have
  no number)."""
  names = list(paper['benchmarks'])
  out = {}
  for method, values in paper['accuracy'].items():
    *theirs, their_avg = values
    ours = {n: _pct(per_benchmark.get(n, {}), method) for n in names}
    known = [v for v in ours.values() if v is not None]
    ours_avg = sum(known) / len(known) if len(known) == len(names) else None
    out[method] = {
      'ours': ours,
      'paper': dict(zip(names, theirs)),
      'diff': {n: None if ours[n] is None else ours[n] - p for n, p in zip(names, theirs)},
      'ours_avg': ours_avg,
      'paper_avg': their_avg,
      'diff_avg': None if ours_avg is None else ours_avg - their_avg,
    }
  return out


def _cell(value: float | None, width: int, sign: bool = False) -> str:
  if value is None:
    return f' {"-":>{width}}'
  return f' {value:>+{width}.1f}' if sign else f' {value:>{width}.1f}'


def format_table(comparison: dict, paper: dict) -> str:
  """Three lines per method: ours, the paper's, ours minus the paper's."""
  names = list(paper['benchmarks'])
  width = max(7, *(len(n) for n in names))
  head = f'{"method":<18}{"":<6}' + ''.join(f' {n:>{width}}' for n in names) + f' {"avg":>7}'
  lines = [f'Next to the paper (Table 1, {paper["model"]}):', head, '-' * len(head)]
  for method, c in comparison.items():
    if all(v is None for v in c['ours'].values()):
      continue  # not run here
    for label, row, avg, sign in (
      ('ours', c['ours'], c['ours_avg'], False),
      ('paper', c['paper'], c['paper_avg'], False),
      ('diff', c['diff'], c['diff_avg'], True),
    ):
      first = method if label == 'ours' else ''
      cells = ''.join(_cell(row[n], width, sign) for n in names)
      lines.append(f'{first:<18}{label:<6}{cells}{_cell(avg, 7, sign)}')
  lines.append('(accuracy %; diff: ours minus the paper; methods not run are left out)')
  return '\n'.join(lines)
