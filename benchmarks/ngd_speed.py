r"""NGD speed: prefix-cached JAX NGD against naive JAX and naive PyTorch NGD.

One run, one random model (the `bench` preset: OLMoE's 16 layers, 64 experts,
top-8, at hidden size 256), one problem: Q test prompts of T tokens, each with
k neighbours of T tokens (mc format, 4 choices), NGD on the top-n core experts
of the last C layers, Adam with a cosine schedule on the logits of q, the
choice cross-entropy loss. Seconds per test sample of:

  base        a jitted forward of the test prompts (full logits), batch of Q
  base_b1     the same, one prompt at a time (batch of 1)
  ngd         our NGD: prefix-cached loss (`losses.PrefixLoss`), Q
              samples in one jitted call, preparing the neighbours included
  ngd_warm    the same with the neighbours' prefix states already prepared
              (references recurring across test samples: the LRU's hits)
  ngd_dense   ngd with the pathway mixed densely while optimizing
  naive_jax   the same engine with `losses.NaiveLoss`: every step re-runs
              every neighbour's full forward and backward
  torch       naive NGD in PyTorch on transformers' `OlmoeForCausalLM` with
              the same weights: the public C3PO code's override (the last
              position's router-probability row replaced by the candidate
              pathway, renormalized, top-k on it) by wrapping the critical
              layers' MoE blocks of this model instance; weights frozen;
              torch.optim.Adam with the same cosine schedule; one sample at a
              time, each step a forward and backward of its k neighbours
              (logits at the last position only, unless --notorch_last_logits)
  soft_prompt, prefix_tuning
              the trained-prompt baselines (`c3po_jax.remix.baselines`: a
              prompt of P = 10 vectors per sample, the same steps on the same
              neighbour loss; full forwards of the neighbours, as naive_jax);
              one timed call each (--nobaselines: skipped)

JAX programs are compiled ahead of time (compile time reported apart), so no
timing includes compilation; PyTorch runs one untimed step first. The torch
trace of the first sample is compared with ours (losses per step, final q).
Both frameworks get the same cores (--threads, default one: see its help).

  python -m benchmarks.ngd_speed

Prints a table and one JSON line (keys base_s, ngd_s, naive_jax_s,
torch_naive_s and their ratios). The load average is printed with it: on a
shared machine, compare figures only from one run.

Dimensions: Q test samples, N = k neighbours, T tokens, C critical layers,
Kc core experts, E experts, V vocab.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from c3po_jax.testing import torch_c3po

_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 8, 'Test samples Q in one batch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per prompt (test and neighbours).')
_K = flags.DEFINE_integer('k', 3, 'Neighbours per test sample.')
_STEPS = flags.DEFINE_integer('steps', 10, 'NGD steps.')
_CRITICAL = flags.DEFINE_integer('critical_layers', 5, 'The last C layers are optimized.')
_PARAM = flags.DEFINE_enum('pathway_param', 'weights', ['weights', 'logits'], 'What NGD optimizes.')
_CORE = flags.DEFINE_integer('core_experts', 20, 'Core experts per critical layer.')
_MODE = flags.DEFINE_enum(
  'opt_pathway_mode', 'topk', ['topk', 'dense'], 'Pathway mode while optimizing (torch: topk).'
)
_ALSO_DENSE = flags.DEFINE_bool('also_dense', True, "Also time our NGD in 'dense' mode.")
_TORCH_SAMPLES = flags.DEFINE_integer('torch_samples', 1, 'Test samples run by PyTorch.')
_REPEATS = flags.DEFINE_integer(
  'repeats', 5, 'Interleaved timed rounds of base and our NGD (median); naive ones run once.'
)
_THREADS = flags.DEFINE_integer(
  'threads',
  1,
  'CPU cores (and threads) for both frameworks; 0: all. On a shared machine, PyTorch with more'
  ' than one OpenMP thread stalls at every op whenever a thread is descheduled (a forward'
  ' measured 70x slower at 2 threads than at 1 under load), so the default is one core each.',
)
_TORCH_LAST_LOGITS = flags.DEFINE_bool(
  'torch_last_logits',
  True,
  'PyTorch computes logits at the last position only (logits_to_keep=1), as our losses do;'
  ' false: at every position, as a plain model(input_ids) call does (about 1.6x slower).',
)
_BASELINES = flags.DEFINE_bool(
  'baselines', True, 'Also time the soft-prompt and prefix-tuning baselines.'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of weights and tokens.')
_END_TO_END = flags.DEFINE_bool(
  'end_to_end',
  False,
  'Time the run pipeline instead (benchmarks/ngd_end_to_end.py): base, mode finding, kernel'
  ' regression and NGD per test sample over --num_samples test samples sharing --references.',
)
_REFERENCES = flags.DEFINE_integer('references', 64, 'End to end: R references in the set.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'End to end: test samples per jitted batch.')

NUM_CHOICES = 4


def _pin_cores(threads: int) -> list[int]:
  """Restricts this process to `threads` cores before either framework starts."""
  cores = sorted(os.sched_getaffinity(0))
  if threads:
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=true'
    f' intra_op_parallelism_threads={len(cores)}'
  ).strip()
  return cores


def _models(seed: int):
  """A random HF OLMoE (`bench` preset, float32, frozen) and its weights as our tree."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from transformers import OlmoeConfig as HFOlmoeConfig
  from transformers import OlmoeForCausalLM

  from models import families
  from models.families.olmoe import BENCH
  from models.hf_mapping import ParamAssembler

  kwargs = {
    k: v
    for k, v in families.to_hf_config(BENCH).items()
    if k not in ('architectures', 'model_type')
  }
  torch.manual_seed(seed)
  model = OlmoeForCausalLM(HFOlmoeConfig(**kwargs)).eval().requires_grad_(False)
  assembler = ParamAssembler(BENCH, np.float32)
  for name, tensor in model.state_dict().items():
    assembler.add(name, tensor.detach().float().numpy())
  return model, jax.tree.map(jnp.asarray, assembler.finish())


def _problem(rng, q: int, k: int, t: int, vocab: int):
  """Test tokens [Q, T], neighbour prompts (Q*k, mc), kernel weights [Q, k]."""
  import numpy as np

  from c3po_jax.tasks.encoding import EncodedPrompt

  letters = tuple((int(x),) for x in rng.choice(vocab, NUM_CHOICES, replace=False))
  tokens = rng.integers(0, vocab, (q, t), dtype=np.int32)
  neighbours = [
    EncodedPrompt(
      context=tuple(int(x) for x in rng.integers(0, vocab, t)),
      continuations=letters,
      gold=int(rng.integers(NUM_CHOICES)),
      cont_chars=(1,) * NUM_CHOICES,
      fmt='mc',
    )
    for _ in range(q * k)
  ]
  w = rng.uniform(0.2, 1.0, (q, k)).astype(np.float32)
  return tokens, neighbours, w / w.sum(axis=1, keepdims=True)


def _compile(jitted, *args):
  """Ahead-of-time compilation: (compiled, seconds)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _median_seconds(fns: dict, rounds: int) -> dict:
  """Median wall time of each function, calls interleaved round by round.

  Interleaving exposes every function to the same background load, which
  matters on a shared machine.
  """
  import jax

  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _torch_project(v, mass):
  """Euclidean projection of v [C, K] onto {w >= 0, sum w = mass [C, 1]} (sort-based)."""
  import torch

  u = torch.sort(v, dim=-1, descending=True).values
  css = torch.cumsum(u, dim=-1) - mass
  idx = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
  rho = (u - css / idx > 0).sum(dim=-1, keepdim=True)
  tau = torch.gather(css, 1, rho - 1) / rho
  return torch.clamp(v - tau, min=0.0)


def _torch_ngd(
  torch, model, state, layers, tokens, letters, gold, w, base, core, steps, lr, lr_end, keep, param
):
  """Naive NGD of one test sample: (core weights [C, Kc], losses [steps + 1]).

  tokens [k, T] of its neighbours; base [C, E] and core [C, Kc] its routing;
  keep: logits_to_keep (1: the last position only; 0: all); param: 'weights'
  (projected onto the simplex of the core mass after each step) or 'logits'.
  """
  import math

  mass = torch.gather(base, 1, core).sum(dim=1, keepdim=True)  # [C, 1]
  if param == 'weights':
    theta = torch.gather(base, 1, core).clone().requires_grad_(True)
    to_w = lambda t: t
  else:
    theta = torch.log(torch.gather(base, 1, core) / mass).clone().requires_grad_(True)
    to_w = lambda t: torch.softmax(t, dim=-1) * mass
  opt = torch.optim.Adam([theta], lr=lr)

  def loss_fn():
    full = base.scatter(1, core, to_w(theta))  # [C, E]
    for i, layer in enumerate(layers):
      state[layer] = full[i].expand(tokens.shape[0], -1)
    logits = model(input_ids=tokens, logits_to_keep=keep, use_cache=False).logits[:, -1]  # [k, V]
    scores = torch.log_softmax(logits.float(), dim=-1)[:, letters]  # [k, choices]
    per = torch.logsumexp(scores, dim=-1) - scores[torch.arange(len(gold)), gold]
    return (w * per).sum() / w.sum()

  losses = []
  for step in range(steps):
    cos = 0.5 * (1 + math.cos(math.pi * step / steps))
    opt.param_groups[0]['lr'] = lr * ((1 - lr_end / lr) * cos + lr_end / lr)
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.step()
    if param == 'weights':
      with torch.no_grad():
        theta.copy_(_torch_project(theta, mass))
    losses.append(loss.item())
  with torch.no_grad():
    losses.append(loss_fn().item())
  return to_w(theta).detach(), losses


def _time_baselines(params, tokens, nb, w, spec, rows: dict, compile_s: dict) -> None:
  """(e) Soft prompt and prefix tuning on the same problem: one timed call of each."""
  import jax
  import numpy as np

  from c3po_jax.remix import baselines, engine, scoring
  from c3po_jax.tasks.encoding import EncodedPrompt
  from models.families.olmoe import BENCH

  letters = tuple((10 + c,) for c in range(NUM_CHOICES))
  prompts = [
    EncodedPrompt(tuple(int(x) for x in row), letters, 0, (1,) * NUM_CHOICES, 'mc')
    for row in np.asarray(tokens)
  ]
  tests = scoring.make_batch(prompts, num_choices=NUM_CHOICES)
  bc = baselines.BaselineConfig(baseline_steps=_STEPS.value)
  eng = engine.Engine(BENCH, engine.EngineConfig(spec=spec, baseline=bc))
  ids = np.arange(100, 100 + bc.baseline_prefix_len, dtype=np.int32)
  for kind in baselines.KINDS:
    fn, compile_s[kind] = _compile(getattr(eng, kind), params, tests, nb, w, ids)
    start = time.perf_counter()
    jax.block_until_ready(fn(params, tests, nb, w, ids))
    rows[kind] = (time.perf_counter() - start) / len(prompts)


def _end_to_end(torch, model, params):
  """`benchmarks.ngd_end_to_end` with naive PyTorch NGD on this model as an anchor."""
  import numpy as np

  from benchmarks import ngd_end_to_end
  from c3po_jax.remix import methods
  from models.families.olmoe import BENCH

  layers = list(range(BENCH.num_hidden_layers - _CRITICAL.value, BENCH.num_hidden_layers))
  state, blocks = {}, model.model.layers
  for layer in layers:
    blocks[layer].mlp = torch_c3po.c3po_moe(torch, blocks[layer].mlp, state, layer)
  mc = methods.MethodConfig()
  as_long = lambda a: torch.from_numpy(np.asarray(a).astype(np.int64))

  def torch_ngd(tokens, letters, gold, w, base, core, *, steps):
    return _torch_ngd(
      torch,
      model,
      state,
      layers,
      as_long(tokens),
      [int(x) for x in letters],
      as_long(gold),
      torch.from_numpy(w),
      torch.from_numpy(base),
      as_long(core),
      steps,
      mc.lr,
      mc.lr_end,
      1,
      'weights',
    )

  ngd_end_to_end.run(
    params=params,
    torch_ngd=torch_ngd,
    q=_NUM_SAMPLES.value,
    r=_REFERENCES.value,
    k=_K.value,
    t=_SEQ_LEN.value,
    steps=_STEPS.value,
    rounds=_REPEATS.value,
    seed=_SEED.value,
    opt_pathway_mode=_MODE.value,
    batch_size=_BATCH.value,
  )


def main(argv):
  del argv
  cores = _pin_cores(_THREADS.value)
  import json

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from c3po_jax.remix import engine, losses, methods, scoring
  from c3po_jax.remix import pathway as pw_lib
  from models import transformer
  from models.families.olmoe import BENCH

  torch.set_num_threads(len(cores))
  q, k, t = _NUM_SAMPLES.value, _K.value, _SEQ_LEN.value
  model, params = _models(_SEED.value)
  if _END_TO_END.value:
    return _end_to_end(torch, model, params)
  rng = np.random.default_rng(_SEED.value)
  tokens, neighbours, weights = _problem(rng, q, k, t, BENCH.vocab_size)
  tokens = jnp.asarray(tokens)
  flat = scoring.make_batch(neighbours, num_choices=NUM_CHOICES)
  nb = jax.tree.map(lambda x: x.reshape((q, k) + x.shape[1:]), flat)  # [Q, k, ...]
  w = jnp.asarray(weights)
  spec = pw_lib.PathwaySpec.make(
    BENCH.num_hidden_layers, BENCH.num_experts, f'last:{_CRITICAL.value}', _CORE.value
  )
  mc = methods.MethodConfig(ngd_steps=_STEPS.value, pathway_param=_PARAM.value)
  compile_s, rows = {}, {}

  # (a) base inference.
  def forward(params, tokens):
    out = transformer.forward(params, tokens, config=BENCH)
    return out.logits, out.router_probs[:, :, -1]  # [Q, T, V], [L, Q, E]

  fwd, compile_s['base'] = _compile(jax.jit(forward), params, tokens)
  fwd1, compile_s['base_b1'] = _compile(jax.jit(forward), params, tokens[:1])
  base_probs = jnp.swapaxes(fwd(params, tokens)[1], 0, 1)  # [Q, L, E]

  def ngd_runner(name, backend, mode):
    ec = engine.EngineConfig(spec=spec, method=mc, loss='choice_ce', opt_pathway_mode=mode)
    eng = engine.Engine(BENCH, ec, loss_backend=backend)
    cs = eng.core_slices(base_probs)
    prep, c1 = _compile(eng.prepare, params, nb)
    data = prep(params, nb)
    opt, c2 = _compile(eng.ngd, params, cs, data, w)
    compile_s[name] = c1 + c2
    return lambda: opt(params, cs, prep(params, nb), w), lambda: opt(params, cs, data, w), cs

  # (b) ours: prepare + NGD of the whole batch; warm: NGD on prepared states.
  run_ngd, run_warm, cs = ngd_runner('ngd', losses.BACKENDS['prefix'], _MODE.value)
  fns = {
    'base': lambda: fwd(params, tokens),
    'base_b1': lambda: [fwd1(params, tokens[i : i + 1]) for i in range(q)],
    'ngd': run_ngd,
    'ngd_warm': run_warm,
  }
  if _ALSO_DENSE.value and _MODE.value != 'dense':
    fns['ngd_dense'] = ngd_runner('ngd_dense', losses.BACKENDS['prefix'], 'dense')[0]
  rows.update({k: t / q for k, t in _median_seconds(fns, _REPEATS.value).items()})
  trace = run_ngd().trace
  # (c) naive JAX, the same batch (one timed call: it is the slow one).
  run_naive, _, _ = ngd_runner('naive_jax', losses.NaiveLoss, _MODE.value)
  start = time.perf_counter()
  naive_trace = jax.block_until_ready(run_naive()).trace
  rows['naive_jax'] = (time.perf_counter() - start) / q
  if _BASELINES.value:
    _time_baselines(params, tokens, nb, w, spec, rows, compile_s)

  # (d) naive PyTorch, one sample at a time.
  state = {}
  layers = model.model.layers
  for layer in spec.layers:
    layers[layer].mlp = torch_c3po.c3po_moe(torch, layers[layer].mlp, state, layer)
  letters = [c[0] for c in neighbours[0].continuations]
  nb_tokens = torch.from_numpy(np.asarray(flat.tokens[:, 0]).astype(np.int64)).reshape(q, k, t)
  gold = torch.from_numpy(np.asarray(flat.gold).astype(np.int64)).reshape(q, k)

  def torch_sample(i, steps):
    return _torch_ngd(
      torch,
      model,
      state,
      spec.layers,
      nb_tokens[i],
      letters,
      gold[i],
      torch.from_numpy(weights[i]),
      torch.from_numpy(np.array(cs.base[i])),
      torch.from_numpy(np.asarray(cs.core[i]).astype(np.int64)),
      steps,
      mc.lr,
      mc.lr_end,
      1 if _TORCH_LAST_LOGITS.value else 0,
      mc.pathway_param,
    )

  torch_sample(0, 1)  # warm-up
  n_torch = min(_TORCH_SAMPLES.value, q)
  start = time.perf_counter()
  torch_out = [torch_sample(i, _STEPS.value) for i in range(n_torch)]
  rows['torch_naive'] = (time.perf_counter() - start) / n_torch

  # Same computation? Sample 0's trace in the three implementations.
  tq, tl = torch_out[0]
  check = {
    'naive_jax_vs_ngd_max_dloss': float(np.max(np.abs(naive_trace.losses - trace.losses))),
    'naive_jax_vs_ngd_max_dw': float(np.max(np.abs(naive_trace.w - trace.w))),
    'torch_vs_ngd_max_dloss': float(np.max(np.abs(np.asarray(tl) - np.asarray(trace.losses[0])))),
    'torch_vs_ngd_max_dw': float(np.max(np.abs(tq.numpy() - np.asarray(trace.w[0])))),
  }

  load = os.getloadavg()
  result = {f'{name}_s': round(s, 5) for name, s in rows.items()}
  result = {
    **result,
    'ngd_over_base': round(rows['ngd'] / rows['base'], 3),
    'ngd_warm_over_base': round(rows['ngd_warm'] / rows['base'], 3),
    'torch_naive_over_ngd': round(rows['torch_naive'] / rows['ngd'], 1),
    'torch_naive_over_ngd_warm': round(rows['torch_naive'] / rows['ngd_warm'], 1),
    'naive_jax_over_ngd': round(rows['naive_jax'] / rows['ngd'], 1),
    **{
      f'{kind}_over_base': round(rows[kind] / rows['base'], 2)
      for kind in ('soft_prompt', 'prefix_tuning')
      if kind in rows
    },
    'compile_s': {name: round(s, 2) for name, s in compile_s.items()},
    'check': {name: float(f'{x:.3g}') for name, x in check.items()},
    'setup': dict(
      num_samples=q,
      seq_len=t,
      k=k,
      steps=_STEPS.value,
      critical_layers=list(spec.layers),
      core_experts=spec.num_core,
      opt_pathway_mode=_MODE.value,
      loss='choice_ce',
      torch_samples=n_torch,
      torch_last_logits=_TORCH_LAST_LOGITS.value,
      threads=len(cores),
      torch_threads=torch.get_num_threads(),
      torch_experts=model.config._experts_implementation,
      jax=jax.__version__,
      torch=torch.__version__,
    ),
    'load_average': [round(x, 2) for x in load],
  }
  print(
    f'NGD speed on {len(cores)} CPU cores (load average {load[0]:.2f} {load[1]:.2f} '
    f'{load[2]:.2f}): Q={q} samples, T={t}, k={k}, {_STEPS.value} steps, layers '
    f'{spec.layers}, {spec.num_core} core experts, {_MODE.value} mode'
  )
  print(f'{"":<12} {"s / sample":>11} {"x base":>8} {"compile s":>10}')
  for name, s in rows.items():
    c = compile_s.get(name)
    c = f'{c:>10.1f}' if c is not None else f'{"-":>10}'
    print(f'{name:<12} {s:>11.4f} {s / rows["base"]:>8.2f} {c}')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
