"""The supported MoE families, by HF `model_type`; one file per family.

`from_hf_config(hf)` builds a `MoeConfig` for any of them; `family(model_type)`
gives a family's config mapping, presets and HF tensor-name rules.
"""

from __future__ import annotations

from typing import Any

from models.config import ConfigError, MoeConfig
from models.families import (
  common,
  deepseek,
  deepseek_v2,
  flex_olmo,
  gpt_oss,
  granite,
  mixtral,
  olmoe,
  qwen_moe,
)
from models.families.common import Family, Target

_FAMILIES = (olmoe.FAMILY, deepseek.FAMILY, qwen_moe.FAMILY, mixtral.FAMILY)
_FAMILIES += (granite.FAMILY, gpt_oss.FAMILY)
_FAMILIES += (flex_olmo.FAMILY, deepseek_v2.FAMILY)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in _FAMILIES for t in f.model_types}
SUPPORTED = tuple(BY_MODEL_TYPE)
PRESETS: dict[str, MoeConfig] = {k: v for f in _FAMILIES for k, v in f.presets.items()}


def family(model_type: str | None) -> Family:
  if model_type not in BY_MODEL_TYPE:
    raise ConfigError(
      f'model_type={model_type!r} is not supported; supported: {", ".join(SUPPORTED)}'
    )
  return BY_MODEL_TYPE[model_type]


def from_hf_config(hf: Any) -> MoeConfig:
  """A MoeConfig from an HF `config.json` dict or config object of any supported family."""
  hf = common.as_dict(hf)
  model_type = hf.get('model_type')
  if model_type not in BY_MODEL_TYPE:
    raise ConfigError(
      f'config has model_type={model_type!r} (architectures={hf.get("architectures")}); '
      f'supported: {", ".join(SUPPORTED)}'
    )
  return family(model_type).from_hf_config(hf)


def to_hf_config(config: MoeConfig) -> dict[str, Any]:
  """The HF `config.json` dict of a config, in its family's field names."""
  return family(config.model_type).to_hf_config(config)


__all__ = ['PRESETS', 'SUPPORTED', 'Family', 'Target', 'family', 'from_hf_config', 'to_hf_config']
