"""c3po-jax: C3PO test-time expert re-mixing for Mixture-of-Experts LLMs.

config, params = c3po_jax.load_checkpoint(path)
out = c3po_jax.forward(params, tokens, config=config, pathway={15: w})
result = c3po_jax.run(c3po_jax.RunConfig.make(...))  # a whole C3PO run (see c3po_jax.run.api)
suite = c3po_jax.run_suite('checkpoints/demo/suite', methods=('base', 'ngd'))  # every benchmark
"""

from c3po_jax.ckpts.checkpoint import load_checkpoint, save_checkpoint
from c3po_jax.run.api import RunResult, SuiteResult, demo_suite, run, run_suite
from c3po_jax.run.config import METHODS, RunConfig
from models.config import ConfigError, MoeConfig
from models.decode import generate, prefill
from models.families import PRESETS
from models.transformer import ForwardOutput, forward, forward_hidden, init_params
