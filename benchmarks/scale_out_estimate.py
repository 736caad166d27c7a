"""Estimates time and memory of OLMoE-1B-7B C3PO runs on a TPU VM, from FLOPs.

  python -m benchmarks.scale_out_estimate [--batch_size=32] [--mfu=0.3]

Tokens are counted as the pipeline pads them: mc prompts encoded with the
OLMoE tokenizer from the offline benchmark copies, batches of batch_size in
order, each padded to its token bucket (scoring.TOKEN_BUCKETS), the last one
to batch_size rows. Neighbours are drawn at random from a stand-in reference
pool (the real ones are the nearest; only their lengths matter here).

FLOPs per token at padded length T: forward 2 * active params + 4 * L * T * D
(attention over all T slots); backward = 2 x forward. Compute time = FLOPs /
(chips x peak bf16 x mfu). The prefix backend's optimization steps run a few
tokens per sample, so they are bound by reading the critical layers' weights
from HBM instead: once per loss evaluation, three times per value_and_grad,
per batch. docs/scale_out.md explains the results.

Dimensions: B batch, k neighbours, T padded tokens, L layers, Lc layers from
the first critical one, D model, E experts, F expert hidden, V vocab, K top-k.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from c3po_jax.remix.scoring import TOKEN_BUCKETS, bucket
from c3po_jax.tasks import encoding, load_examples
from c3po_jax.tasks.tokenizer import load_tokenizer
from models.families.olmoe import OLMOE_1B_7B_0924 as CFG

flags.DEFINE_integer('batch_size', 32, 'Test samples per batch (all data shards together).')
flags.DEFINE_float('mfu', 0.3, 'Assumed fraction of peak bf16 FLOP/s reached.')
flags.DEFINE_integer('k', 3, 'Neighbours.')
flags.DEFINE_integer('steps', 10, 'NGD steps.')
flags.DEFINE_integer('critical_layers', 5, 'Last N layers re-mixed.')
flags.DEFINE_integer('prefix_cache_size', 1024, 'Prepared reference states kept per device.')
F = flags.FLAGS

ACTIVE = 1.3e9  # active parameters per token (8 of 64 experts)
L, D, E = CFG.num_hidden_layers, CFG.hidden_size, CFG.num_experts
FF, V, K = CFG.intermediate_size, CFG.vocab_size, CFG.num_experts_per_tok
EXPERT_PARAMS = L * 3 * E * D * FF  # 6.44e9
OTHER_PARAMS = 2 * V * D + L * (4 * D * D + D * E)  # embeddings, head, attention, routers
ALPHA_GRID = 11
# The paper's pairings, with stand-in pools (offline validation splits) for
# lengths; candidates for the reference pass: HF train sizes (OBQA 4957 +
# SciQ 11679; CSQA 9741 + SIQA 33410), 20000 and 10000 assumed where the
# registry lacks the real sources (BIG-Bench + SuperGLUE, KnowRef).
ARC_REFS = ((('openbookqa', 'validation'), ('sciq', 'validation')), 16636)
QA_REFS = ((('commonsense_qa', 'validation'), ('social_iqa', 'validation')), 43151)
SUITE = {
  'mmlu': ((('mmlu', 'validation'), ('mmlu', 'dev')), 20000),
  'hellaswag': QA_REFS,
  'arc_challenge': ARC_REFS,
  'arc_easy': ARC_REFS,
  'piqa': QA_REFS,
  'winogrande': ((('winogrande', 'validation'),), 10000),
}
# name: chips, peak bf16 FLOP/s per chip, HBM bytes and bytes/s per chip,
# mesh (data shards, expert shards).
DEVICES = {
  'v4-8': (4, 275e12, 32 * 2**30, 1.2e12, (4, 1)),
  'v5e-8': (8, 197e12, 16e9, 819e9, (4, 2)),
}


def flops_per_token(t: float) -> float:
  return 2 * ACTIVE + 4 * L * t * D


def padded(lengths, b) -> list[int]:
  """Bucketed length of each b-row batch, in order (the last padded to b rows)."""
  return [bucket(max(lengths[i : i + b]), TOKEN_BUCKETS) for i in range(0, len(lengths), b)]


def forward_flops(lengths, b) -> float:
  return sum(b * t * flops_per_token(t) for t in padded(lengths, b))


def window_step_flops(t: float) -> float:
  """value_and_grad of one window token through the last Lc layers (prefix backend)."""
  lc = F.critical_layers
  return 3 * (2 * (ACTIVE - 2 * V * D) * lc / L + 4 * lc * t * D)


def benchmark_cost(tok, name: str, refs, rng) -> dict:
  b, k, steps = F.batch_size, F.k, F.steps
  test = load_examples(name)
  pool = [e for src, split in refs[0] for e in load_examples(src, split=split)]
  enc = lambda e, fs=(): min(len(encoding.encode(tok, e, 'mc', fs).context), 2048)
  lt = [enc(e) for e in test]
  lr = [enc(e) for e in pool]
  nb = rng.integers(0, len(pool), (len(test), k))  # [n, k]
  ln = [lr[j] for row in nb for j in row]  # the neighbour batches: b * k prompts each
  li = [enc(e, [pool[j] for j in row]) for e, row in zip(test, nb)]  # ICL prompts
  t_ref = float(np.mean(padded(lr, b)))
  t_nb = float(np.mean(padded(ln, b * k)))
  t_test = float(np.mean(padded(lt, b)))
  nbr = forward_flops(ln, b * k)  # one forward of every sample's k neighbours
  test_f = forward_flops(lt, b)
  n, evals = len(test), 3 * steps + 1  # forward-equivalents of an NGD run
  batches = -(-n // b)
  return {
    'n': n,
    'tokens': (np.mean(lt), t_test, t_nb, float(np.mean(padded(li, b)))),
    'max_nb': max(padded(ln, b * k)),
    'ref_state_tokens': float(np.mean([bucket(x, TOKEN_BUCKETS) for x in lr])),
    'references': refs[1] * t_ref * flops_per_token(t_ref),
    'naive': {
      'base': test_f,
      'icl': forward_flops(li, b),
      'mode_finding': test_f,  # the re-mixed evaluation; the iterations are tiny
      'kernel_regression': ALPHA_GRID * nbr + test_f,
      'ngd': evals * nbr + test_f,
      'oracle': evals * test_f + test_f,
    },
    'prefix': {  # neighbours prepared once per sample (no reuse across samples)
      'kernel_regression': nbr + ALPHA_GRID * n * k * window_step_flops(t_nb) / 3 + test_f,
      'ngd': nbr + (steps + 1) * n * k * window_step_flops(t_nb) + test_f,
      'oracle': 2 * test_f + (steps + 1) * n * window_step_flops(t_test),
    },
    # Weight reads of the last Lc layers, per batch: kr's grid, NGD and oracle.
    'prefix_reads': batches * (ALPHA_GRID + 2 * evals),
  }


def memory(c: dict, dev) -> dict:
  """Bytes per chip: parameters, and the largest per-batch working sets."""
  _, _, hbm, _, (data, expert) = dev
  q = F.batch_size // data  # samples per data shard
  t = c['max_nb']

  def saved(t):
    # Kept for the backward pass per token, all layers: ~8 bf16 D-vectors
    # (residual, norms, q/k/v, attention out), K gathered expert inputs and
    # outputs [K, D], 3 expert activations [K, F]; float32 attention weights.
    return L * (2 * (8 * D + 2 * K * D + 3 * K * FF) + 4 * CFG.num_attention_heads * t)

  kv = 2 * 2 * F.critical_layers * CFG.num_key_value_heads * CFG.head_dim  # bytes/token
  return {
    'hbm': hbm,
    'params': 2 * (OTHER_PARAMS + EXPERT_PARAMS / expert),
    'naive_ngd_saved_longest_batch': q * F.k * t * saved(t),
    'prefix_states_longest_batch': q * F.k * t * kv,
    'prefix_state_cache_full': F.prefix_cache_size * c['ref_state_tokens'] * kv,
  }


def main(argv):
  del argv
  tok = load_tokenizer(None)
  rng = np.random.default_rng(0)
  costs = {name: benchmark_cost(tok, name, refs, rng) for name, refs in SUITE.items()}
  print(f'batch {F.batch_size}, k={F.k}, {F.steps} NGD steps, mfu {F.mfu}; FLOPs in PFLOP')
  print(
    f'{"benchmark":<14}{"n":>6}{"tok":>6}{"pad":>6}{"nb":>6}{"icl":>6}'
    f'{"refs":>7}{"naive":>9}{"prefix":>9}'
  )
  tot = {'refs': 0.0, 'naive': 0.0, 'prefix': 0.0, 'reads': 0.0}
  for name, c in costs.items():
    naive = sum(c['naive'].values())
    prefix = naive + sum(c['prefix'][m] - c['naive'][m] for m in c['prefix'])
    tot['refs'] += c['references']
    tot['naive'] += naive
    tot['prefix'] += prefix
    tot['reads'] += c['prefix_reads']
    tokens = ''.join(f'{x:>6.0f}' for x in c['tokens'])
    print(
      f'{name:<14}{c["n"]:>6}{tokens}{c["references"] / 1e15:>7.1f}'
      f'{naive / 1e15:>9.1f}{prefix / 1e15:>9.1f}'
    )
  methods = costs['mmlu']['naive']
  per = {m: round(sum(c['naive'][m] for c in costs.values()) / 1e15, 1) for m in methods}
  print('naive backend, PFLOP per method:', per)
  worst = max(costs.values(), key=lambda c: c['max_nb'] * c['ref_state_tokens'])
  for name, dev in DEVICES.items():
    chips, peak, _, rate, (_, expert) = dev
    flops_rate = chips * peak * F.mfu
    layer_bytes = 2 * (4 * D * D + D * E + 3 * (E // expert) * D * FF)
    reads = tot['reads'] * F.critical_layers * layer_bytes / rate
    refs, naive, prefix = (tot[x] / flops_rate / 3600 for x in ('refs', 'naive', 'prefix'))
    print(
      f'{name}: reference passes {refs:.2f} h; all six methods, naive backend '
      f'{refs + naive:.1f} h, prefix backend {refs + prefix + reads / 3600:.1f} h '
      f'(weight reads {reads / 3600:.2f} h)'
    )
    mem = {key: round(v / 1e9, 1) for key, v in memory(worst, dev).items()}
    print(f'  per chip, GB (longest neighbour bucket {worst["max_nb"]}):', mem)


if __name__ == '__main__':
  app.run(main)
