"""How far NGD can move a pathway at given settings, on simulated routers.

For n random 64-expert router rows (softmax of N(0, scale^2) logits), a loss
with a perfectly consistent gradient towards the expert ranked r-th (by base
probability, inside the top-20 core) is minimized by NGD at the given
settings; the script prints how often that expert ends in the top-8, per
parameterization. The upper bound of what the optimizer can do to a router:
at the paper's settings (Adam, cosine 1e-2 -> 1e-5, 10 steps) the weights
parameterization reaches every rank up to 20, logits hardly pass rank 9.

  python scripts/pathway_reach.py --lr=0.01 --steps=10
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from c3po_jax.remix import methods
from c3po_jax.remix import pathway as pw

_LR = flags.DEFINE_float('lr', 1e-2, 'Initial learning rate (cosine schedule).')
_LR_END = flags.DEFINE_float('lr_end', 1e-5, 'Final learning rate.')
_STEPS = flags.DEFINE_integer('steps', 10, 'NGD steps.')
_N = flags.DEFINE_integer('n', 200, 'Simulated router rows.')
_SCALE = flags.DEFINE_float('scale', 1.5, 'Standard deviation of the router logits.')
_RANKS = flags.DEFINE_list('ranks', ['9', '12', '16', '20'], 'Ranks of the favoured expert.')


def reach(param: str, rank: int) -> float:
  """Fraction of rows whose rank-th expert ends in the top-8 [0, 1]."""
  mc = methods.MethodConfig(
    ngd_steps=_STEPS.value, lr=_LR.value, lr_end=_LR_END.value, pathway_param=param
  )
  spec = pw.PathwaySpec(layers=(0,), num_core=20)
  logits = _SCALE.value * jax.random.normal(jax.random.key(0), (_N.value, 64))

  def one(lg):
    cs = pw.core_slice(jax.nn.softmax(lg)[None], spec)
    target = cs.core[0, rank - 1]
    loss = lambda w, cs, d, wt, a=None: -pw.pathway_rows(w, cs)[0, target]
    trace = methods.ngd(loss, cs, None, jnp.ones(1), pw.base_weights(cs), mc)
    return jnp.any(jax.lax.top_k(pw.pathway_rows(trace.w, cs)[0], 8)[1] == target)

  return float(jnp.mean(jax.jit(jax.vmap(one))(logits)))


def main(argv):
  del argv
  ranks = [int(r) for r in _RANKS.value]
  out = {p: {r: round(reach(p, r), 3) for r in ranks} for p in pw.PATHWAY_PARAMS}
  for p, row in out.items():
    print(f'{p:<8} ' + '  '.join(f'rank {r}: {100 * v:5.1f}%' for r, v in row.items()))
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
