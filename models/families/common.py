"""What the families share: HF tensor-name rules, HF config field readers.

A family file (`olmoe.py`, `deepseek.py`, ...) holds one model family's
differences from the common model: how its HF `config.json` maps onto
`MoeConfig`, its published sizes, and its HF tensor names. The rules here are
the names most families share (LLaMA-style layers); a family lists the ones
it uses plus its own.

A rule is (regex, function of the match groups -> Target). Paths are key paths
into our parameter tree (`models.params.param_shapes`).

Dimensions: D model, F expert hidden, E experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from models.config import ConfigError, MoeConfig

LAYER = r'model\.layers\.(\d+)\.'


def t(x: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] -> ours [in, out]."""
  return np.ascontiguousarray(x.T)


def t_stacked(x: np.ndarray) -> np.ndarray:
  """[E, out, in] -> [E, in, out]."""
  return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def fused_gate_up(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A fused gate_up [E, 2F, D] (gate rows, then up rows) -> (gate, up) [E, D, F] each."""
  f = x.shape[1] // 2
  return t_stacked(x[:, :f]), t_stacked(x[:, f:])


def same(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one HF tensor goes.

  path: key path into our tree. expert: index on the leading expert axis for
  per-expert tensors (None: the whole leaf). split: for a fused tensor (e.g.
  `gate_up_proj` [E, 2F, D]), the paths of the whole leaves it holds, in the
  order of the tuple `transform` returns (e.g. `fused_gate_up`: gate, up).
  """

  path: tuple[str, ...]
  transform: Callable[[np.ndarray], np.ndarray]
  expert: int | None = None
  split: tuple[tuple[str, ...], ...] | None = None


Rule = tuple[str, Callable[..., Target]]


def _layer(i) -> str:
  return f'layer_{i}'


# Embedding, final norm, LM head, the two layer norms, q/k/v/o projections.
BASE_RULES: list[Rule] = [
  (r'model\.embed_tokens\.weight', lambda: Target(('embed', 'embedding'), same)),
  (r'model\.norm\.weight', lambda: Target(('final_norm', 'scale'), same)),
  (r'lm_head\.weight', lambda: Target(('lm_head',), t)),
  (
    LAYER + r'input_layernorm\.weight',
    lambda i: Target((_layer(i), 'input_norm', 'scale'), same),
  ),
  (
    LAYER + r'post_attention_layernorm\.weight',
    lambda i: Target((_layer(i), 'post_attn_norm', 'scale'), same),
  ),
  (
    LAYER + r'self_attn\.(q|k|v|o)_proj\.weight',
    lambda i, n: Target((_layer(i), 'attn', n), t),
  ),
]
QK_NORM_RULES: list[Rule] = [
  (
    LAYER + r'self_attn\.(q|k)_norm\.weight',
    lambda i, n: Target((_layer(i), 'attn', f'{n}_norm', 'scale'), same),
  ),
]
QKV_BIAS_RULES: list[Rule] = [
  (
    LAYER + r'self_attn\.(q|k|v)_proj\.bias',
    lambda i, n: Target((_layer(i), 'attn', f'{n}_bias'), same),
  ),
]


def expert_rules(prefix: str = r'mlp\.') -> list[Rule]:
  """Router `<prefix>gate` and routed experts, per expert or fused."""
  return [
    (LAYER + prefix + r'gate\.weight', lambda i: Target((_layer(i), 'moe', 'router', 'kernel'), t)),
    (
      LAYER + prefix + r'experts\.(\d+)\.(gate|up|down)_proj\.weight',
      lambda i, e, n: Target((_layer(i), 'moe', 'experts', n), t, expert=int(e)),
    ),
    # Fused layouts written by transformers 5: gate_up [E, 2F, D], down [E, D, F].
    (
      LAYER + prefix + r'experts\.gate_up_proj',
      lambda i: Target(
        (_layer(i), 'moe', 'experts', 'gate'),
        fused_gate_up,
        split=((_layer(i), 'moe', 'experts', 'gate'), (_layer(i), 'moe', 'experts', 'up')),
      ),
    ),
    (
      LAYER + prefix + r'experts\.down_proj',
      lambda i: Target((_layer(i), 'moe', 'experts', 'down'), t_stacked),
    ),
  ]


def mlp_rules(hf_name: str, ours: tuple[str, ...]) -> list[Rule]:
  """A dense SwiGLU MLP `<hf_name>.{gate,up,down}_proj.weight` at our path `ours`."""
  return [
    (
      LAYER + hf_name + r'\.(gate|up|down)_proj\.weight',
      lambda i, n: Target((_layer(i), *ours, n), t),
    )
  ]


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: its HF model types, config mapping, sizes and tensor names."""

  model_types: tuple[str, ...]
  from_hf_config: Callable[[Mapping[str, Any]], MoeConfig]
  to_hf_config: Callable[[MoeConfig], dict[str, Any]]
  rules: Sequence[Rule]
  presets: Mapping[str, MoeConfig]


# ---- reading HF config.json fields ----


def as_dict(hf) -> dict:
  return dict(hf) if isinstance(hf, Mapping) else hf.to_dict()


def rope_theta(hf: Mapping[str, Any], default: float) -> float:
  """rope_theta from the top level or transformers 5's rope_parameters; default rope only."""
  theta = hf.get('rope_theta')
  params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  if theta is None:
    theta = params.get('rope_theta', default)
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in (None, 'default'):
    raise ConfigError(f'rope_type={rope_type!r} is not supported (only the default RoPE)')
  return float(theta)


def first_id(value):
  """An id field that may be a list (eos_token_id): its first entry."""
  if isinstance(value, (list, tuple)):
    return value[0] if value else None
  return value


def check_silu(hf: Mapping[str, Any]) -> None:
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise ConfigError(f'hidden_act={act!r} is not supported (only silu)')


def sliding_fields(hf: Mapping[str, Any], default_layers=None, use_layer_types=True) -> dict:
  """`sliding_window` and `sliding_layers` of an HF config ({} without a window).

  The window is on when `sliding_window` is set (transformers writes 0 for
  none) and `use_sliding_window` is not false (Qwen's switch; Mixtral has
  none). Which layers use it: `layer_types` ('sliding_attention' per layer)
  where the family's modeling code reads them (`use_layer_types`), else
  `default_layers` (the family's rule), else every layer.
  """
  window = hf.get('sliding_window') or None
  if window is None or not hf.get('use_sliding_window', True):
    return {}
  types = hf.get('layer_types') if use_layer_types else None
  if types is not None:
    layers = tuple(i for i, kind in enumerate(types) if kind == 'sliding_attention')
  elif default_layers is not None:
    layers = tuple(default_layers)
  else:
    layers = tuple(range(hf['num_hidden_layers']))
  return {'sliding_window': int(window), 'sliding_layers': layers} if layers else {}


def layer_types(c: MoeConfig) -> list[str]:
  """HF `layer_types` of a config: 'sliding_attention' or 'full_attention' per layer."""
  return [
    'sliding_attention' if c.attention_window(i) else 'full_attention'
    for i in range(c.num_hidden_layers)
  ]


def common_fields(hf: Mapping[str, Any], *, rope_default: float, eps_default: float) -> dict:
  """The MoeConfig fields every family spells the same way."""
  heads = hf['num_attention_heads']
  return dict(
    vocab_size=hf['vocab_size'],
    hidden_size=hf['hidden_size'],
    num_hidden_layers=hf['num_hidden_layers'],
    num_attention_heads=heads,
    num_key_value_heads=hf.get('num_key_value_heads') or heads,
    max_position_embeddings=hf.get('max_position_embeddings', 4096),
    rope_theta=rope_theta(hf, rope_default),
    rms_norm_eps=float(hf.get('rms_norm_eps', eps_default)),
    tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
    pad_token_id=hf.get('pad_token_id'),
    bos_token_id=first_id(hf.get('bos_token_id')),
    eos_token_id=first_id(hf.get('eos_token_id')),
  )


def common_hf_fields(c: MoeConfig) -> dict:
  """The HF config.json fields every family spells the same way."""
  return {
    'vocab_size': c.vocab_size,
    'hidden_size': c.hidden_size,
    'num_hidden_layers': c.num_hidden_layers,
    'num_attention_heads': c.num_attention_heads,
    'num_key_value_heads': c.num_key_value_heads,
    'num_experts_per_tok': c.num_experts_per_tok,
    'max_position_embeddings': c.max_position_embeddings,
    'rope_theta': c.rope_theta,
    'rms_norm_eps': c.rms_norm_eps,
    'tie_word_embeddings': c.tie_word_embeddings,
    'pad_token_id': c.pad_token_id,
    'bos_token_id': c.bos_token_id,
    'eos_token_id': c.eos_token_id,
    'hidden_act': 'silu',
  }


def build(family_name: str, make: Callable[[], MoeConfig]) -> MoeConfig:
  """Runs a config constructor, turning a missing HF field into a ConfigError."""
  try:
    return make()
  except KeyError as e:
    raise ConfigError(f'{family_name} config is missing the field {e}') from e


def sparse_step_dense_layers(hf: Mapping[str, Any]) -> tuple[int, ...]:
  """Qwen's dense layers: those in mlp_only_layers or off the decoder_sparse_step grid."""
  step = hf.get('decoder_sparse_step', 1) or 1
  only = set(hf.get('mlp_only_layers') or ())
  return tuple(i for i in range(hf['num_hidden_layers']) if i in only or (i + 1) % step != 0)
