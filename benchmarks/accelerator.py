r"""Speed on whatever accelerator is present: a random full-size OLMoE in bfloat16.

One random `OlmoeForCausalLM` (transformers, PyTorch) at --config's sizes, its
weights converted to our tree; both on the default JAX device (PyTorch on
CUDA when JAX runs on a GPU, on CPU when JAX does; on a TPU PyTorch is not run).

  forward     tokens/s of ours (per --dispatches) and of transformers, batch 1
              and 8 of 128 random tokens (--batch_sizes, --seq_len); the
              largest |logit| difference against transformers
  ngd         our NGD (`losses.PrefixLoss`, the flagfiles' settings: 10 Adam
              steps, last 5 layers, 20 core experts, k = 3) for Q test
              samples of T tokens, preparing the neighbours included, in
              seconds per sample, and over base (a forward of the Q prompts)
  memory      `compiled.memory_analysis()` of the forward and the NGD step

  python -m benchmarks.accelerator                  # full size (needs ~30 GB of device memory)
  JAX_PLATFORMS=cpu python -m benchmarks.accelerator --config=bench --steps=2  # a CPU smoke run

The last line is JSON. NGD problem flags (--num_samples, --seq_len, --k,
--steps, --critical_layers, --core_experts, --opt_pathway_mode (topk there,
dense in runs), --repeats, --seed) are `benchmarks.ngd_speed`'s. NGD and the
base pass use the backend's own dispatch (`dispatch.resolve('auto')`).

Dimensions: B batch, T tokens, Q test samples, V vocab.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from benchmarks import ngd_speed

_CONFIG = flags.DEFINE_enum('config', 'full', ['full', 'bench', 'tiny'], 'OLMoE preset.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Weights and compute.')
_BATCH_SIZES = flags.DEFINE_list('forward_batches', ['1', '8'], 'Forward batch sizes.')
_DISPATCHES = flags.DEFINE_list(
  'dispatches', ['sorted', 'ragged'], 'Our MoE dispatches to time (NGD runs on the auto one).'
)
_TORCH = flags.DEFINE_bool('torch', True, 'Time transformers on the same device.')
_NGD = flags.DEFINE_bool('ngd', True, 'Time NGD.')

PRESETS = {'full': 'olmoe-1b-7b-0924', 'bench': 'bench', 'tiny': 'tiny'}


def _torch_device(backend: str):
  """Where PyTorch runs: JAX's device kind, or None (a TPU, or no CUDA build)."""
  import torch

  if backend == 'cpu':
    return torch.device('cpu')
  if backend == 'gpu' and torch.cuda.is_available():
    return torch.device('cuda')
  return None


def _models(config, dtype: str, device):
  """(transformers model on `device` or None, our params on the JAX device)."""
  import jax
  import numpy as np
  import torch
  from transformers import OlmoeConfig, OlmoeForCausalLM

  from models import families
  from models.hf_mapping import ParamAssembler

  hf = {k: v for k, v in families.to_hf_config(config).items() if k != 'architectures'}
  hf.pop('model_type', None)
  torch.manual_seed(ngd_speed._SEED.value)
  tdtype = getattr(torch, dtype)
  with torch.device(device or 'cpu'):
    model = OlmoeForCausalLM._from_config(OlmoeConfig(**hf), dtype=tdtype)
  model = model.eval().requires_grad_(False)
  assembler = ParamAssembler(config, np.dtype(dtype))
  for name, tensor in model.state_dict().items():
    assembler.add(name, tensor.detach().float().cpu().numpy())
  params = jax.device_put(assembler.finish())
  if device is None:
    del model
    return None, params
  return model, params


def _sync_torch(device):
  import torch

  if device is not None and device.type == 'cuda':
    torch.cuda.synchronize()


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  gib = lambda n: round(n / 2**30, 3)
  return {
    'argument_gib': gib(m.argument_size_in_bytes),
    'output_gib': gib(m.output_size_in_bytes),
    'temp_gib': gib(m.temp_size_in_bytes),
  }


def _forward_rows(config, model, device, params, rows_out: dict, memory: dict) -> None:
  """Forward tokens/s of each dispatch and of transformers at each batch size."""
  import jax
  import numpy as np
  import torch

  from models import transformer

  rng = np.random.default_rng(ngd_speed._SEED.value)
  t = ngd_speed._SEQ_LEN.value
  for b in (int(s) for s in _BATCH_SIZES.value):
    tokens = rng.integers(0, config.vocab_size, (b, t), dtype=np.int32)
    tokens_jax = jax.device_put(tokens)
    fns, outs = {}, {}
    for dispatch in _DISPATCHES.value:
      c = config.replace(dispatch=dispatch)
      jitted = jax.jit(lambda p, x, c=c: transformer.forward(p, x, config=c).logits)
      compiled = jitted.lower(params, tokens_jax).compile()
      memory[f'forward_b{b}_{dispatch}'] = _memory(compiled)
      fns[dispatch] = lambda f=compiled, x=tokens_jax: f(params, x)
      outs[dispatch] = np.asarray(jax.device_get(fns[dispatch]()), np.float32)
    if model is not None:
      tokens_torch = torch.from_numpy(tokens.astype(np.int64)).to(device)

      def run_torch(tokens_torch=tokens_torch):
        with torch.inference_mode():
          out = model(tokens_torch, use_cache=False).logits
        _sync_torch(device)
        return out

      fns['torch'] = run_torch
      want = run_torch().float().cpu().numpy()
      for dispatch, got in outs.items():
        rows_out[f'max_abs_logit_diff_b{b}_{dispatch}'] = float(np.max(np.abs(got - want)))
    seconds = ngd_speed._median_seconds(fns, ngd_speed._REPEATS.value)
    for name, s in seconds.items():
      rows_out[f'forward_b{b}_{name}_tok_s'] = round(b * t / s, 1)


def _ngd_rows(config, params, rows_out: dict, memory: dict) -> None:
  """Base inference and cold NGD (prepare + steps) of Q samples, seconds per sample."""
  import jax
  import numpy as np

  from c3po_jax.remix import engine, losses, methods, scoring
  from c3po_jax.remix import pathway as pw_lib
  from models import transformer

  q, k, t = ngd_speed._NUM_SAMPLES.value, ngd_speed._K.value, ngd_speed._SEQ_LEN.value
  rng = np.random.default_rng(ngd_speed._SEED.value)
  tokens, neighbours, weights = ngd_speed._problem(rng, q, k, t, config.vocab_size)
  tokens = jax.device_put(tokens)
  flat = scoring.make_batch(neighbours, num_choices=ngd_speed.NUM_CHOICES)
  nb = jax.tree.map(lambda x: x.reshape((q, k) + x.shape[1:]), flat)  # [Q, k, ...]
  w = jax.device_put(weights)
  spec = pw_lib.PathwaySpec.make(
    config.num_hidden_layers,
    config.num_experts,
    f'last:{ngd_speed._CRITICAL.value}',
    ngd_speed._CORE.value,
  )

  def forward(params, tokens):
    out = transformer.forward(params, tokens, config=config)
    return out.logits, out.router_probs[:, :, -1]  # [Q, T, V], [L, Q, E]

  fwd, _ = ngd_speed._compile(jax.jit(forward), params, tokens)
  base_probs = jax.numpy.swapaxes(fwd(params, tokens)[1], 0, 1)  # [Q, L, E]
  mc = methods.MethodConfig(ngd_steps=ngd_speed._STEPS.value)
  ec = engine.EngineConfig(spec=spec, method=mc, opt_pathway_mode=ngd_speed._MODE.value)
  eng = engine.Engine(config, ec, loss_backend=losses.BACKENDS['prefix'])
  cs = eng.core_slices(base_probs)
  prep, c1 = ngd_speed._compile(eng.prepare, params, nb)
  data = prep(params, nb)
  opt, c2 = ngd_speed._compile(eng.ngd, params, cs, data, w)
  memory['ngd_prepare'], memory['ngd_step'] = _memory(prep), _memory(opt)
  rows_out['ngd_compile_s'] = round(c1 + c2, 2)
  fns = {
    'base': lambda: fwd(params, tokens),
    'ngd': lambda: opt(params, cs, prep(params, nb), w),
    'ngd_warm': lambda: opt(params, cs, data, w),
  }
  seconds = ngd_speed._median_seconds(fns, ngd_speed._REPEATS.value)
  for name, s in seconds.items():
    rows_out[f'{name}_s_per_sample'] = round(s / q, 5)
  rows_out['ngd_over_base'] = round(seconds['ngd'] / seconds['base'], 3)
  rows_out['ngd_warm_over_base'] = round(seconds['ngd_warm'] / seconds['base'], 3)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from models import dispatch, families

  config = families.PRESETS[PRESETS[_CONFIG.value]]
  backend = jax.default_backend()
  config = config.replace(dispatch=dispatch.resolve('auto'))
  device = _torch_device(backend) if _TORCH.value else None
  start = time.perf_counter()
  model, params = _models(config, _DTYPE.value, device)
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(_DTYPE.value)), params)
  setup_s = time.perf_counter() - start
  rows, memory = {}, {}
  _forward_rows(config, model, device, params, rows, memory)
  if _NGD.value:  # on the backend's own dispatch
    _ngd_rows(config, params, rows, memory)
  result = dict(
    benchmark='accelerator',
    config=_CONFIG.value,
    dtype=_DTYPE.value,
    backend=backend,
    device=str(jax.devices()[0].device_kind),
    auto_dispatch=dispatch.resolve('auto'),
    dispatches=_DISPATCHES.value,
    torch_device=None if device is None else str(device),
    setup_s=round(setup_s, 1),
    **rows,
    memory=memory,
    load_average=[round(x, 2) for x in os.getloadavg()],
  )
  for key, value in result.items():
    if key != 'memory':
      print(f'{key:<36} {value}')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
