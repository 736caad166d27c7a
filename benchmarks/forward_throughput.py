r"""Forward throughput: our jitted OLMoE forward against transformers' PyTorch one.

Both models hold the same random weights (an HF `OlmoeForCausalLM` built from
the `bench` preset, converted with our name table), run on the same CPU cores
with the same thread count, and are timed in the same process: warm-up, then
the median of `--repeats` timed calls per batch size. Before timing, the logits
of both are compared so the table never compares different computations.

  python -m benchmarks.forward_throughput --batch_sizes=1,8 --seq_len=128

Prints a table of tokens/s (from the median time) and the ratio ours/torch
per batch size, then one JSON line with every figure (minimum times too).
On a machine shared with other work, check the load average it reports:
threaded torch slows down far more than XLA when cores are oversubscribed.
`--threads=1 --clock=cpu` gives the steadiest comparison there.

Dimensions: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import os

from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes to time.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per batch size (median).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed calls before timing.')
_DISPATCH = flags.DEFINE_enum(
  'dispatch',
  'auto',
  ['auto', 'dense', 'sorted', 'ragged', 'gather'],
  "MoE dispatch of our forward (auto: the model's own choice for this backend).",
)
_BLOCK_SIZE = flags.DEFINE_integer(
  'block_size', 0, 'Rows per block of --dispatch=sorted (0: its own choice).'
)
_THREADS = flags.DEFINE_integer(
  'threads', 0, 'CPU cores (and threads) for both frameworks; 0: all available.'
)
_TORCH_EXPERTS = flags.DEFINE_string(
  'torch_experts', None, "transformers' experts_implementation (None: its default)."
)
_CLOCK = flags.DEFINE_enum(
  'clock',
  'wall',
  ['wall', 'cpu'],
  'wall: elapsed time. cpu: CPU seconds of this process (all its threads); '
  'steadier on a busy shared machine, comparable across frameworks with --threads=1.',
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the weights and tokens.')
_ATOL = flags.DEFINE_float('atol', 1e-3, 'Largest allowed |logit difference|.')


def _pin_cores(threads: int) -> list[int]:
  """Restricts this process to `threads` cores before either framework starts.

  XLA sizes its CPU thread pools from the affinity mask when it starts, so
  this must run before the first JAX computation; torch gets the same count
  through `torch.set_num_threads`.
  """
  cores = sorted(os.sched_getaffinity(0))
  if threads:
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  return cores


def _torch_model(seed: int, experts_implementation: str | None):
  """A random HF OLMoE with the `bench` preset's architecture (eval, float32)."""
  import torch
  from transformers import OlmoeConfig as HFOlmoeConfig
  from transformers import OlmoeForCausalLM

  from models import families
  from models.families.olmoe import BENCH

  kwargs = {k: v for k, v in families.to_hf_config(BENCH).items() if k not in ('architectures',)}
  kwargs.pop('model_type')
  if experts_implementation:
    kwargs['experts_implementation'] = experts_implementation
  torch.manual_seed(seed)
  model = OlmoeForCausalLM(HFOlmoeConfig(**kwargs)).eval()
  return model


def _convert(model) -> dict:
  """The torch model's weights in our parameter tree, via our name table."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from models import families
  from models.hf_mapping import ParamAssembler

  config = families.from_hf_config(model.config.to_dict())
  assembler = ParamAssembler(config, np.float32)
  for name, tensor in model.state_dict().items():
    assembler.add(name, tensor.detach().float().numpy())
  return jax.tree.map(jnp.asarray, assembler.finish())


def _ours(config, dispatch: str, block_size: int):
  """Our jitted forward, tokens [B, T] -> logits [B, T, V]."""
  import functools
  from unittest import mock

  import jax

  from models import dispatch as moe
  from models import routing, transformer

  if dispatch in ('sorted', 'ragged'):
    config = config.replace(dispatch=dispatch)

  def logits(params, tokens):
    return transformer.forward(params, tokens, config=config).logits

  jitted = jax.jit(logits)
  if dispatch in ('auto', 'ragged') or (dispatch == 'sorted' and not block_size):
    return jitted

  # Benchmark-only: the model picks its dispatch itself; force another one
  # while tracing (jit traces on the first call of each shape).
  forced = {
    'sorted': moe.moe_sorted,
    'gather': moe.moe_gather,
    'dense': lambda x, w, i, p: moe.moe_dense(
      x, routing.combine_weights(w, i, p['gate'].shape[0]), p
    ),
  }[dispatch]
  if block_size:
    if dispatch != 'sorted':
      raise app.UsageError('--block_size applies to --dispatch=sorted only')
    forced = functools.partial(forced, block_size=block_size)
  forced_topk = lambda x, w, i, p, impl: forced(x, w, i, p)

  def call(params, tokens):
    with mock.patch.object(moe, 'moe_topk', forced_topk):
      return jitted(params, tokens)

  return call


def _time(fns, repeats: int, warmup: int, clock: str) -> list[tuple[float, float]]:
  """(median, min) time of each function, calls interleaved.

  Interleaving (a, b, a, b, ...) exposes every function to the same
  background load, which matters on a shared machine.
  """
  import time

  now = time.perf_counter if clock == 'wall' else time.process_time
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      start = now()
      fn()
      out.append(now() - start)
  return [(sorted(t)[len(t) // 2], min(t)) for t in times]


def main(argv):
  del argv
  cores = _pin_cores(_THREADS.value)
  import json

  import jax
  import numpy as np
  import torch

  from models.families.olmoe import BENCH

  torch.set_num_threads(len(cores))
  model = _torch_model(_SEED.value, _TORCH_EXPERTS.value)
  params = _convert(model)
  ours = _ours(BENCH, _DISPATCH.value, _BLOCK_SIZE.value)
  rng = np.random.default_rng(_SEED.value)
  load_before = os.getloadavg()

  rows = []
  for b in (int(s) for s in _BATCH_SIZES.value):
    tokens = rng.integers(0, BENCH.vocab_size, (b, _SEQ_LEN.value), dtype=np.int32)
    tokens_jax = jax.device_put(tokens)
    tokens_torch = torch.from_numpy(tokens.astype(np.int64))

    def run_torch(tokens_torch=tokens_torch):
      with torch.inference_mode():
        return model(tokens_torch, use_cache=False).logits

    def run_ours(tokens_jax=tokens_jax):
      return jax.block_until_ready(ours(params, tokens_jax))

    want = run_torch().numpy()  # [B, T, V]
    diff = float(np.max(np.abs(np.asarray(run_ours()) - want)))
    if not diff <= _ATOL.value:
      raise SystemExit(f'batch {b}: logits differ by {diff:.3g} > --atol={_ATOL.value}')
    if not np.std(want) > 100 * _ATOL.value:  # a degenerate model would agree trivially
      raise SystemExit(f'batch {b}: logits have std {np.std(want):.3g}; nothing to compare')
    (t_ours, min_ours), (t_torch, min_torch) = _time(
      (run_ours, run_torch), _REPEATS.value, _WARMUP.value, _CLOCK.value
    )
    n = b * _SEQ_LEN.value
    rows.append(
      dict(
        batch=b,
        seq_len=_SEQ_LEN.value,
        ours_tok_s=n / t_ours,
        torch_tok_s=n / t_torch,
        ratio=t_torch / t_ours,
        ours_ms=1e3 * t_ours,
        torch_ms=1e3 * t_torch,
        ours_min_ms=1e3 * min_ours,
        torch_min_ms=1e3 * min_torch,
        max_abs_logit_diff=diff,
        logit_std=float(np.std(want)),
      )
    )

  load_after = os.getloadavg()
  print(
    f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
    f'({torch.get_num_threads()} threads), cores {cores}; '
    f'transformers experts={model.config._experts_implementation} '
    f'attention={model.config._attn_implementation}; ours dispatch={_DISPATCH.value}; '
    f'{_CLOCK.value} clock; load average (1 min) {load_before[0]:.2f} before, '
    f'{load_after[0]:.2f} after'
  )
  print(f'{"batch":>5} {"ours tok/s":>11} {"torch tok/s":>12} {"ours/torch":>10} {"|dlogit|":>9}')
  for r in rows:
    print(
      f'{r["batch"]:>5} {r["ours_tok_s"]:>11.0f} {r["torch_tok_s"]:>12.0f} '
      f'{r["ratio"]:>10.2f} {r["max_abs_logit_diff"]:>9.1e}'
    )
  print(
    json.dumps(
      dict(
        benchmark='forward_throughput',
        dispatch=_DISPATCH.value,
        block_size=_BLOCK_SIZE.value,
        clock=_CLOCK.value,
        threads=len(cores),
        torch_threads=torch.get_num_threads(),
        torch_experts=model.config._experts_implementation,
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in load_after],
        rows=rows,
      )
    )
  )


if __name__ == '__main__':
  app.run(main)
