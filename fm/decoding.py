"""Generation with a KV cache, jitted and sharded like training: greedy and beam search, for
decoders continuing a prompt (`family='decoder'`, causal; `'prefix_lm'`, the prompt read
bidirectionally as a prefix-LM fine-tuned model saw it) and encoder-decoders (`'encdec'`).

Decoder prompts are left-padded to one length (segment id 0 = padding), so every row's next
token is read at the same position; the prompt fills the cache in one call (prefill), then one
token per step is appended inside `lax.scan`. An encoder-decoder encodes its (right-padded)
inputs once and starts its decoder from token 0 (targets are shifted right by one, as in
training). `*_uncached` recompute the whole sequence each step: the references of the tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fm.models import decoder, encdec


def left_pad(prompts: list[list[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, segment_ids) of prompts right-aligned in rows of `length` (default: the longest)."""
  length = length or max(map(len, prompts))
  tokens = np.zeros((len(prompts), length), np.int32)
  segment_ids = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    p = p[-length:]
    tokens[i, length - len(p) :], segment_ids[i, length - len(p) :] = p, 1
  return tokens, segment_ids


def _positions(segment_ids_BL):
  return jnp.maximum(jnp.cumsum(segment_ids_BL > 0, axis=1) - 1, 0).astype(jnp.int32)


def _decoder_start(model_cfg, params, tokens_BP, segment_ids_BP, max_new, prefix=False):
  model = decoder.Model(model_cfg, decode=True)
  B, P = tokens_BP.shape
  cache = model.apply(params, jnp.zeros((B, P + max_new), jnp.int32), mutable=['cache'])[1]
  positions_BP = _positions(segment_ids_BP)
  logits, cache = model.apply(
    {**params, **cache},
    tokens_BP,
    segment_ids_BP,
    positions_BP,
    segment_ids_BP > 0 if prefix else None,
    mutable=['cache'],
  )

  def step(carry, token_B):
    cache, position_B = carry
    logits, cache = model.apply(
      {**params, **cache},
      token_B[:, None],
      jnp.ones_like(token_B)[:, None],
      position_B[:, None],
      mutable=['cache'],
    )
    return logits[:, -1], (cache, position_B + 1)

  return logits[:, -1], (cache, positions_BP[:, -1] + 1), step


def _encdec_start(model_cfg, params, inputs_BS, input_seg_BS, max_new):
  encoded = encdec.Model(model_cfg).apply(params, inputs_BS, None, input_seg_BS, encode_only=True)
  model = encdec.Model(model_cfg, decode=True)
  B = inputs_BS.shape[0]
  run = lambda variables, tokens_BL: model.apply(
    variables,
    inputs_BS,
    tokens_BL,
    input_seg_BS,
    jnp.ones_like(tokens_BL),
    encoded_BSD=encoded,
    mutable=['cache'],
  )
  cache = run(params, jnp.zeros((B, max_new), jnp.int32))[1]
  logits, cache = run({**params, **cache}, jnp.zeros((B, 1), jnp.int32))  # The start token.

  def step(cache, token_B):
    logits, cache = run({**params, **cache}, token_B[:, None])
    return logits[:, -1], cache

  return logits[:, -1], cache, step


FAMILIES = ('decoder', 'prefix_lm', 'encdec')


def _start(family: str, vocab_limit: int | None = None):
  """The family's start function; with `vocab_limit`, ids from it on (padding of the vocabulary,
  sentinels, mode tokens) are never generated."""
  start = {
    'decoder': _decoder_start,
    'prefix_lm': functools.partial(_decoder_start, prefix=True),
    'encdec': _encdec_start,
  }[family]
  if vocab_limit is None:
    return start
  limit = lambda logits_BV: jnp.where(
    (jnp.arange(logits_BV.shape[-1]) < vocab_limit)[None], logits_BV, -jnp.inf
  )

  def limited(*args):
    logits_BV, carry, step = start(*args)
    return limit(logits_BV), carry, lambda c, t: (lambda out: (limit(out[0]), out[1]))(step(c, t))

  return limited


def repeated_ngram_tokens(seqs_RT, t, n: int, vocab: int):
  """(R, V) True for each token that, generated at position `t`, would repeat an n-gram of
  `seqs_RT[:, :t]` (the tokens generated so far; the prompt does not count, so a source may be
  copied). No token is banned before n - 1 tokens exist."""
  R, T = seqs_RT.shape
  if n < 1 or T < n:
    return jnp.zeros((R, vocab), bool)
  if n == 1:
    seen_RT = jnp.broadcast_to(jnp.arange(T) < t, (R, T))
    return jnp.zeros((R, vocab), bool).at[jnp.arange(R)[:, None], seqs_RT].max(seen_RT)
  last_RN = jax.lax.dynamic_slice_in_dim(seqs_RT, jnp.maximum(t - (n - 1), 0), n - 1, axis=1)
  windows_RJN = jnp.stack([seqs_RT[:, k : T - n + 1 + k] for k in range(n - 1)], axis=-1)
  following_RJ = seqs_RT[:, n - 1 :]
  ended_1J = (jnp.arange(T - n + 1) <= t - n)[None]  # The whole n-gram lies before t.
  match_RJ = jnp.all(windows_RJN == last_RN[:, None, :], axis=-1) & ended_1J
  return jnp.zeros((R, vocab), bool).at[jnp.arange(R)[:, None], following_RJ].max(match_RJ)


def _full_decoder_logits(family, model_cfg, params, tokens_BP, segment_ids_BP, continuation_BT):
  """Logits at every position of prompt + continuation, without a cache."""
  B, T = continuation_BT.shape
  seq = jnp.concatenate([tokens_BP, continuation_BT], axis=1)
  seg = jnp.concatenate([segment_ids_BP, jnp.ones((B, T), jnp.int32)], axis=1)
  prefix = None
  if family == 'prefix_lm':
    prefix = jnp.concatenate([segment_ids_BP > 0, jnp.zeros((B, T), bool)], axis=1)
  return decoder.Model(model_cfg).apply(params, seq, seg, _positions(seg), prefix)


@functools.partial(
  jax.jit, static_argnames=('family', 'model_cfg', 'max_new', 'vocab_limit', 'no_repeat_ngram')
)
def greedy(
  family: str,
  model_cfg,
  params,
  tokens,
  segment_ids,
  max_new: int,
  vocab_limit: int | None = None,
  no_repeat_ngram: int = 0,
):
  """(B, max_new) greedy continuations (decoder: of left-padded prompts; encdec: of inputs).
  With `no_repeat_ngram` = n > 0, no n-gram of the continuation occurs twice."""
  logits_BV, carry, step = _start(family, vocab_limit)(
    model_cfg, params, tokens, segment_ids, max_new
  )
  seqs_BT = jnp.zeros((tokens.shape[0], max_new), jnp.int32)

  def pick(logits_BV, seqs_BT, t):
    banned_BV = repeated_ngram_tokens(seqs_BT, t, no_repeat_ngram, logits_BV.shape[-1])
    next_B = jnp.argmax(jnp.where(banned_BV, -jnp.inf, logits_BV), -1).astype(jnp.int32)
    return next_B, seqs_BT.at[:, t].set(next_B)

  first_B, seqs_BT = pick(logits_BV, seqs_BT, 0)

  def body(state, t):
    carry, token_B, seqs_BT = state
    logits_BV, carry = step(carry, token_B)
    next_B, seqs_BT = pick(logits_BV, seqs_BT, t)
    return (carry, next_B, seqs_BT), None

  (_, _, seqs_BT), _ = jax.lax.scan(body, (carry, first_B, seqs_BT), jnp.arange(1, max_new))
  return seqs_BT


def _reorder(cache, rows_R):
  """Cache rows gathered by `rows_R` (beam reordering); scanned layers keep batch on axis 1."""

  def gather(path, x):
    axis = 1 if 'layers' in jax.tree_util.keystr(path, simple=True, separator='/').split('/') else 0
    return jnp.take(x, rows_R, axis=axis) if x.ndim > axis else x

  return jax.tree_util.tree_map_with_path(gather, cache)


@functools.partial(
  jax.jit,
  static_argnames=(
    'family',
    'model_cfg',
    'max_new',
    'beams',
    'eos_id',
    'vocab_limit',
    'no_repeat_ngram',
  ),
)
def beam_search(
  family: str,
  model_cfg,
  params,
  tokens,
  segment_ids,
  max_new: int,
  beams: int,
  eos_id: int,
  length_penalty: float = 0.6,
  vocab_limit: int | None = None,
  no_repeat_ngram: int = 0,
):
  """(B, max_new) best of `beams` hypotheses per row by log-probability / ((5 + length) / 6)
  ** length_penalty (GNMT). A hypothesis ends at `eos_id`; later slots hold `eos_id`. With
  `no_repeat_ngram` = n > 0, no hypothesis extends into an n-gram it holds already."""
  B, K = tokens.shape[0], beams
  repeat = lambda x: jnp.repeat(x, K, axis=0)
  logits_RV, carry, step = _start(family, vocab_limit)(
    model_cfg, params, repeat(tokens), repeat(segment_ids), max_new
  )
  V = logits_RV.shape[-1]
  # Only the first of the K identical beams starts alive, so the first step picks K tokens.
  scores_BK = jnp.tile(jnp.r_[0.0, jnp.full(K - 1, -jnp.inf)], (B, 1))
  done_BK = jnp.zeros((B, K), bool)
  lengths_BK = jnp.zeros((B, K), jnp.int32)
  seqs_BKT = jnp.zeros((B, K, max_new), jnp.int32)

  def extend(state, t):
    carry, logits_RV, scores_BK, done_BK, lengths_BK, seqs_BKT = state
    log_p_BKV = jax.nn.log_softmax(logits_RV).reshape(B, K, V)
    banned_BKV = repeated_ngram_tokens(seqs_BKT.reshape(B * K, -1), t, no_repeat_ngram, V).reshape(
      B, K, V
    )
    log_p_BKV = jnp.where(banned_BKV, -jnp.inf, log_p_BKV)
    # A finished hypothesis only extends with EOS, at no cost.
    eos_only_V = jnp.where(jnp.arange(V) == eos_id, 0.0, -jnp.inf)
    log_p_BKV = jnp.where(done_BK[..., None], eos_only_V[None, None], log_p_BKV)
    total_BKV = scores_BK[..., None] + log_p_BKV
    scores_BK, flat_BK = jax.lax.top_k(total_BKV.reshape(B, K * V), K)
    parent_BK, token_BK = flat_BK // V, (flat_BK % V).astype(jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, parent_BK, axis=1)
    lengths_BK = pick(lengths_BK) + ~pick(done_BK)
    done_BK = pick(done_BK) | (token_BK == eos_id)
    seqs_BKT = jnp.take_along_axis(seqs_BKT, parent_BK[..., None], axis=1).at[:, :, t].set(token_BK)
    rows_R = (jnp.arange(B)[:, None] * K + parent_BK).reshape(-1)
    logits_RV, carry = step(_reorder(carry, rows_R), token_BK.reshape(-1))
    return (carry, logits_RV, scores_BK, done_BK, lengths_BK, seqs_BKT), None

  state = (carry, logits_RV, scores_BK, done_BK, lengths_BK, seqs_BKT)
  state, _ = jax.lax.scan(extend, state, jnp.arange(max_new))
  _, _, scores_BK, _, lengths_BK, seqs_BKT = state
  normalised_BK = scores_BK / ((5.0 + lengths_BK) / 6.0) ** length_penalty
  best_B = jnp.argmax(normalised_BK, axis=1)
  return jnp.take_along_axis(seqs_BKT, best_B[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=('family', 'model_cfg', 'max_new'))
def greedy_uncached(family: str, model_cfg, params, tokens, segment_ids, max_new: int):
  """The greedy continuations again, recomputing the full sequence at every step."""
  B = tokens.shape[0]
  if family != 'encdec':
    P = tokens.shape[1]
    seq = jnp.concatenate([tokens, jnp.zeros((B, max_new), jnp.int32)], axis=1)
    logits_at = lambda seq, t: _full_decoder_logits(
      family, model_cfg, params, tokens, segment_ids, seq[:, P:]
    )[:, P + t - 1]
  else:
    P = 1  # The decoder input starts with token 0.
    seq = jnp.zeros((B, max_new + 1), jnp.int32)
    logits_at = lambda seq, t: encdec.Model(model_cfg).apply(params, tokens, seq, segment_ids)[:, t]

  def body(seq, t):
    next_B = jnp.argmax(logits_at(seq, t), -1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice(seq, next_B[:, None], (0, P + t)), next_B

  _, out = jax.lax.scan(body, seq, jnp.arange(max_new))
  return out.T


def sequence_log_prob(family: str, model_cfg, params, tokens, segment_ids, continuation_BT, eos_id):
  """Log-probability of each row's continuation up to and including its first EOS."""
  B, T = continuation_BT.shape
  if family != 'encdec':
    P = tokens.shape[1]
    logits = _full_decoder_logits(family, model_cfg, params, tokens, segment_ids, continuation_BT)[
      :, P - 1 : P + T - 1
    ]
  else:
    decoder_in = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), continuation_BT[:, :-1]], axis=1)
    logits = encdec.Model(model_cfg).apply(params, tokens, decoder_in, segment_ids)
  log_p_BT = jnp.take_along_axis(jax.nn.log_softmax(logits), continuation_BT[..., None], -1)[..., 0]
  is_eos = continuation_BT == eos_id
  before_first_eos = jnp.cumsum(is_eos, axis=1) - is_eos == 0
  return jnp.sum(log_p_BT * before_first_eos, axis=1)
