"""Settings of one method only: `--per_method='kernel_regression:kernel=matern,k=10;icl:k=1'`.

Every method is tuned on dev alike (`c3po_jax.demo.tune`), and each may choose
its own hyper-parameters: kernel regression its kernel and k, ICL its number
of shots (its k), NGD its learning rate. A run applies a method's settings to
that method alone; the other methods keep the run's. Only the settings below
may differ between the methods of one run: they change neither the model's
prefix states nor the reference set, so the methods still share one base pass,
one reference set and one state store (a different k or kernel gives the
method its own neighbours and kernel weights; a different optimizer setting its
own compiled engine).

The text form is canonical (methods and fields sorted), so it is a plain
RunConfig field: it is recorded in summary.json and checked by --resume.
"""

from __future__ import annotations

import dataclasses

# Fields a method may set for itself, by group.
NEIGHBOURHOOD = ('k', 'epsilon', 'max_similarity', 'kernel', 'sigma')
METHOD = (
  'ngd_init',
  'ngd_steps',
  'lr',
  'lr_end',
  'optimizer',
  'opt_pathway_mode',
  'eval_pathway_mode',
  'kr_alpha',
  'mode_alpha',
  'mode_iters',
  'mode_neighbours',
  'baseline_references',
  'baseline_prefix_len',
  'baseline_epochs',
  'baseline_batch_size',
  'baseline_steps',
  'baseline_lr',
  'prefix_layers',
)
TUNABLE = NEIGHBOURHOOD + METHOD


def _convert(field: dataclasses.Field, text: str):
  """text -> the field's type, from its annotation (a `from __future__` string)."""
  kind = str(field.type)
  if text == 'None' and 'None' in kind:
    return None
  for name, cast in (('int', int), ('float', float)):
    if kind.startswith(name):
      return cast(text)
  return text


def parse(spec: str, fields: dict[str, dataclasses.Field], methods) -> dict[str, dict]:
  """'M:F=V,F=V;M:...' -> {method: {field: value}}; raises ValueError naming the flag."""
  out: dict[str, dict] = {}
  for part in filter(None, (p.strip() for p in (spec or '').split(';'))):
    method, sep, assigns = part.partition(':')
    if not sep or method not in methods:
      raise ValueError(
        f'--per_method: {part!r} should be METHOD:FIELD=VALUE,... with METHOD in {tuple(methods)}'
      )
    settings = out.setdefault(method, {})
    for assign in filter(None, (a.strip() for a in assigns.split(','))):
      name, eq, value = assign.partition('=')
      if not eq or name not in TUNABLE:
        raise ValueError(
          f'--per_method: {assign!r} for {method}; a method may set {", ".join(TUNABLE)}'
        )
      try:
        settings[name] = _convert(fields[name], value)
      except ValueError:
        raise ValueError(f'--per_method: {method}:{assign} is not a {fields[name].type}') from None
  return out


def format_spec(settings: dict[str, dict]) -> str:
  """{method: {field: value}} -> the canonical text (sorted; empty settings left out)."""
  parts = []
  for method in sorted(settings):
    if settings[method]:
      assigns = ','.join(f'{k}={settings[method][k]}' for k in sorted(settings[method]))
      parts.append(f'{method}:{assigns}')
  return ';'.join(parts)


def neighbourhood_key(rc) -> tuple:
  """What a method's neighbours and kernel weights depend on (among the tunable fields)."""
  n = rc.neighbourhood
  return tuple(getattr(n, f) for f in NEIGHBOURHOOD)
