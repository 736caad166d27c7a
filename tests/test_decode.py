"""Prefill + KV-cache decode against the full forward and transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.testing import hf_models
from models import decode, transformer
from models.families.olmoe import TINY

PAD = TINY.pad_token_id


def random_params(config, seed=0, std=0.2):
  """Random params with weights large enough that routing and logits vary."""
  params = transformer.init_params(config, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))

  def draw(p):
    noise = jax.random.normal(next(keys), p.shape, p.dtype)
    return 1.0 + 0.1 * noise if p.ndim == 1 else std * noise

  return jax.tree.map(draw, params)


def padded(prompts, length, side):
  tokens = np.full((len(prompts), length), PAD, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    where = slice(0, len(p)) if side == 'right' else slice(length - len(p), length)
    tokens[i, where] = p
    mask[i, where] = 1
  return jnp.asarray(tokens), jnp.asarray(mask)


# Module-level jitted functions: tests that share shapes share compilations.
forward = jax.jit(transformer.forward, static_argnames='config')
prefill = jax.jit(decode.prefill, static_argnames=('config', 'cache_size', 'pathway_mode'))
decode_step = jax.jit(decode.decode_step, static_argnames='config')


@pytest.mark.slow
@pytest.mark.parametrize('with_pathway', [False, True])
@pytest.mark.parametrize('side', ['right', 'left'])
def test_cached_decode_matches_full_forward(side, with_pathway):
  params = random_params(TINY)
  rng = np.random.default_rng(0)
  lengths, steps, t = [7, 3, 10], 5, 12
  prompts = [rng.integers(3, TINY.vocab_size, n).tolist() for n in lengths]
  fed = rng.integers(3, TINY.vocab_size, (len(prompts), steps))  # teacher-forced tokens
  tokens, mask = padded(prompts, t, side)
  pathway = None
  if with_pathway:
    pathway = {1: jnp.asarray(rng.uniform(0, 1, (len(prompts), TINY.num_experts)), jnp.float32)}

  logits, cache, info = prefill(
    params, tokens, config=TINY, attention_mask=mask, cache_size=t + steps, pathway=pathway
  )
  got = [logits]
  for i in range(steps):
    logits, cache = decode_step(params, cache, jnp.asarray(fed[:, i]), config=TINY)
    got.append(logits)
  got = np.stack(got, axis=1)  # [B, steps + 1, V]
  np.testing.assert_array_equal(cache.num_tokens, np.asarray(lengths) + steps)

  # The full forward on prompt + fed tokens, the pathway on the last prompt
  # token only; right padding leaves every real position as unpadded.
  sequences = [p + f.tolist() for p, f in zip(prompts, fed)]
  full_tokens, full_mask = padded(sequences, t + steps, 'right')
  full = forward(
    params,
    full_tokens,
    config=TINY,
    attention_mask=full_mask,
    pathway=pathway,
    pathway_index=jnp.asarray(lengths) - 1,
  )
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(got[b], full.logits[b, n - 1 : n + steps], atol=1e-5, rtol=0)
    real = np.asarray(mask[b], bool)
    np.testing.assert_allclose(
      info.router_probs[:, b, real], full.router_probs[:, b, :n], atol=1e-6, rtol=0
    )


def greedy_reference(params, prompts, steps):
  """Token-by-token greedy decoding with the uncached forward (one fixed shape)."""
  out = []
  width = max(len(p) for p in prompts) + steps
  for prompt in prompts:
    seq = np.full((1, width), PAD, np.int32)
    seq[0, : len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
      mask = (np.arange(seq.shape[1]) < n).astype(np.int32)[None]
      logits = forward(params, jnp.asarray(seq), config=TINY, attention_mask=mask).logits
      seq[0, n] = int(jnp.argmax(logits[0, n - 1]))
    out.append(seq[0, len(prompt) : len(prompt) + steps])
  return np.asarray(out)


@pytest.mark.slow
def test_generate_padded_matches_uncached_greedy():
  params = random_params(TINY, seed=3)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 128, n).tolist() for n in (5, 11, 2)]
  tokens, mask = decode.pad_batch(prompts, pad_token_id=PAD, buckets=(16,))
  out, lengths = decode.generate(params, tokens, config=TINY, attention_mask=mask, max_new_tokens=6)
  np.testing.assert_array_equal(out, greedy_reference(params, prompts, 6))
  np.testing.assert_array_equal(lengths, [6, 6, 6])


@pytest.mark.slow
def test_generate_matches_transformers():
  torch = pytest.importorskip('torch')
  model, _ = hf_models.make_hf_model(seed=0)
  config, params = hf_models.params_from_torch(model)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, config.vocab_size, (3, 8)).astype(np.int32)
  steps = 10

  def both(eos):
    ours, lengths = decode.generate(
      params, ids, config=config, max_new_tokens=steps, eos_token_id=eos
    )
    with torch.no_grad():
      hf = model.generate(
        torch.from_numpy(ids).long(),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
      )
    ours, lengths, hf = np.asarray(ours), np.asarray(lengths), hf[:, ids.shape[1] :].numpy()
    # transformers stops once every row is done; finished rows emit pad.
    np.testing.assert_array_equal(ours[:, : hf.shape[1]], hf)
    assert np.all(ours[:, hf.shape[1] :] == PAD)
    for row, n in zip(ours, lengths):
      assert np.all(row[n:] == PAD)
      assert n == steps or row[n - 1] == eos
    return ours, lengths

  ours, _ = both(config.eos_token_id)
  # Stop row 0 early at a token it emits mid-way (same compilation: eos is traced).
  eos = int(ours[0, 3])
  assert eos != PAD
  _, lengths = both(eos)
  assert lengths[0] == ours[0].tolist().index(eos) + 1 < steps


@pytest.mark.slow
def test_no_recompilation_within_a_bucket():
  params = random_params(TINY)

  def run(lengths, seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 128, n).tolist() for n in lengths]
    tokens, mask = decode.pad_batch(prompts, pad_token_id=PAD, batch_size=4)
    assert tokens.shape == (4, 32)
    out, _ = decode.generate(
      params, tokens, config=TINY, attention_mask=mask, max_new_tokens=4, eos_token_id=seed
    )
    return out

  compiled = decode.generate._cache_size()
  run([3, 17], 0)
  assert decode.generate._cache_size() == compiled + 1
  run([30, 1, 9], 1)
  run([32], 2)
  assert decode.generate._cache_size() == compiled + 1


def test_bucket_length_and_pad_batch():
  assert [decode.bucket_length(n) for n in (1, 32, 33, 4096)] == [32, 32, 64, 4096]
  assert decode.bucket_length(5, buckets=(16, 8)) == 8
  with pytest.raises(ValueError):
    decode.bucket_length(4097)
  tokens, mask = decode.pad_batch([[5, 6, 7], [8]], pad_token_id=0, buckets=(4, 8), batch_size=3)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  with pytest.raises(ValueError):
    decode.pad_batch([[5], []], pad_token_id=0)
