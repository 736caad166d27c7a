"""Trains the demo OLMoE on the demo suite and saves a c3po-jax checkpoint.

Next-token cross-entropy over the suite's training text (the answer tokens
weighted up), single questions and, for a `fewshot_fraction` of them, the same
question after 1 to `max_shots` solved questions of its family (the suite's
ICL prompt format, so ICL is a baseline the model can read), plus a weak Switch-style load-balancing loss on the router
probabilities of every layer, which keeps experts from collapsing while
leaving them room to specialize, plus (`route_coef` > 0, the remix world) a
routing loss that gives each family its own group of experts in the last
`route_layers` layers: at a question's last context token, the negative log of
the router probability mass on its family's group. The skill of a family then
lives in its experts, and the router's choice decides the answer.
AdamW with linear warmup and cosine decay; everything seeded.

  python -m c3po_jax.demo.train --output_dir=checkpoints/demo --overwrite
  python -m c3po_jax.demo.train --world=control --steps=3500 --route_coef=0 \
      --output_dir=checkpoints/demo_control --overwrite      (the control world)

Writes to output_dir: the checkpoint (config.json, params/, tokenizer files),
demo.json (seeds, steps, train time, accuracies) and suite/ (the suite's
reference, dev and test files and manifest; the train split is regenerated
from the seed with `python -m c3po_jax.demo.suite`).

Dimensions: L layers, B batch, T tokens, E experts, K top-k, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from c3po_jax.ckpts import checkpoint
from c3po_jax.demo import bpe, choice_scores, data, suite
from models import transformer
from models.config import MoeConfig

METADATA_FILE = 'demo.json'
SUITE_DIR = 'suite'


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  world: str = 'remix'  # suite.WORLDS
  suite_seed: int = 0
  seed: int = 0
  steps: int = 2400
  batch_tokens: int = 1024
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  weight_decay: float = 0.01
  answer_weight: float = 10.0
  aux_loss_coef: float = 0.001  # weak balancing, so experts can specialize (docs/demo_world.md)
  route_coef: float = 1.0  # family -> expert group at the last context token (0: off)
  route_layers: int = 3  # the last N layers whose routing is assigned
  vocab_size: int = 1024  # tokenizer target; the model rounds up to 64
  num_layers: int = 4
  hidden_size: int = 128
  num_heads: int = 4
  num_experts: int = 8
  top_k: int = 2
  expert_hidden: int = 128
  # The context holds a 4-shot prompt of the suite's format (at most 96 tokens).
  bucket_lengths: tuple[int, ...] = (16, 20, 24, 32, 48, 64, 96, 128)
  fewshot_fraction: float = 0.1  # share of questions also trained k-shot (0: none)
  max_shots: int = 4  # k of a few-shot document: uniform in 1..max_shots
  eval_every: int = 1000


def model_config(cfg: TrainConfig, vocab_size: int) -> MoeConfig:
  return MoeConfig(
    vocab_size=-(-vocab_size // 64) * 64,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.expert_hidden,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_heads,
    num_experts=cfg.num_experts,
    num_experts_per_tok=cfg.top_k,
    max_position_embeddings=max(cfg.bucket_lengths),
    pad_token_id=0,
    eos_token_id=1,
  )


def load_balance_loss(router_probs: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """E * sum_e f_e * p_e per layer, averaged (1 when routing is uniform).

  f_e: share of real tokens' top-k slots given to expert e; p_e: mean router
  probability of e. router_probs [L, B, T, E], mask [B, T].
  """
  e = router_probs.shape[-1]
  m = mask.astype(jnp.float32)[None, :, :, None]  # [1, B, T, 1]
  count = jnp.sum(mask)
  p = jnp.sum(router_probs * m, axis=(1, 2)) / count  # [L, E]
  _, idx = jax.lax.top_k(router_probs, k)
  assigned = jnp.sum(jax.nn.one_hot(idx, e), axis=-2)  # [L, B, T, E]
  f = jnp.sum(assigned * m, axis=(1, 2)) / (k * count)  # [L, E]
  return jnp.mean(e * jnp.sum(f * p, axis=-1))


def route_loss(
  router_probs: jax.Array, pos: jax.Array, group: jax.Array, num_layers: int, num_groups: int
) -> jax.Array:
  """Mean over the last num_layers layers and grouped documents of -log(group mass).

  Expert e belongs to group e // (E / num_groups). router_probs [L, B, T, E],
  pos [B] (last context token), group [B] (-1: no group, not counted).
  """
  _, b, _, e = router_probs.shape
  p = router_probs[-num_layers:, jnp.arange(b), pos]  # [C, B, E]
  owner = jnp.arange(e) // (e // num_groups)  # [E]
  in_group = (owner[None, :] == group[:, None]).astype(p.dtype)  # [B, E]
  mass = jnp.sum(p * in_group[None], axis=-1)  # [C, B]
  valid = (group >= 0).astype(p.dtype)
  nll = -jnp.log(jnp.maximum(mass, 1e-9))  # guard: log(0) for an untrained router
  return jnp.sum(nll * valid[None]) / jnp.maximum(num_layers * jnp.sum(valid), 1.0)


def loss_fn(params, batch: data.Batch, config: MoeConfig, aux_coef: float, route=None):
  """route: None, or (coef, num_layers, num_groups) of the routing loss."""
  out = transformer.forward(params, batch.inputs, config=config, attention_mask=batch.mask)
  logp = jax.nn.log_softmax(out.logits, axis=-1)  # [B, T, V]
  nll = -jnp.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]
  ce = jnp.sum(nll * batch.weights) / jnp.sum(batch.weights)
  aux = load_balance_loss(out.router_probs, batch.mask, config.num_experts_per_tok)
  total, metrics = ce + aux_coef * aux, {'ce': ce, 'aux': aux}
  if route is not None:
    coef, num_layers, num_groups = route
    r = route_loss(out.router_probs, batch.route_pos, batch.route_group, num_layers, num_groups)
    total, metrics = total + coef * r, {**metrics, 'route': r}
  return total, metrics


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  warmup = min(cfg.warmup_steps, max(1, cfg.steps // 10))  # Short runs: shorter warmup.
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.learning_rate, warmup, cfg.steps, cfg.learning_rate * 0.05
  )
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
  )


@functools.partial(
  jax.jit, static_argnames=('config', 'optimizer', 'aux_coef', 'route'), donate_argnums=0
)
def train_step(state, batch, *, config, optimizer, aux_coef, route=None):
  params, opt_state = state
  grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, config, aux_coef, route)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state), metrics


def document_routes(the_suite: suite.Suite, tok, docs) -> list[tuple[int, int]]:
  """Per training document (its last context token, its family's index; -1: plain text)."""
  group = {s: i for i, f in enumerate(the_suite.families) for s in f.sources}
  lengths = [len(ids) for ids in choice_scores.encode_prompts(tok, [d['text'] for d in docs])]
  return [
    (n - 1, group[d['source']]) if d['target'] and d['source'] in group else (0, -1)
    for d, n in zip(docs, lengths)
  ]


def dev_accuracy(params, config, tok, the_suite: suite.Suite, split: str = 'dev') -> dict:
  """Accuracy per source on `split` ('dev': per family; 'reference': per source)."""
  out = {}
  for (source, s), rows in sorted(the_suite.records.items()):
    if s == split:
      out[source] = choice_scores.accuracy(params, config, tok, rows, fmt=the_suite.config.fmt)
  return out


def train(cfg: TrainConfig, output_dir: str, overwrite: bool = False) -> dict:
  the_suite = suite.build_suite(suite.SuiteConfig(seed=cfg.suite_seed, world=cfg.world))
  docs = the_suite.train_text
  tok = bpe.train_tokenizer((d['text'] + d['target'] for d in docs), cfg.vocab_size)
  group_of = {s: f.name for f in the_suite.families for s in f.sources}
  rng = suite.stream(cfg.suite_seed, 'fewshot')
  docs = docs + data.fewshot_documents(docs, group_of, cfg.fewshot_fraction, cfg.max_shots, rng)
  if the_suite.config.fmt == 'mc':
    bpe.letter_token_ids(tok)  # Fails early if a letter is not one token.
  config = model_config(cfg, tok.get_vocab_size())
  logging.info('Train config: %s', cfg)
  logging.info('Model config: %s', config)
  documents = data.tokenize_documents(tok, docs, config.eos_token_id, cfg.answer_weight)
  route = None
  routes = None
  if cfg.route_coef > 0:
    route = (cfg.route_coef, cfg.route_layers, len(the_suite.families))
    routes = document_routes(the_suite, tok, docs)
  buckets = data.make_buckets(documents, cfg.bucket_lengths, cfg.batch_tokens, routes)
  logging.info(
    '%d documents, %d tokens; buckets %s',
    len(documents),
    sum(len(ids) for ids, _ in documents),
    [(b.inputs.shape, b.batch_size) for b in buckets],
  )

  params = transformer.init_params(config, jax.random.PRNGKey(cfg.seed))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info('%d parameters', num_params)
  optimizer = make_optimizer(cfg)
  state = (params, optimizer.init(params))
  step_fn = functools.partial(
    train_step, config=config, optimizer=optimizer, aux_coef=cfg.aux_loss_coef, route=route
  )
  stream = data.batches(buckets, cfg.seed)
  start = time.time()
  recent = []
  for step in range(1, cfg.steps + 1):
    state, metrics = step_fn(state, next(stream))
    recent.append(metrics)
    if step % 50 == 0 or step == cfg.steps:
      m = jax.tree.map(lambda *x: float(np.mean(x)), *recent)
      recent = []
      logging.info(
        'step %d/%d  ce %.4f  aux %.3f  route %.3f  %.1f s', step, cfg.steps, m['ce'], m['aux'],
        m.get('route', 0.0), time.time() - start,
      )  # fmt: skip
    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
      for split in ('dev', 'reference'):
        acc = dev_accuracy(state[0], config, tok, the_suite, split)
        logging.info(
          'step %d %s accuracy %s', step, split, {k: round(v, 3) for k, v in acc.items()}
        )
  train_seconds = time.time() - start
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu_seconds = usage.ru_utime + usage.ru_stime  # Whole process, data preparation included.
  logging.info(
    'Trained %d steps in %.0f s wall, %.0f s CPU.', cfg.steps, train_seconds, cpu_seconds
  )
  params = jax.device_get(state[0])

  dev = dev_accuracy(params, config, tok, the_suite, 'dev')
  reference = dev_accuracy(params, config, tok, the_suite, 'reference')
  for name, acc in dev.items():
    logging.info('dev accuracy %-14s %.3f', name, acc)
  for name, acc in reference.items():
    logging.info('reference accuracy %-18s %.3f', name, acc)

  metadata = {
    'train_config': dataclasses.asdict(cfg),
    'num_parameters': int(num_params),
    'train_seconds': round(train_seconds, 1),
    'process_cpu_seconds': round(cpu_seconds, 1),
    'cpu_count': os.cpu_count(),
    'load_average_at_end': [round(x, 2) for x in os.getloadavg()],
    'final_ce': m['ce'],
    'dev_accuracy': {the_suite.family_of(s).name: a for s, a in dev.items()},
    'reference_accuracy': reference,
    'jax_version': jax.__version__,
  }
  with tempfile.TemporaryDirectory() as tmp:
    files = bpe.save_tokenizer(tok, tmp)
    meta_path = os.path.join(tmp, METADATA_FILE)
    with open(meta_path, 'w') as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
      f.write('\n')
    checkpoint.save_checkpoint(
      output_dir, config, params, extra_files=[*files, meta_path], overwrite=overwrite
    )
  suite.write_suite(the_suite, os.path.join(output_dir, SUITE_DIR), include_train=False)
  return metadata


def define_flags() -> dict:
  """Flags of the script: output_dir, overwrite and one per scalar TrainConfig field."""
  define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
  out = {
    f.name: define[type(f.default)](f.name, f.default, f'TrainConfig.{f.name}')
    for f in dataclasses.fields(TrainConfig)
    if type(f.default) in define
  }
  out['output_dir'] = flags.DEFINE_string('output_dir', None, 'Checkpoint to write.', required=True)
  out['overwrite'] = flags.DEFINE_bool('overwrite', False, 'Replace an existing output_dir.')
  return out


def main(argv, flag_values: dict):
  del argv
  values = {name: flag.value for name, flag in flag_values.items()}
  output_dir, overwrite = values.pop('output_dir'), values.pop('overwrite')
  train(TrainConfig(**values), output_dir, overwrite=overwrite)


if __name__ == '__main__':
  _flags = define_flags()  # Here, so that importing this module defines no flag.
  app.run(functools.partial(main, flag_values=_flags))
