"""Decoding with a KV cache gives the tokens of recomputing the whole sequence; beam search."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fm import decoding, sharding
from fm.models import decoder, encdec

PROMPTS = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 13], [100, 3, 44, 2, 9], [77]]


def setup(family, scan=False):
  module = encdec if family == 'encdec' else decoder
  cfg = module.Config(**{**module.VARIANTS['tiny'], 'vocab_size': 128, 'scan_layers': scan})
  if family != 'encdec':
    tokens, seg = decoding.left_pad(PROMPTS)
    params = nn.unbox(module.Model(cfg).init(jax.random.key(0), jnp.asarray(tokens)))
  else:  # Right-padded encoder inputs.
    tokens, seg = (
      np.ascontiguousarray(x[:, ::-1]) for x in decoding.left_pad([p[::-1] for p in PROMPTS])
    )
    params = nn.unbox(
      module.Model(cfg).init(
        jax.random.key(0), jnp.asarray(tokens), jnp.zeros((4, 3), jnp.int32), jnp.asarray(seg)
      )
    )
  return cfg, params, tokens, seg


# The scanned decoder, the prefix LM and the encoder-decoder in the slow set (17-24 s each on a
# 2-core AVX2 machine); the prefix LM's cache decodes by default in test_no_repeat_ngram, the
# encoder-decoder's in test_convert's imported T5 (greedy, against the logits of transformers).
@pytest.mark.parametrize(
  'family,scan',
  [('decoder', False)]
  + [
    pytest.param(*p, marks=pytest.mark.slow)
    for p in (('decoder', True), ('prefix_lm', False), ('encdec', False))
  ],
)
def test_kv_cache_matches_recomputation(family, scan):
  cfg, params, tokens, seg = setup(family, scan)
  cached = np.asarray(decoding.greedy(family, cfg, params, tokens, seg, max_new=12))
  uncached = np.asarray(decoding.greedy_uncached(family, cfg, params, tokens, seg, max_new=12))
  np.testing.assert_array_equal(cached, uncached)
  assert len(set(map(tuple, cached))) > 1  # Different prompts, different continuations.
  # Padding changes nothing: a row decoded alone gives the same tokens.
  alone = decoding.greedy(
    family, cfg, params, tokens[:1, seg[0] > 0], seg[:1, seg[0] > 0], max_new=12
  )
  np.testing.assert_array_equal(np.asarray(alone)[0], cached[0])


# Beam search's checks in the slow set (27 s for the decoder on a 2-core AVX2 machine); the
# search itself runs by default in test_no_repeat_ngram on the prefix LM (the encoder-decoder's
# in the slow set).
@pytest.mark.slow
@pytest.mark.parametrize('family', decoding.FAMILIES)
def test_beam_search(family):
  cfg, params, tokens, seg = setup(family)
  greedy = decoding.greedy(family, cfg, params, tokens, seg, max_new=10)
  one = decoding.beam_search(family, cfg, params, tokens, seg, max_new=10, beams=1, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(greedy))
  four = decoding.beam_search(family, cfg, params, tokens, seg, max_new=10, beams=4, eos_id=-1)
  score = lambda c: np.asarray(decoding.sequence_log_prob(family, cfg, params, tokens, seg, c, -1))
  assert (score(four) >= score(greedy) - 1e-4).all() and (score(four) > score(greedy) + 1e-4).any()
  # After a hypothesis ends, only EOS follows.
  eos = int(np.asarray(greedy)[0, 2])
  ended = np.asarray(
    decoding.beam_search(family, cfg, params, tokens, seg, max_new=10, beams=3, eos_id=eos)
  )
  assert (ended == eos).any(axis=1)[0]  # Row 0 ends (greedy's third token is its EOS here).
  for row in ended:
    hits = np.flatnonzero(row == eos)
    if len(hits):
      assert (row[hits[0] :] == eos).all()


def test_sharded_decoding_matches_one_device():
  cfg, params, tokens, seg = setup('decoder')
  model = decoder.Model(cfg)
  expected = np.asarray(decoding.greedy('decoder', cfg, params, tokens, seg, max_new=8))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  rules = sharding.DEFAULT_RULES
  with sharding.use(mesh, rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(tokens))
    params = jax.device_put(params, sharding.tree_shardings(boxed, mesh, rules))
    batch = sharding.put_batch({'tokens': tokens, 'segment_ids': seg}, mesh, rules)
    got = decoding.greedy('decoder', cfg, params, batch['tokens'], batch['segment_ids'], max_new=8)
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_prefix_prompt_is_read_bidirectionally():
  """A prefix-LM prompt scores a continuation differently from the same prompt read causally,
  except for one-token prompts, where the two masks coincide."""
  cfg, params, tokens, seg = setup('decoder')
  continuation = decoding.greedy('decoder', cfg, params, tokens, seg, max_new=6)
  score = lambda family: np.asarray(
    decoding.sequence_log_prob(family, cfg, params, tokens, seg, continuation, -1)
  )
  differs = ~np.isclose(score('decoder'), score('prefix_lm'), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(differs, [len(p) > 1 for p in PROMPTS])


def test_repeated_ngram_tokens():
  seqs = jnp.asarray([[1, 2, 3, 1, 2, 0, 0], [4, 4, 4, 0, 0, 0, 0]])
  banned = lambda t, n: [
    set(np.flatnonzero(r)) for r in np.asarray(decoding.repeated_ngram_tokens(seqs, t, n, 8))
  ]
  assert banned(5, 3) == [{3}, set()]  # "1 2" was followed by 3.
  assert banned(5, 2) == [{3}, {0}]  # "2" was followed by 3; row 2 by "0 0" at positions 3-4.
  assert banned(4, 2) == [{2}, set()] and banned(3, 2) == [set(), {4}]
  assert banned(3, 1) == [{1, 2, 3}, {4}]
  assert banned(1, 3) == [set(), set()] and banned(5, 0) == [set(), set()]


# The encoder-decoder's in the slow set: both layouts ban with decoding.repeated_ngram_tokens
# (test_repeated_ngram_tokens checks it alone), and the prefix LM's runs by default.
@pytest.mark.parametrize('family', ['prefix_lm', pytest.param('encdec', marks=pytest.mark.slow)])
def test_no_repeat_ngram(family):
  """A random model loops; with no_repeat_ngram=2 no bigram comes twice, in greedy or beam
  search, and an n longer than the output changes nothing."""
  cfg, params, tokens, seg = setup(family)
  plain = np.asarray(decoding.greedy(family, cfg, params, tokens, seg, max_new=24))
  bigrams = lambda row: list(zip(row[:-1], row[1:]))
  assert any(len(set(bigrams(r))) < len(bigrams(r)) for r in plain)  # It does loop.
  for out in (
    decoding.greedy(family, cfg, params, tokens, seg, max_new=24, no_repeat_ngram=2),
    decoding.beam_search(
      family, cfg, params, tokens, seg, max_new=24, beams=3, eos_id=-1, no_repeat_ngram=2
    ),
  ):
    assert all(len(set(bigrams(r))) == len(bigrams(r)) for r in np.asarray(out))
  long = decoding.greedy(family, cfg, params, tokens, seg, max_new=24, no_repeat_ngram=25)
  np.testing.assert_array_equal(np.asarray(long), plain)
