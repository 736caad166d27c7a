r"""Full-size readiness without the weights: AOT-compile the forward and the NGD step.

Lowers and compiles, on abstract inputs only (`jax.ShapeDtypeStruct`: no
parameter or activation is allocated), what a run of the flagfiles jits on a
full-size model: the plain forward (logits of B prompts of T tokens), the base
pass of a test batch (`Engine.analyze`), the neighbours' prefix states
(`Engine.prepare`) and the NGD step (`Engine.ngd`: 10 Adam steps of the
prefix-cached loss under `lax.scan`, vmapped over the Q test samples). Prints
each program's `compiled.memory_analysis()` (arguments, outputs, temporaries;
GiB) and the host's peak RSS, and a JSON line last.

  python scripts/aot_memory.py --model=olmoe-1b-7b-0924
  python scripts/aot_memory.py --model=deepseek-moe-16b --layers=4

The figures are the compiling backend's (CPU here: its fusion and buffer
assignment, not a GPU's or TPU's); arguments are exact on every backend.
--layers compiles the full widths with fewer layers (the CI test does).

Dimensions: Q test samples (--batch_size), k neighbours, T tokens, L layers, E experts.
"""

from __future__ import annotations

import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from c3po_jax.remix import engine, methods, scoring
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.tasks.encoding import EncodedPrompt
from models import families, params, transformer

_MODEL = flags.DEFINE_string('model', 'olmoe-1b-7b-0924', 'A preset of models.families.')
_LAYERS = flags.DEFINE_integer('layers', 0, 'Compile this many layers (0: all) at full widths.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Parameter dtype.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Test samples Q per jitted batch (flagfiles: 8).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'Prompt tokens T (a token bucket).')
_K = flags.DEFINE_integer('k', 3, 'Neighbours per test sample (flagfiles: 3).')
_CRITICAL = flags.DEFINE_string('critical_layers', 'last:5', 'Re-mixed layers (flagfiles).')
_CORE = flags.DEFINE_integer('core_experts', 20, 'Core experts (flagfiles: 20).')
_STEPS = flags.DEFINE_integer('ngd_steps', 10, 'NGD steps (flagfiles: 10).')
_DISPATCH = flags.DEFINE_enum('dispatch', 'auto', ['auto', 'sorted', 'ragged'], 'MoE dispatch.')

# compile_programs' keyword arguments, as the flags set them.
_SETTINGS = {
  'batch_size': _BATCH,
  'seq_len': _SEQ_LEN,
  'k': _K,
  'critical_layers': _CRITICAL,
  'core_experts': _CORE,
  'ngd_steps': _STEPS,
}
GIB = 2.0**30
NUM_CHOICES = 4
PROGRAMS = ('forward', 'analyze', 'prepare', 'ngd')


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _mc_batch(n: int, t: int, vocab: int):
  """An mc ChoiceBatch of n prompts of t tokens (small int arrays; made abstract later)."""
  letters = tuple((10 + c,) for c in range(NUM_CHOICES))
  context = tuple(int(x) % vocab for x in range(100, 100 + t))
  prompt = EncodedPrompt(context, letters, 0, (1,) * NUM_CHOICES, 'mc')
  return scoring.make_batch([prompt] * n, num_choices=NUM_CHOICES)


def _stats(compiled, seconds: float) -> dict:
  m = compiled.memory_analysis()
  out = {
    'argument_gib': m.argument_size_in_bytes / GIB,
    'output_gib': m.output_size_in_bytes / GIB,
    'temp_gib': m.temp_size_in_bytes / GIB,
    'alias_gib': m.alias_size_in_bytes / GIB,
    'compile_s': seconds,
  }
  out['total_gib'] = out['argument_gib'] + out['output_gib'] + out['temp_gib'] - out['alias_gib']
  return {k: round(v, 3) for k, v in out.items()}


def compile_programs(
  config,
  *,
  dtype=jnp.bfloat16,
  batch_size: int = 8,
  seq_len: int = 256,
  k: int = 3,
  critical_layers: str = 'last:5',
  core_experts: int = 20,
  ngd_steps: int = 10,
  only: tuple[str, ...] = PROGRAMS,
) -> dict:
  """{program: memory stats} of the `only` programs (of PROGRAMS), compiled AOT."""
  q, t = batch_size, seq_len
  p_abs = params.param_structs(config, dtype)
  spec = pw_lib.PathwaySpec.make(
    config.num_hidden_layers,
    config.num_experts,
    critical_layers,
    core_experts,
    moe_layers=config.moe_layers,
  )
  ec = engine.EngineConfig(spec=spec, method=methods.MethodConfig(ngd_steps=ngd_steps))
  eng = engine.Engine(config, ec)
  tests = _abstract(_mc_batch(q, t, config.vocab_size))
  flat = _mc_batch(q * k, t, config.vocab_size)
  nb = _abstract(jax.tree.map(lambda x: x.reshape((q, k) + x.shape[1:]), flat))  # [Q, k, ...]
  base_probs = jax.ShapeDtypeStruct((q, config.num_hidden_layers, config.num_experts), jnp.float32)
  cs = jax.eval_shape(eng.core_slices, base_probs)
  data = jax.eval_shape(eng.prepare, p_abs, nb)
  kernel = jax.ShapeDtypeStruct((q, k), jnp.float32)

  def logits(p, tokens):
    return transformer.forward(p, tokens, config=config).logits

  programs = {
    'forward': (jax.jit(logits), (p_abs, jax.ShapeDtypeStruct((q, t), jnp.int32))),
    'analyze': (eng.analyze, (p_abs, tests)),
    'prepare': (eng.prepare, (p_abs, nb)),
    'ngd': (eng.ngd, (p_abs, cs, data, kernel)),
  }
  out = {}
  for name in only:
    fn, args = programs[name]
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    out[name] = _stats(compiled, time.perf_counter() - start)
  return out


def main(argv):
  del argv
  config = families.PRESETS[_MODEL.value].replace(dispatch=_DISPATCH.value)
  if _LAYERS.value:
    dense = tuple(i for i in config.dense_layers if i < _LAYERS.value)
    config = config.replace(num_hidden_layers=_LAYERS.value, dense_layers=dense)
  dtype = jnp.dtype(_DTYPE.value)
  leaves = jax.tree.leaves(params.param_structs(config, dtype))
  param_gib = sum(np.prod(s.shape) * dtype.itemsize for s in leaves) / GIB
  settings = {name: flag.value for name, flag in _SETTINGS.items()}
  stats = compile_programs(config, dtype=dtype, **settings)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  result = dict(
    model=_MODEL.value,
    layers=config.num_hidden_layers,
    dtype=_DTYPE.value,
    param_gib=round(param_gib, 3),
    **settings,
    backend=jax.default_backend(),
    dispatch=_DISPATCH.value,
    host_peak_rss_gib=round(peak_rss, 2),
    programs=stats,
  )
  print(', '.join(f'{k}={v}' for k, v in result.items() if k != 'programs'))
  head = ('program', 'args GiB', 'out GiB', 'temp GiB', 'total GiB', 'compile s')
  print(' '.join(f'{h:>10}' for h in head))
  keys = ('argument_gib', 'output_gib', 'temp_gib', 'total_gib', 'compile_s')
  for name, st in stats.items():
    print(f'{name:>10} ' + ' '.join(f'{st[k]:>10.2f}' for k in keys))
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
