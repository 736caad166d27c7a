"""Built-in benchmark suites, and what a suite entry names.

A suite maps benchmark names to entries {"test": SOURCE, "dev": SOURCE,
"reference": [SOURCE, ...]}. A SOURCE is a registry name with an optional
split ('arc_challenge', 'openbookqa:validation') or a generic multiple-choice
JSONL file (a path ending in .jsonl / .jsonl.gz, or 'jsonl:PATH'; relative to
the suite directory), so one suite may mix both.

`table1` is the paper's Table 1 on OLMoE: its six benchmarks, each with the
reference sources closest to the paper's that ship offline (`PAIRINGS` says
which and why), and the paper's accuracies (`PAPER_TABLE1`) that the run's
table is printed next to. The paper's BIG-Bench, SuperGLUE and KnowRef sets
can replace a pairing through a suite of one's own naming JSONL files.
"""

from __future__ import annotations

import os

from c3po_jax.tasks.loading import is_generic, split_spec

# benchmark -> (the paper's reference sources, ours, why ours).
PAIRINGS = {
  'mmlu': (
    'BIG-Bench + SuperGLUE',
    ('boolq:validation', 'copa:validation'),
    'the two SuperGLUE tasks shipped offline (BIG-Bench is not): BoolQ, knowledge '
    'questions on a passage, and COPA, causal reasoning',
  ),
  'hellaswag': (
    'CommonsenseQA + SocialIQA',
    ('commonsense_qa:validation', 'social_iqa:validation'),
    "the paper's sources; offline only their validation splits",
  ),
  'arc_challenge': (
    'OpenBookQA + SciQ',
    ('openbookqa:validation', 'sciq:validation'),
    "the paper's sources; offline OpenBookQA has validation and test, SciQ validation",
  ),
  'arc_easy': (
    'OpenBookQA + SciQ',
    ('openbookqa:validation', 'sciq:validation'),
    "the paper's sources, as for ARC-Challenge",
  ),
  'piqa': (
    'CommonsenseQA + SocialIQA',
    ('commonsense_qa:validation', 'social_iqa:validation'),
    "the paper's sources; offline only their validation splits",
  ),
  'winogrande': (
    'KnowRef',
    ('social_iqa:validation', 'copa:validation'),
    'no coreference set ships offline: SocialIQA (everyday situations of people, as '
    "WinoGrande's sentences) and COPA (two-choice commonsense, as WinoGrande)",
  ),
}

# The paper's Table 1, OLMoE-1B-7B, zero-shot accuracy % (C3PO_SPEC section 5).
PAPER_TABLE1 = {
  'model': 'OLMoE-1B-7B',
  'benchmarks': ('mmlu', 'hellaswag', 'arc_challenge', 'arc_easy', 'piqa', 'winogrande'),
  'accuracy': {
    'base': (57.8, 77.9, 51.3, 79.8, 80.7, 72.2, 69.9),
    'icl': (60.3, 80.6, 58.1, 82.5, 83.6, 76.8, 73.7),
    'prefix_tuning': (59.3, 78.2, 54.5, 80.4, 82.1, 73.5, 71.3),
    'soft_prompt': (59.7, 79.5, 55.9, 81.3, 82.4, 74.1, 72.2),
    'mode_finding': (58.9, 79.1, 57.8, 81.8, 82.4, 74.3, 72.4),
    'kernel_regression': (63.1, 82.0, 64.6, 84.7, 86.6, 80.2, 76.9),
    'ngd': (65.5, 85.3, 66.3, 87.4, 88.0, 82.7, 79.2),
    'oracle': (72.2, 91.5, 74.8, 91.4, 93.6, 87.7, 85.2),
  },  # the six benchmarks in the order above, then the paper's average
}

BUILTIN = {
  'table1': {
    'description': "The C3PO paper's Table 1 (OLMoE): six benchmarks, offline reference sources",
    'benchmarks': {
      name: {'test': name, 'reference': list(refs)} for name, (_, refs, _) in PAIRINGS.items()
    },
    'paper': PAPER_TABLE1,
  },
}


def builtin(suite: str) -> dict | None:
  """The manifest of a built-in suite name (not shadowed by a directory), or None."""
  return None if os.path.isdir(suite) else BUILTIN.get(suite)


def base_dir(suite: str) -> str | None:
  """Where a suite's files are: its directory, None for a built-in suite."""
  return None if builtin(suite) is not None else suite


def is_file(source: str) -> bool:
  """A suite SOURCE that is a file (relative to the suite directory), not a registry name."""
  return is_generic(source)


def resolve_entry(suite_dir: str | None, entry: dict, split: str) -> tuple[str, str | None, tuple]:
  """(test benchmark, its split or None, reference sources) of a suite entry's split.

  Files become paths under suite_dir; registry sources keep their 'NAME:SPLIT'.
  """
  if split not in entry:
    raise ValueError(f'no {split!r} split')

  def place(source: str) -> str:
    if not is_file(source) or suite_dir is None:
      return source
    if source.startswith('jsonl:'):
      return 'jsonl:' + os.path.join(suite_dir, source[len('jsonl:') :])
    return os.path.join(suite_dir, source)

  test = place(entry[split])
  name, test_split = (test, None) if is_file(entry[split]) else split_spec(test)
  return name, test_split, tuple(place(r) for r in entry.get('reference', ()))
