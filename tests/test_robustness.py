"""The robustness table over several demo runs: per-run rows and the pooled paired test."""

import json

import pytest

from c3po_jax.demo import robustness
from c3po_jax.run.stats import mcnemar_p


def _write_run(root, answers):
  """answers: {family: {method: [correct, ...]}} -> a main run's folder layout."""
  for family, per_method in answers.items():
    (root / family).mkdir(parents=True)
    with open(root / family / 'results.jsonl', 'w') as f:
      for method, oks in per_method.items():
        for i, ok in enumerate(oks):
          f.write(json.dumps({'method': method, 'id': f'{family}-{i}', 'correct': ok}) + '\n')
  return str(root)


def test_rows_and_pooled_mcnemar(tmp_path):
  a = _write_run(
    tmp_path / 'a',
    {
      'sum': {'base': [0, 0, 1, 1], 'ngd': [1, 1, 1, 0], 'oracle': [1, 1, 1, 1]},
      'min': {'base': [0, 0], 'ngd': [1, 0], 'oracle': [1, 0]},
    },
  )
  b = _write_run(
    tmp_path / 'b',
    {'sum': {'base': [0, 1, 1, 1], 'ngd': [1, 1, 0, 1], 'oracle': [1, 1, 1, 1]}},
  )
  table = robustness.build([f'a:{a}', f'b:{b}'], ['a,b'])
  assert list(table) == ['a', 'b', 'pooled a+b']
  ta, tb, tp = table['a'], table['b'], table['pooled a+b']
  assert ta['n'] == 6 and ta['accuracy']['base'] == pytest.approx(100 * 2 / 6)
  assert ta['ngd_vs_base'] == {'n': 6, 'fixed': 3, 'broken': 1, 'p': mcnemar_p(3, 1)}
  assert tb['ngd_vs_base']['fixed'] == 1 and tb['ngd_vs_base']['broken'] == 1
  # The same (family, id) in two runs are two pairs: 10 questions, counts added.
  assert tp['n'] == 10 and tp['ngd_vs_base']['fixed'] == 4 and tp['ngd_vs_base']['broken'] == 2
  assert tp['ngd_vs_base']['p'] == mcnemar_p(4, 2)
  assert tp['oracle_gap'] == pytest.approx(100 * (9 - 5) / 10)
  text = robustness.markdown(table)
  assert text.count('\n') == 4 and '| pooled a+b | 10 |' in text


def test_bad_specs_say_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match='NAME:OUTPUT_DIR'):
    robustness.build(['nocolon'], [])
  with pytest.raises(FileNotFoundError, match='not a suite run'):
    robustness.build([f'x:{tmp_path}'], [])
  run = _write_run(tmp_path / 'r', {'sum': {'base': [1], 'ngd': [1]}})
  with pytest.raises(ValueError, match='two or more'):
    robustness.build([f'r:{run}'], ['r,missing'])
