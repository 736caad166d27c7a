"""OLMoE in JAX: config, pure forward with an explicit routing pathway, decoding."""

from models.olmoe.config import PRESETS, ConfigError, OlmoeConfig
from models.olmoe.transformer import (
  ForwardOutput,
  HiddenOutput,
  forward,
  forward_hidden,
  init_params,
  param_shapes,
  param_structs,
)
