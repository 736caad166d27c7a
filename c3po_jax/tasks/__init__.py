"""Benchmark data: Examples, adapters for each source, prompt formats.

examples = load_examples('arc_challenge', split='test')   # offline copy
examples = load_examples('suite.jsonl')                    # generic MC JSONL
prompt = format_example(examples[0], 'rc', fewshot=demos)
"""

from c3po_jax.common.errors import TaskDataError, TaskSourceError
from c3po_jax.tasks.example import Example
from c3po_jax.tasks.jsonl import read_jsonl, write_jsonl
from c3po_jax.tasks.loading import SOURCES, benchmark_table, load_examples, load_references
from c3po_jax.tasks.prompts import FORMATS, Prompt, format_example
from c3po_jax.tasks.registry import BENCHMARKS, MMLU_SUBJECTS, BenchmarkSpec, benchmark_names
