"""The benchmarks we know: hub names, adapters, test and reference splits.

`test_split` is the split accuracy is reported on (as in the C3PO paper: MMLU
and ARC test, the validation sets of the others, whose test labels are
hidden). `labelled_splits` are all splits with gold answers on the hub;
`reference_splits` are those disjoint from `test_split`, safe as references
or few-shot demonstrations for the same benchmark (any labelled split may
serve as references for a *different* benchmark, e.g. OpenBookQA's for ARC).

MMLU is one benchmark with 57 subjects: 'mmlu' is all of them (alphabetical),
'mmlu_<subject>' one.
"""

from __future__ import annotations

import dataclasses

from c3po_jax.tasks import adapters
from c3po_jax.tasks.adapters import Adapter


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
  """How to find and read one benchmark."""

  name: str
  adapter: Adapter
  hub_path: str
  hub_config: str | None
  test_split: str
  labelled_splits: tuple[str, ...]

  @property
  def reference_splits(self) -> tuple[str, ...]:
    return tuple(s for s in self.labelled_splits if s != self.test_split)


MMLU_SUBJECTS = (
  'abstract_algebra',
  'anatomy',
  'astronomy',
  'business_ethics',
  'clinical_knowledge',
  'college_biology',
  'college_chemistry',
  'college_computer_science',
  'college_mathematics',
  'college_medicine',
  'college_physics',
  'computer_security',
  'conceptual_physics',
  'econometrics',
  'electrical_engineering',
  'elementary_mathematics',
  'formal_logic',
  'global_facts',
  'high_school_biology',
  'high_school_chemistry',
  'high_school_computer_science',
  'high_school_european_history',
  'high_school_geography',
  'high_school_government_and_politics',
  'high_school_macroeconomics',
  'high_school_mathematics',
  'high_school_microeconomics',
  'high_school_physics',
  'high_school_psychology',
  'high_school_statistics',
  'high_school_us_history',
  'high_school_world_history',
  'human_aging',
  'human_sexuality',
  'international_law',
  'jurisprudence',
  'logical_fallacies',
  'machine_learning',
  'management',
  'marketing',
  'medical_genetics',
  'miscellaneous',
  'moral_disputes',
  'moral_scenarios',
  'nutrition',
  'philosophy',
  'prehistory',
  'professional_accounting',
  'professional_law',
  'professional_medicine',
  'professional_psychology',
  'public_relations',
  'security_studies',
  'sociology',
  'us_foreign_policy',
  'virology',
  'world_religions',
)

_TVT = ('train', 'validation', 'test')
_TV = ('train', 'validation')

BENCHMARKS: dict[str, BenchmarkSpec] = {
  s.name: s
  for s in [
    BenchmarkSpec('arc_challenge', adapters.arc, 'allenai/ai2_arc', 'ARC-Challenge', 'test', _TVT),
    BenchmarkSpec('arc_easy', adapters.arc, 'allenai/ai2_arc', 'ARC-Easy', 'test', _TVT),
    BenchmarkSpec('openbookqa', adapters.openbookqa, 'allenai/openbookqa', 'main', 'test', _TVT),
    BenchmarkSpec('sciq', adapters.sciq, 'allenai/sciq', None, 'test', _TVT),
    BenchmarkSpec('piqa', adapters.piqa, 'baber/piqa', None, 'validation', _TV),
    BenchmarkSpec('hellaswag', adapters.hellaswag, 'Rowan/hellaswag', None, 'validation', _TV),
    BenchmarkSpec(
      'winogrande', adapters.winogrande, 'allenai/winogrande', 'winogrande_xl', 'validation', _TV
    ),
    BenchmarkSpec('mmlu', adapters.mmlu, 'cais/mmlu', 'all', 'test', ('dev', 'validation', 'test')),
    BenchmarkSpec(
      'commonsense_qa', adapters.commonsense_qa, 'tau/commonsense_qa', None, 'validation', _TV
    ),
    BenchmarkSpec(
      'social_iqa', adapters.social_iqa, 'allenai/social_i_qa', None, 'validation', _TV
    ),
    # SuperGLUE members shipped offline (their test labels are hidden).
    BenchmarkSpec('boolq', adapters.boolq, 'google/boolq', None, 'validation', _TV),
    BenchmarkSpec('copa', adapters.copa, 'aps/super_glue', 'copa', 'validation', _TV),
  ]
}


def benchmark_names() -> tuple[str, ...]:
  """Registered benchmark names (MMLU subjects are 'mmlu_<subject>' on top)."""
  return tuple(BENCHMARKS)


def resolve(name: str) -> tuple[BenchmarkSpec, str | None]:
  """(spec, MMLU subject or None) for a benchmark name; ValueError if unknown."""
  if name in BENCHMARKS:
    return BENCHMARKS[name], None
  if name.startswith('mmlu_') and name[len('mmlu_') :] in MMLU_SUBJECTS:
    return BENCHMARKS['mmlu'], name[len('mmlu_') :]
  raise ValueError(
    f'unknown benchmark {name!r}: known are {", ".join(BENCHMARKS)} and mmlu_<subject>; '
    'a generic multiple-choice file is given by its path (.jsonl) or as jsonl:PATH'
  )
