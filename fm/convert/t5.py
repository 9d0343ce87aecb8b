"""T5 1.1 / Flan-T5 (and T5 with a tied head) <-> fm's encoder-decoder (fm/models/encdec.py with
positions='relative', a gated MLP and unscaled attention logits).

The HF layout: `shared` (the embedding both stacks read), per encoder block
`layer.0.SelfAttention.{q,k,v,o}` and `layer.0.layer_norm`, `layer.1.DenseReluDense.{wi_0,
wi_1,wo}` and `layer.1.layer_norm`; per decoder block the same with `layer.1.EncDecAttention`
in between (the MLP is `layer.2`); the relative attention bias lives in block 0 of each stack
(`relative_attention_bias`, buckets x heads) and serves every block; then each stack's
`final_layer_norm` and `lm_head` (absent when tied: T5 then scales the decoder's output by
d_model**-0.5, as fm's tied head does). Projections are stored (outputs, inputs). The decoder
starts from token 0 (T5's pad), as fm's does.
"""

from fm.convert._common import matches, refuse

MODEL_TYPES = ('t5',)
FAMILY = 'encdec'
OBJECTIVE = 'span_corruption'
# T5's feed_forward_proj -> fm's gated MLP.
MLPS = {'gated-gelu': 'geglu', 'gated-silu': 'swiglu'}
LAYOUT = dict(positions='relative', attention_scale=1.0, scale_tied_logits=True)


def config(hf: dict) -> dict:
  proj = hf.get('feed_forward_proj', 'relu')
  layers = hf['num_layers']
  unsupported = {
    f'feed_forward_proj {proj!r} (T5 1.0)': proj not in MLPS,
    f'num_decoder_layers {hf.get("num_decoder_layers")} != num_layers {layers}': (
      hf.get('num_decoder_layers') or layers
    )
    != layers,
    f'decoder_start_token_id {hf.get("decoder_start_token_id")}': hf.get(
      'decoder_start_token_id', 0
    )
    != 0,
  }
  refuse('t5', unsupported, 'encoder-decoder')
  return dict(
    **LAYOUT,
    vocab_size=hf['vocab_size'],
    num_layers=layers,
    d_model=hf['d_model'],
    num_heads=hf['num_heads'],
    num_kv_heads=hf['num_heads'],
    head_dim=hf['d_kv'],
    mlp_dim=hf['d_ff'],
    max_len=hf.get('n_positions', 512),
    mlp=MLPS[proj],
    relative_buckets=hf.get('relative_attention_num_buckets', 32),
    relative_max_distance=hf.get('relative_attention_max_distance', 128),
    tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
    norm_eps=float(hf.get('layer_norm_epsilon', 1e-6)),
  )


def hf_config(fields: dict) -> dict:
  return {
    'architectures': ['T5ForConditionalGeneration'],
    'model_type': 't5',
    'vocab_size': fields['vocab_size'],
    'd_model': fields['d_model'],
    'd_kv': fields['head_dim'],
    'd_ff': fields['mlp_dim'],
    'num_layers': fields['num_layers'],
    'num_decoder_layers': fields['num_layers'],
    'num_heads': fields['num_heads'],
    'relative_attention_num_buckets': fields['relative_buckets'],
    'relative_attention_max_distance': fields['relative_max_distance'],
    'feed_forward_proj': {v: k for k, v in MLPS.items()}[fields['mlp']],
    'layer_norm_epsilon': fields['norm_eps'],
    'n_positions': fields['max_len'],
    'tie_word_embeddings': fields['tie_embeddings'],
    'is_encoder_decoder': True,
    'decoder_start_token_id': 0,
    'pad_token_id': 0,
    'eos_token_id': 1,
    'dropout_rate': 0.0,
    'torch_dtype': 'float32',
  }


def exports(fields: dict) -> bool:
  """Whether T5's layout holds a model of these encoder-decoder fields."""
  return matches(LAYOUT, fields) and fields['num_kv_heads'] == fields['num_heads']


def exported(fields: dict, flat: dict) -> tuple[dict, dict]:
  return fields, flat


def tensors(fields: dict) -> list[tuple]:
  """(fm path, HF name, n_in): see fm/convert/__init__.py."""
  out = [
    ('embed/embedding', 'shared.weight', 0),
    (
      'encoder_relative/embedding',
      'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
      0,
    ),
    (
      'decoder_relative/embedding',
      'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
      0,
    ),
  ]

  def attention(fm: str, hf: str) -> list[tuple]:
    return [
      (fm + 'query', hf + 'q.weight', 1),
      (fm + 'key', hf + 'k.weight', 1),
      (fm + 'value', hf + 'v.weight', 1),
      (fm + 'out', hf + 'o.weight', 2),
    ]

  def mlp(fm: str, hf: str) -> list[tuple]:
    return [
      (fm + 'gate', hf + 'wi_0.weight', 1),
      (fm + 'up', hf + 'wi_1.weight', 1),
      (fm + 'down', hf + 'wo.weight', 1),
    ]

  for i in range(fields['num_layers']):
    hf, fm = f'encoder.block.{i}.layer.', f'encoder_{i}/'
    out += [(fm + 'attn_norm/scale', hf + '0.layer_norm.weight', 0)]
    out += attention(fm + 'attn/', hf + '0.SelfAttention.')
    out += [(fm + 'mlp_norm/scale', hf + '1.layer_norm.weight', 0)]
    out += mlp(fm + 'mlp/', hf + '1.DenseReluDense.')
  out.append(('encoder_norm/scale', 'encoder.final_layer_norm.weight', 0))
  for i in range(fields['num_layers']):
    hf, fm = f'decoder.block.{i}.layer.', f'decoder_{i}/'
    out += [(fm + 'self_norm/scale', hf + '0.layer_norm.weight', 0)]
    out += attention(fm + 'self_attn/', hf + '0.SelfAttention.')
    out += [(fm + 'cross_norm/scale', hf + '1.layer_norm.weight', 0)]
    out += attention(fm + 'cross_attn/', hf + '1.EncDecAttention.')
    out += [(fm + 'mlp_norm/scale', hf + '2.layer_norm.weight', 0)]
    out += mlp(fm + 'mlp/', hf + '2.DenseReluDense.')
  out.append(('decoder_norm/scale', 'decoder.final_layer_norm.weight', 0))
  if not fields['tie_embeddings']:
    out.append(('lm_head', 'lm_head.weight', 1))
  return out
