"""Benchmark data: Examples, adapters for each source, prompt formats.

examples = load_examples('arc_challenge', split='test')   # offline copy
examples = load_examples('suite.jsonl')                    # generic MC JSONL
prompt = format_example(examples[0], 'rc', fewshot=demos)
"""

from benchmarks.tasks.example import Example, TaskDataError, TaskSourceError
from benchmarks.tasks.jsonl import read_jsonl, write_jsonl
from benchmarks.tasks.loading import SOURCES, benchmark_table, load_examples
from benchmarks.tasks.prompts import FORMATS, Prompt, format_example
from benchmarks.tasks.registry import BENCHMARKS, MMLU_SUBJECTS, BenchmarkSpec, benchmark_names
