"""The paper's ablation grids as settings: what each study varies, and the paper's number.

A setting is a study, a label and the RunConfig fields it changes; every
field it does not name keeps the run's value (the suite's chosen settings on
the demo, the flags otherwise), so each study varies one thing around the
run's own setting. Settings that end up identical (after normalizing, see
`store.effective`) run once and are shared.

Steps (Table 5). The paper's cosine schedule runs over the planned steps:
its 10-step result is Table 1's NGD, a schedule that decays to the final
rate at step 10. So by default (`schedule='own'`) every step count is its
own run with its own schedule; step s of a longer run is *not* an s-step
run (its rate is still high at step s). `schedule='prefix'` defines an
s-step run as the first s steps of the 50-step schedule instead: then the
whole study is one 50-step trajectory read at steps 3 / 5 / 10 / 20 / 50
(`read_step`), which the equivalence test checks against separate runs under
that definition (`methods.MethodConfig.schedule_steps`).
"""

from __future__ import annotations

import dataclasses

from c3po_jax.ablate import layer_sets, paper
from c3po_jax.run.config import GROUP_OF

STUDIES = (
  'tokens',
  'neighbourhood',
  'steps',
  'kernels',
  'layers',
  'core',
  'coverage',
  'trajectory',
)
SCHEDULES = ('own', 'prefix')
STEPS = (3, 5, 10, 20, 50)


@dataclasses.dataclass(frozen=True)
class Setting:
  study: str
  label: str
  changes: tuple  # ((RunConfig field, value), ...)
  paper: float | None = None  # the paper's OLMoE average accuracy (%), where it reports one
  read_step: int | None = None  # read the accuracy at this step of the run's path
  info: tuple = ()  # ((key, value), ...) shown with the row (e.g. the layer indices)

  @property
  def fields(self) -> dict:
    return dict(self.changes)


def has_token_count() -> bool:
  """Whether the run config has the token-count setting (Table 3's 1 or 3 tokens)."""
  return 'token_count' in GROUP_OF


def tokens() -> list[Setting]:
  out = []
  for (position, count), value in paper.TOKENS.items():
    if count != 1 and not has_token_count():
      continue  # needs the run config's token_count setting
    changes = (('token_position', position),)
    if has_token_count():
      changes += (('token_count', count),)
    out.append(Setting('tokens', f'{position} {count}', changes, value))
  return out


def neighbourhood() -> list[Setting]:
  out = []
  for label, value in paper.NEIGHBOURHOOD.items():
    name, x = label.split('=')
    changes = (('k', int(x)), ('epsilon', None)) if name == 'k' else (('epsilon', float(x)),)
    out.append(Setting('neighbourhood', label, changes, value))
  return out


def steps(schedule: str = 'own') -> list[Setting]:
  if schedule not in SCHEDULES:
    raise ValueError(f'steps schedule {schedule!r}, expected one of {SCHEDULES}')
  if schedule == 'own':
    return [Setting('steps', str(s), (('ngd_steps', s),), paper.STEPS[s]) for s in STEPS]
  last = max(STEPS)
  return [
    Setting('steps', str(s), (('ngd_steps', last),), paper.STEPS[s], read_step=s) for s in STEPS
  ]


def kernels() -> list[Setting]:
  return [Setting('kernels', k, (('kernel', k),), v) for k, v in paper.KERNELS.items()]


def layers(config) -> list[Setting]:
  """Fig. 3's sets; names standing for the same layers share one setting."""
  by_set: dict[tuple, list[str]] = {}
  for name, indices in layer_sets.paper_sets(config.moe_layers).items():
    by_set.setdefault(indices, []).append(name)
  out = []
  for indices, names in by_set.items():
    value = next((paper.LAYERS[n] for n in names if n in paper.LAYERS), None)
    changes = (('critical_layers', layer_sets.spec(indices)),)
    info = (('layers', list(indices)),)
    out.append(Setting('layers', '='.join(names), changes, value, info=info))
  return out


def core_grid(num_experts: int, top_k: int) -> list[int]:
  """Core sizes n from k to E: k x {1, 1.5, 2, 2.5, 3, 4, 6, 8} within [k, E], and E.

  OLMoE (E 64, k 8): 8, 12, 16, 20, 24, 32, 48, 64 (20: the paper's plateau).
  """
  grid = {int(round(top_k * f)) for f in (1, 1.5, 2, 2.5, 3, 4, 6, 8)}
  return sorted({n for n in grid if top_k <= n <= num_experts} | {num_experts})


def core(config) -> list[Setting]:
  return [
    Setting('core', str(n), (('core_experts', n),), paper.CORE.get(n))
    for n in core_grid(config.num_experts, config.num_experts_per_tok)
  ]


def coverage() -> list[Setting]:
  """Fig. 5: every expert optimized (core_experts 0); the statistic is read from the result."""
  return [Setting('coverage', 'all experts', (('core_experts', 0),))]


def trajectory() -> list[Setting]:
  """Fig. 6: the run's own setting, read after every step."""
  return [Setting('trajectory', 'run setting', ())]


def grid(study: str, config, *, schedule: str = 'own', limit: int = 0) -> list[Setting]:
  """The settings of one study (the first `limit` of them; 0: all)."""
  makers = {
    'tokens': tokens,
    'neighbourhood': neighbourhood,
    'steps': lambda: steps(schedule),
    'kernels': kernels,
    'layers': lambda: layers(config),
    'core': lambda: core(config),
    'coverage': coverage,
    'trajectory': trajectory,
  }
  if study not in makers:
    raise ValueError(f'unknown study {study!r}; choose from {", ".join(STUDIES)}')
  out = makers[study]()
  return out[:limit] if limit else out
