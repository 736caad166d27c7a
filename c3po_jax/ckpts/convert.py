"""Converts a local Hugging Face OLMoE snapshot to our Orbax checkpoint.

  python -m c3po_jax.ckpts.convert --hf_dir=PATH --output_dir=PATH \
      [--dtype=bfloat16|float32] [--overwrite]

Streams the safetensors shards one tensor at a time into a parameter tree
pre-allocated in the target dtype (`hf_snapshot.read_hf_checkpoint`), then
writes it with `checkpoint.save_checkpoint`, copying the tokenizer files found
next to the weights. Host memory peaks at `conversion_peak_bytes`.

Dimensions: D model, V vocab, E experts, F expert hidden.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from c3po_jax.ckpts import checkpoint, hf_snapshot
from c3po_jax.common import cli
from models import transformer
from models.config import MoeConfig

TOKENIZER_FILES = (
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'vocab.json',
  'merges.txt',
  'generation_config.json',
)
DTYPES = ('bfloat16', 'float32')
_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  """What `convert` wrote and read."""

  output_dir: str
  config: MoeConfig
  dtype: str
  consumed: tuple[str, ...]  # HF tensors placed, each exactly once
  skipped: tuple[str, ...]  # lm_head.weight of tied embeddings
  copied: tuple[str, ...]  # tokenizer files copied


def conversion_peak_terms(config: MoeConfig, dtype, source_dtype='float32') -> dict[str, int]:
  """Bytes of host memory the converter holds at its peak, by cause.

  tree: every parameter, pre-allocated in the target dtype (from the abstract
  `param_structs`; nothing is allocated here). hf_tensor: the largest single
  HF tensor as read from its shard, in source_dtype, over the layouts the name
  table accepts (whole leaves; per-expert [F, D] slices, or the fused
  `gate_up_proj` [E, 2F, D]). relayout: the layout hook's transposed copy of
  that tensor (numpy casts into the pre-allocated leaf in place, without a
  full temporary). orbax: 0, because `save_checkpoint` turns off Orbax's
  deep copy and the compression buffers (measured; see
  `checkpoint._orbax_save`).
  """
  structs = transformer.param_structs(config, jnp.dtype(dtype))
  tree = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(structs))
  flat = jax.tree_util.tree_flatten_with_path(structs)[0]
  whole = max(s.size for path, s in flat if 'experts' not in [k.key for k in path])
  moe = structs[transformer.layer_name(config.moe_layers[0])]['moe']['experts']
  fused_gate_up = moe['gate'].size + moe['up'].size  # [E, 2F, D]
  hf_tensor = max(whole, fused_gate_up) * np.dtype(jnp.dtype(source_dtype)).itemsize
  return {'tree': tree, 'hf_tensor': hf_tensor, 'relayout': hf_tensor, 'orbax': 0}


def conversion_peak_bytes(config: MoeConfig, dtype, source_dtype='float32') -> int:
  """Upper bound on the converter's peak host memory in bytes (see terms)."""
  return sum(conversion_peak_terms(config, dtype, source_dtype).values())


def convert(
  hf_dir: str, output_dir: str, *, dtype='bfloat16', overwrite: bool = False
) -> ConversionResult:
  """Converts the HF snapshot at hf_dir and writes our checkpoint at output_dir."""
  output_dir = os.path.abspath(output_dir)
  # Fail before reading gigabytes of weights; never replace the input.
  checkpoint.check_output_dir(output_dir, overwrite, keep=(hf_dir,))
  dtype = checkpoint.param_dtype(dtype)
  config = hf_snapshot.read_config(hf_dir)
  terms = conversion_peak_terms(config, dtype)
  logging.info(
    'Converting %s to %s (%s); peak host memory <= %.2f GiB (%s).',
    hf_dir,
    output_dir,
    dtype.name,
    sum(terms.values()) / _GIB,
    ', '.join(f'{k} {v / _GIB:.2f}' for k, v in terms.items()),
  )
  hf = hf_snapshot.read_hf_checkpoint(hf_dir, dtype)
  logging.info('Placed %d HF tensors (skipped %s).', len(hf.consumed), list(hf.skipped))
  extra = [os.path.join(hf_dir, f) for f in TOKENIZER_FILES]
  extra = [p for p in extra if os.path.isfile(p)]
  checkpoint.save_checkpoint(
    output_dir, hf.config, hf.params, extra_files=extra, overwrite=overwrite, keep=(hf_dir,)
  )
  return ConversionResult(
    output_dir=output_dir,
    config=hf.config,
    dtype=dtype.name,
    consumed=hf.consumed,
    skipped=hf.skipped,
    copied=tuple(os.path.basename(p) for p in extra),
  )


def _define_flags() -> None:
  """Defined here, not at import, so importing this module defines no flags."""
  flags.DEFINE_string('hf_dir', None, 'Local Hugging Face OLMoE snapshot directory.')
  flags.DEFINE_string('output_dir', None, 'Where to write the converted checkpoint.')
  flags.DEFINE_enum('dtype', 'bfloat16', DTYPES, 'Parameter dtype of the output.')
  flags.DEFINE_bool(
    'overwrite', False, 'Replace output_dir if it is a converted checkpoint (never the input).'
  )
  flags.mark_flags_as_required(['hf_dir', 'output_dir'])


def main(argv):
  """Errors are one `error:` line (see `cli`); --verbosity=1 shows the traceback."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  result = convert(f.hf_dir, f.output_dir, dtype=f.dtype, overwrite=f.overwrite)
  logging.info('Wrote %s: %d tensors.', result.output_dir, len(result.consumed))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
