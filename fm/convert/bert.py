"""BERT (masked LM) <-> fm's encoder with post-norm LayerNorm blocks, learned positions, token
types, an embedding norm and the MLM transform (fm/models/decoder.py's fields; encoder.py).

The HF layout: `bert.embeddings.{word,position,token_type}_embeddings` and `.LayerNorm`, per
layer `attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
`intermediate.dense`, `output.{dense,LayerNorm}`, then `cls.predictions.transform.{dense,
LayerNorm}` and `cls.predictions.bias`; the output is tied to the word embeddings. Projections
are stored (outputs, inputs). Every token reads as token type 0, as when HF is given no types.
"""

from fm.convert._common import matches, refuse

MODEL_TYPES = ('bert',)
FAMILY = 'encoder'
OBJECTIVE = 'masked_lm'
ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh'}
# What the layout pins (besides the activation, token types and plain multi-head attention).
LAYOUT = dict(
  norm='layer',
  positions='learned',
  bias=True,
  norm_position='post',
  embed_norm=True,
  mlm_head=True,
  tie_embeddings=True,
  scale_tied_logits=False,
  qkv_bias=False,
  rope_scaling=(),
  attention_scale=0.0,  # head_dim**-0.5, as HF's.
)


def config(hf: dict) -> dict:
  unsupported = {
    f'hidden_act {hf.get("hidden_act")!r}': hf.get('hidden_act', 'gelu') not in ACTIVATIONS,
    f'position_embedding_type {hf.get("position_embedding_type")!r}': hf.get(
      'position_embedding_type', 'absolute'
    )
    != 'absolute',
    'is_decoder': bool(hf.get('is_decoder')),
  }
  refuse('bert', unsupported, 'encoder')
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  return dict(
    **LAYOUT,
    vocab_size=hf['vocab_size'],
    num_layers=hf['num_hidden_layers'],
    d_model=d,
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=d // heads,
    mlp_dim=hf['intermediate_size'],
    max_len=hf['max_position_embeddings'],
    mlp=ACTIVATIONS[hf.get('hidden_act', 'gelu')],
    token_types=hf.get('type_vocab_size', 2),
    norm_eps=float(hf.get('layer_norm_eps', 1e-12)),
  )


def hf_config(fields: dict) -> dict:
  return {
    'architectures': ['BertForMaskedLM'],
    'model_type': 'bert',
    'vocab_size': fields['vocab_size'],
    'hidden_size': fields['d_model'],
    'num_hidden_layers': fields['num_layers'],
    'num_attention_heads': fields['num_heads'],
    'intermediate_size': fields['mlp_dim'],
    'hidden_act': {'gelu': 'gelu', 'gelu_tanh': 'gelu_new'}[fields['mlp']],
    'max_position_embeddings': fields['max_len'],
    'type_vocab_size': fields['token_types'],
    'layer_norm_eps': fields['norm_eps'],
    'position_embedding_type': 'absolute',
    'tie_word_embeddings': True,
    'torch_dtype': 'float32',
  }


def exports(fields: dict) -> bool:
  """Whether BERT's layout holds a model of these encoder fields."""
  return (
    matches(LAYOUT, fields)
    and fields['token_types'] > 0
    and fields['mlp'] in ('gelu', 'gelu_tanh')
    and fields['num_kv_heads'] == fields['num_heads']
    and fields['head_dim'] * fields['num_heads'] == fields['d_model']
  )


def exported(fields: dict, flat: dict) -> tuple[dict, dict]:
  return fields, flat


def tensors(fields: dict) -> list[tuple]:
  """(fm path, HF name, n_in): see fm/convert/__init__.py."""
  e = 'bert.embeddings.'
  out = [
    ('embed/embedding', e + 'word_embeddings.weight', 0),
    ('pos_embed', e + 'position_embeddings.weight', 0),
    ('type_embed', e + 'token_type_embeddings.weight', 0),
    ('embed_norm/scale', e + 'LayerNorm.weight', 0),
    ('embed_norm/bias', e + 'LayerNorm.bias', 0),
  ]
  for i in range(fields['num_layers']):
    hf, fm = f'bert.encoder.layer.{i}.', f'layer_{i}/'
    for n in ('query', 'key', 'value'):
      out += [
        (fm + f'attn/{n}', hf + f'attention.self.{n}.weight', 1),
        (fm + f'attn/{n}_bias', hf + f'attention.self.{n}.bias', -1),
      ]
    out += [
      (fm + 'attn/out', hf + 'attention.output.dense.weight', 2),
      (fm + 'attn/out_bias', hf + 'attention.output.dense.bias', 0),
      (fm + 'attn_norm/scale', hf + 'attention.output.LayerNorm.weight', 0),
      (fm + 'attn_norm/bias', hf + 'attention.output.LayerNorm.bias', 0),
      (fm + 'mlp/up', hf + 'intermediate.dense.weight', 1),
      (fm + 'mlp/up_bias', hf + 'intermediate.dense.bias', 0),
      (fm + 'mlp/down', hf + 'output.dense.weight', 1),
      (fm + 'mlp/down_bias', hf + 'output.dense.bias', 0),
      (fm + 'mlp_norm/scale', hf + 'output.LayerNorm.weight', 0),
      (fm + 'mlp_norm/bias', hf + 'output.LayerNorm.bias', 0),
    ]
  p = 'cls.predictions.'
  out += [
    ('mlm/dense', p + 'transform.dense.weight', 1),
    ('mlm/dense_bias', p + 'transform.dense.bias', 0),
    ('mlm/norm/scale', p + 'transform.LayerNorm.weight', 0),
    ('mlm/norm/bias', p + 'transform.LayerNorm.bias', 0),
    ('mlm_bias', p + 'bias', 0),
  ]
  return out
