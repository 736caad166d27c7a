"""Checks every MoE family's tests run the same way (tests/test_families*.py).

`reference_logits`: a transformers model's logits at padding-free positions
(as our model numbers them). `full_size_layout`: a published config's HF
tensors (the model built on the meta device) placed into our layout, with
the parameter count. `pipeline_keeps_base`: the whole C3PO pipeline on a tiny
HF snapshot, kernel regression at alpha = 1 giving back the base scores.
`converter`: each family's tiny reference saved, converted and loaded once.
`forward_eval_shape`: a full-size forward traced on abstract inputs.
"""

from __future__ import annotations

import numpy as np


def converter(tmp_path_factory, builders: dict):
  """family -> (torch model, hf dir, hf config dict, ConversionResult, config, params), cached.

  builders: family -> `save_tiny_<family>(out_dir)`; float32 conversion.
  """
  from c3po_jax.ckpts import checkpoint, convert

  cache = {}

  def get(family):
    if family not in cache:
      root = tmp_path_factory.mktemp(family)
      hf_dir = str(root / 'hf')
      model, hf_config = builders[family](hf_dir)
      result = convert.convert(hf_dir, str(root / 'ours'), dtype='float32')
      config, params = checkpoint.load_checkpoint(result.output_dir)
      cache[family] = (model, hf_dir, hf_config, result, config, params)
    return cache[family]

  return get


def reference_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[B, T] tokens and mask -> [B, T, V] float32 logits of a torch causal LM."""
  import torch

  ids = torch.from_numpy(tokens).long()
  attn = torch.from_numpy(mask).long()
  positions = (attn.cumsum(-1) - 1).clamp(min=0)  # as our model: padding-free positions
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=attn, position_ids=positions).logits.numpy()


def hf_meta_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor names and shapes of a transformers config, as the Hub files hold them."""
  import torch
  import transformers
  from transformers.core_model_loading import revert_weight_conversion

  config = transformers.AutoConfig.for_model(**hf_config)
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(config)
  state = revert_weight_conversion(model, model.state_dict())
  return {name: tuple(t.shape) for name, t in state.items()}


def full_size_layout(preset, hf_shapes: dict) -> int:
  """Places every HF tensor (no memory) into our layout; returns our parameter count.

  Asserts each tensor is consumed exactly once, the placed tree has our
  layout, and the counts agree.
  """
  import jax

  from models import hf_mapping, transformer

  nothing = np.dtype([])  # itemsize 0: the real shapes, no memory
  assembler = hf_mapping.ParamAssembler(preset, nothing)
  for tensor, shape in hf_shapes.items():
    assembler.add(tensor, np.empty(shape, nothing))
  placed = assembler.finish()
  assert sorted(assembler.consumed) == sorted(hf_shapes)
  assert jax.tree.map(lambda x: x.shape, placed) == transformer.param_shapes(preset)
  shapes = jax.tree.leaves(transformer.param_shapes(preset), is_leaf=lambda x: isinstance(x, tuple))
  count = sum(int(np.prod(s)) for s in shapes)
  assert count == sum(int(np.prod(s)) for s in hf_shapes.values())
  return count


def forward_eval_shape(config) -> None:
  """The full model with a pathway on its last MoE layer, traced on abstract bf16 inputs only."""
  import jax
  import jax.numpy as jnp

  from models import transformer

  layer = config.moe_layers[-1]
  out = jax.eval_shape(
    lambda p, t, w: transformer.forward(p, t, config=config, pathway={layer: w}),
    transformer.param_structs(config, jnp.bfloat16),
    jax.ShapeDtypeStruct((2, 8), jnp.int32),
    jax.ShapeDtypeStruct((2, config.num_experts), jnp.float32),
  )
  assert out.logits.shape == (2, 8, config.vocab_size)
  assert out.router_probs.shape == (config.num_hidden_layers, 2, 8, config.num_experts)


def pipeline_keeps_base(hf_dir: str, work_dir: str) -> None:
  """Runs base, kernel regression (alpha 1) and NGD (last 2 MoE layers) on a tiny snapshot.

  Kernel regression with alpha = 1 gives back each sample's base pathway, so
  its scores must equal base's; NGD's must be finite.
  """
  import os

  from c3po_jax.run import pipeline, results
  from c3po_jax.run.config import RunConfig

  rc = RunConfig.make(
    checkpoint_dir=hf_dir,
    benchmark='arc_challenge',
    reference=('openbookqa',),
    methods=('base', 'kernel_regression', 'ngd'),
    kr_alpha=1.0,
    ngd_steps=2,
    max_test_samples=2,
    max_reference_samples=16,
    batch_size=2,
    critical_layers='last:2',
    core_experts=4,
    max_similarity=1.0,
    output_dir=os.path.join(work_dir, 'run'),
    cache_dir=os.path.join(work_dir, 'cache'),
  )
  pipeline.run(rc)
  rows = results.read_rows(os.path.join(work_dir, 'run', 'results.jsonl'))
  by = {(r['method'], r['id']): r for r in rows}
  ids = sorted({r['id'] for r in rows})
  assert len(ids) == 2 and len(rows) == 6
  for i in ids:
    base, kr = by['base', i], by['kernel_regression', i]
    np.testing.assert_allclose(kr['choice_scores'], base['choice_scores'], atol=2e-4)
    assert np.all(np.isfinite(by['ngd', i]['choice_scores']))
