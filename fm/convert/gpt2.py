"""GPT-2 <-> fm's decoder with LayerNorm, a GELU MLP, learned positions and biases
(fm/models/decoder.py's `norm`, `mlp`, `positions` and `bias` fields).

The HF layout: `transformer.wte` and `.wpe`, per layer `ln_1`, `attn.c_attn` (queries, keys and
values fused), `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, then `transformer.ln_f`; the
head is tied to `wte`. Its projections are Conv1D, stored (inputs, outputs): fm's layout.
"""

from fm.convert._common import matches, refuse

MODEL_TYPES = ('gpt2',)
FAMILY = 'decoder'
OBJECTIVE = 'causal_lm'  # What a backbone of this family was pretrained with.
ACTIVATIONS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}
# What the layout pins (besides the activation and as many key/value heads as query heads).
LAYOUT = dict(
  norm='layer',
  positions='learned',
  bias=True,
  tie_embeddings=True,
  scale_tied_logits=False,
  qkv_bias=False,
  rope_scaling=(),
  norm_position='pre',
  embed_norm=False,
  token_types=0,
  mlm_head=False,
  attention_scale=0.0,  # head_dim**-0.5, as HF's.
)


def config(hf: dict) -> dict:
  """fm decoder Config fields from a GPT-2 config.json; what fm cannot compute is refused."""
  unsupported = {
    f'activation_function {hf.get("activation_function")!r}': hf.get('activation_function')
    not in ACTIVATIONS,
    'scale_attn_by_inverse_layer_idx': bool(hf.get('scale_attn_by_inverse_layer_idx')),
    'unscaled attention (scale_attn_weights false)': not hf.get('scale_attn_weights', True),
    'add_cross_attention': bool(hf.get('add_cross_attention')),
    'an untied head (tie_word_embeddings false)': not hf.get('tie_word_embeddings', True),
  }
  refuse('gpt2', unsupported)
  d, heads = hf['n_embd'], hf['n_head']
  return dict(
    **LAYOUT,
    vocab_size=hf['vocab_size'],
    num_layers=hf['n_layer'],
    d_model=d,
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=d // heads,
    mlp_dim=hf.get('n_inner') or 4 * d,
    max_len=hf['n_positions'],
    mlp=ACTIVATIONS[hf['activation_function']],
    norm_eps=float(hf['layer_norm_epsilon']),
  )


def hf_config(fields: dict) -> dict:
  activation = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu'}[fields['mlp']]
  return {
    'architectures': ['GPT2LMHeadModel'],
    'model_type': 'gpt2',
    'vocab_size': fields['vocab_size'],
    'n_positions': fields['max_len'],
    'n_embd': fields['d_model'],
    'n_layer': fields['num_layers'],
    'n_head': fields['num_heads'],
    'n_inner': fields['mlp_dim'],
    'activation_function': activation,
    'layer_norm_epsilon': fields['norm_eps'],
    'tie_word_embeddings': True,
    'scale_attn_weights': True,
    'torch_dtype': 'float32',
  }


def exports(fields: dict) -> bool:
  """Whether GPT-2's layout holds a model of these decoder fields."""
  return (
    matches(LAYOUT, fields)
    and fields['mlp'] in ('gelu_tanh', 'gelu')
    and fields['num_kv_heads'] == fields['num_heads']
    and fields['head_dim'] * fields['num_heads'] == fields['d_model']  # HF: n_embd // n_head.
  )


def exported(fields: dict, flat: dict) -> tuple[dict, dict]:
  return fields, flat


def tensors(fields: dict) -> list[tuple]:
  """(fm path or fused paths, HF name, n_in, 'conv1d'): see fm/convert/__init__.py."""
  out = [
    ('embed/embedding', 'transformer.wte.weight', 0),
    ('pos_embed', 'transformer.wpe.weight', 0),
  ]
  for i in range(fields['num_layers']):
    hf, fm = f'transformer.h.{i}.', f'layer_{i}/'
    qkv = tuple(fm + f'attn/{n}' for n in ('query', 'key', 'value'))
    out += [
      (fm + 'attn_norm/scale', hf + 'ln_1.weight', 0),
      (fm + 'attn_norm/bias', hf + 'ln_1.bias', 0),
      (qkv, hf + 'attn.c_attn.weight', 1, 'conv1d'),
      (tuple(p + '_bias' for p in qkv), hf + 'attn.c_attn.bias', -1),
      (fm + 'attn/out', hf + 'attn.c_proj.weight', 2, 'conv1d'),
      (fm + 'attn/out_bias', hf + 'attn.c_proj.bias', 0),
      (fm + 'mlp_norm/scale', hf + 'ln_2.weight', 0),
      (fm + 'mlp_norm/bias', hf + 'ln_2.bias', 0),
      (fm + 'mlp/up', hf + 'mlp.c_fc.weight', 1, 'conv1d'),
      (fm + 'mlp/up_bias', hf + 'mlp.c_fc.bias', 0),
      (fm + 'mlp/down', hf + 'mlp.c_proj.weight', 1, 'conv1d'),
      (fm + 'mlp/down_bias', hf + 'mlp.c_proj.bias', 0),
    ]
  out += [
    ('final_norm/scale', 'transformer.ln_f.weight', 0),
    ('final_norm/bias', 'transformer.ln_f.bias', 0),
  ]
  return out
