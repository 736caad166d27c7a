"""What a run writes reads as printed: rounded numbers, percent as in the table,
one colour per method in every figure, titles that say what they cover, files
with an ordinary mode."""

import json
import math
import os
import stat

import pytest

from c3po_jax.common import files
from c3po_jax.run import plots, results


def _rows(n=7):
  out = []
  for m in ('base', 'prefix_tuning', 'ngd'):
    for i in range(n):
      correct = (i % 3 == 0) if m == 'base' else (i % 2 == 0)
      out.append({'method': m, 'id': str(i), 'correct': correct, 'seconds': 0.1 / 3})
  return out


def _decimals(x: float) -> int:
  text = repr(x)
  return len(text.split('.')[1]) if '.' in text and 'e' not in text else 0


def test_summary_is_rounded_with_the_printed_percent():
  summary = results.summarize(_rows())
  table = results.format_table(summary, 'file.jsonl')
  for method, s in summary.items():
    assert s['accuracy_pct'] == round(100 * s['accuracy'], 1)
    line = next(x for x in table.splitlines() if x.startswith(f'{method} '))
    assert f' {s["accuracy_pct"]:.1f} ' in line
    for key in ('accuracy', 'acc_norm', 'seconds_per_sample', 'mcnemar_p_vs_base'):
      assert _decimals(s[key]) <= 6, (key, s[key])
  assert math.isclose(summary['ngd']['accuracy'], 4 / 7, abs_tol=1e-6)


def test_written_files_get_an_ordinary_mode(tmp_path):
  old = os.umask(0o022)
  try:
    path = tmp_path / 'summary.json'
    files.write_json(str(path), {'a': 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    plain = tmp_path / 'plain'
    plain.write_text('')
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
  finally:
    os.umask(old)
  assert json.loads(path.read_text()) == {'a': 1}


def test_steps_figure_draws_every_method_in_its_colour():
  summary = results.summarize(_rows())
  diag = {
    'ngd': {'step_accuracy': [0.2, 0.4, 0.5], 'step_loss': [1.0, 0.8, 0.7]},
    'prefix_tuning': {'step_loss': [1.1, 0.9, 0.8]},  # losses, no per-step accuracy
  }
  fig = plots.steps_figure(diag, summary, plots.scope(summary, '2 benchmarks pooled'))
  acc_ax, loss_ax = fig.axes[:2]
  drawn = {line.get_label(): line.get_color() for line in acc_ax.get_lines()}
  assert set(drawn) == set(summary)  # every method of the run, not only those with steps
  for ax in (acc_ax, loss_ax):
    for line in ax.get_lines():
      assert line.get_color() == plots.colour(line.get_label())
  assert fig._suptitle.get_text().startswith('2 benchmarks pooled (7 test samples)')


def test_heatmap_titles_name_the_answers(tmp_path):
  pytest.importorskip('matplotlib')
  pathway = {'layers': [2, 3], 'before': [[0.5, 0.5]] * 2, 'after': [[0.9, 0.1]] * 2}
  row = {
    'method': 'ngd',
    'id': 'q1',
    'task': 'max',
    'gold': 2,
    'base_prediction': 0,
    'prediction': 2,
    'correct': True,
    'choices': ['41', '5', '23', '18'],
    'pathway': pathway,
  }
  assert plots._answer(row, 2) == "'23'" and plots._answer(row, 9) == '#9'
  (path,) = plots.routing_heatmaps([row], str(tmp_path), 1)
  assert os.path.getsize(path) > 0


def test_accuracy_plot_title_says_what_it_covers(tmp_path):
  summary = results.summarize(_rows())
  assert plots.scope(summary, 'suite/max_compose_test.jsonl') == 'max_compose_test (7 test samples)'
  assert plots.accuracy(summary, str(tmp_path), 'max') == str(tmp_path / 'accuracy.png')
