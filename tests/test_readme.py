"""The README's Python API examples run as written on the embedded demo.

Each ```python block of the "Python API" section runs in a fresh namespace
from a folder that holds the repository's `checkpoints/` (as the repository
root does), so its relative paths and outputs behave as in the README.
"""

import os
import re

import pytest

from c3po_jax.run import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'checkpoints', 'demo')


def _api_blocks() -> list[str]:
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  section = text[text.index('\n## Python API\n') :]
  section = section[: section.find('\n## ', 1)]
  return re.findall(r'```python\n(.*?)```', section, flags=re.S)


BLOCKS = _api_blocks()


def _needs_a_run(code: str) -> bool:
  return 'run(' in code or 'run_suite(' in code


def test_the_python_api_section_has_its_examples():
  assert len(BLOCKS) >= 3
  assert any('run_suite(' in b for b in BLOCKS) and any('RunConfig.make(' in b for b in BLOCKS)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DEMO), reason='no shipped demo checkpoint')
@pytest.mark.parametrize(
  'index',
  [
    pytest.param(i, marks=[pytest.mark.slow] if _needs_a_run(b) else [])
    for i, b in enumerate(BLOCKS)
  ],
)
def test_readme_python_block_runs_on_the_demo(index, tmp_path, monkeypatch):
  os.symlink(os.path.join(ROOT, 'checkpoints'), tmp_path / 'checkpoints')
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path))  # the default --cache_dir is under ~
  drawn = []  # (figure, output dir, title) of every accuracy / NGD-steps figure
  for figure in ('accuracy', 'ngd_steps'):
    draw = getattr(plots, figure)

    def record(*args, _draw=draw, _figure=figure, **kw):
      drawn.append((_figure, os.path.relpath(args[1]), args[-1]))
      return _draw(*args, **kw)

    monkeypatch.setattr(plots, figure, record)
  namespace = {}
  exec(compile(BLOCKS[index], f'README.md python block {index}', 'exec'), namespace)
  if 'suite' in namespace:
    suite = namespace['suite']
    assert set(suite.pooled) == {'base', 'ngd'} and set(suite.benchmarks) >= {'max'}
    assert suite.config.data.fmt == 'rc' and suite.config.model.checkpoint_dir.endswith('demo')
    assert (tmp_path / 'runs' / 'api_suite' / 'summary.json').exists()
    # Each figure drawn once per benchmark, titled with the suite's name for it
    # (not its test file's path), and once pooled.
    for name in suite.benchmarks:
      mine = [(f, t) for f, d, t in drawn if d == os.path.join('runs', 'api_suite', name)]
      assert sorted(f for f, _ in mine) == ['accuracy', 'ngd_steps'], (name, drawn)
      assert all(t.startswith(f'{name} (') for _, t in mine), mine
    pooled = [t for f, d, t in drawn if d == os.path.join('runs', 'api_suite')]
    assert len(pooled) == 2 and all('benchmarks pooled' in t for t in pooled)
  if 'result' in namespace:
    result = namespace['result']
    assert len(result.predictions('ngd')) == 10
    assert (tmp_path / 'runs' / 'api_max' / 'results.jsonl').exists()
