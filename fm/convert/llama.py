"""Llama 2 / 3.x, Mistral and Qwen2 (q/k/v biases) <-> fm's decoder (fm/models/decoder.py).

The HF layout: `model.embed_tokens`, per layer `input_layernorm`, `self_attn.{q,k,v,o}_proj`,
`post_attention_layernorm`, `mlp.{gate,up,down}_proj`, then `model.norm` and `lm_head` (absent
when tied). HF stores a projection as (outputs, inputs) and queries and keys in the rotate-half
order that fm's RoPE uses, so a weight is its transpose reshaped: no permutation.
"""

from fm.convert._common import matches, refuse
from fm.models import decoder

MODEL_TYPES = ('llama', 'mistral', 'qwen2')
FAMILY = 'decoder'
OBJECTIVE = 'causal_lm'  # What a backbone of this family was pretrained with.
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}
# What the layout pins: fm's own decoder (its defaults), but for q/k/v biases and RoPE scaling.
LAYOUT = {
  k: decoder.DEFAULTS[k] for k in decoder.ARCHITECTURE if k not in ('qkv_bias', 'rope_scaling')
}
# Llama 3.1's RoPE scaling keys, in the order of the decoder's Config.rope_scaling.
LLAMA3_ROPE = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')


def windowed(hf: dict) -> bool:
  """Whether some layer attends within a sliding window: every one of Mistral's; Qwen2's from
  layer max_window_layers on when use_sliding_window is set."""
  if hf['model_type'] == 'qwen2':
    layers = hf['num_hidden_layers']
    return bool(hf.get('use_sliding_window')) and hf.get('max_window_layers', layers) < layers
  return hf['model_type'] == 'mistral'


def config(hf: dict) -> dict:
  """fm decoder Config fields from an HF config.json; what fm cannot compute is refused."""
  kind = hf['model_type']
  rope = hf.get('rope_parameters') or {
    'rope_theta': hf.get('rope_theta', 10000.0),
    **(hf.get('rope_scaling') or {}),
  }
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  unsupported = {
    'hidden_act': hf.get('hidden_act', 'silu') not in ('silu', 'swish'),
    'mlp_bias': bool(hf.get('mlp_bias')),
    f'rope scaling {rope_type!r}': rope_type not in ('default', 'llama3'),
    'attention_bias (on the output projection too)': kind != 'qwen2'
    and bool(hf.get('attention_bias')),
    'sliding_window': windowed(hf)
    and (hf.get('sliding_window') or 1 << 62) < hf['max_position_embeddings'],
  }
  refuse(kind, unsupported)
  heads = hf['num_attention_heads']
  return dict(
    **LAYOUT,
    vocab_size=hf['vocab_size'],
    num_layers=hf['num_hidden_layers'],
    d_model=hf['hidden_size'],
    num_heads=heads,
    num_kv_heads=hf.get('num_key_value_heads') or heads,
    head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
    mlp_dim=hf['intermediate_size'],
    max_len=hf['max_position_embeddings'],
    rope_theta=float(rope['rope_theta']),
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    scale_tied_logits=False,
    qkv_bias=kind == 'qwen2',
    rope_scaling=tuple(float(rope[k]) for k in LLAMA3_ROPE) if rope_type == 'llama3' else (),
    norm_eps=float(hf['rms_norm_eps']),
  )


def hf_config(fields: dict) -> dict:
  """An HF config.json for fm decoder Config fields (fm's scaled tied logits are exported as an
  untied head: see `tensors`)."""
  kind = 'qwen2' if fields['qkv_bias'] else 'llama'
  tied = fields['tie_embeddings'] and not fields['scale_tied_logits']
  scaling = dict(zip(LLAMA3_ROPE, fields['rope_scaling']))
  if scaling:
    scaling['original_max_position_embeddings'] = int(scaling['original_max_position_embeddings'])
  return {
    'architectures': [ARCHITECTURES[kind]],
    'model_type': kind,
    'vocab_size': fields['vocab_size'],
    'hidden_size': fields['d_model'],
    'intermediate_size': fields['mlp_dim'],
    'num_hidden_layers': fields['num_layers'],
    'num_attention_heads': fields['num_heads'],
    'num_key_value_heads': fields['num_kv_heads'],
    'head_dim': fields['head_dim'],
    'hidden_act': 'silu',
    'max_position_embeddings': fields['max_len'],
    'rms_norm_eps': fields['norm_eps'],
    'rope_theta': fields['rope_theta'],
    'rope_parameters': {
      'rope_type': 'llama3' if scaling else 'default',
      **scaling,
      'rope_theta': fields['rope_theta'],
    },
    'rope_scaling': {'rope_type': 'llama3', **scaling} if scaling else None,
    'tie_word_embeddings': tied,
    'attention_bias': False,
    'mlp_bias': False,
    'torch_dtype': 'float32',
  }


def exports(fields: dict) -> bool:
  """Whether this layout holds a model of these decoder fields."""
  return matches(LAYOUT, fields)


def exported(fields: dict, flat: dict) -> tuple[dict, dict]:
  """(fields, params by path) as HF can hold them: fm's tied logits scaled by d_model**-0.5
  become an untied head holding the scaled embedding."""
  if fields['tie_embeddings'] and fields['scale_tied_logits']:
    flat = {**flat, 'lm_head': flat['embed/embedding'].T * fields['d_model'] ** -0.5}
    fields = {**fields, 'tie_embeddings': False}
  return fields, flat


def tensors(fields: dict) -> list[tuple[str, str, int]]:
  """(fm param path, HF tensor name, n_in) of every tensor: n_in > 0 marks a projection whose
  first n_in fm dims are its inputs (HF holds the transpose, flattened); 0 a tensor copied as it
  is; -1 one HF holds flattened (biases)."""
  out = [('embed/embedding', 'model.embed_tokens.weight', 0)]
  for i in range(fields['num_layers']):
    hf, fm = f'model.layers.{i}.', f'layer_{i}/'
    out += [
      (fm + 'attn_norm/scale', hf + 'input_layernorm.weight', 0),
      (fm + 'attn/query', hf + 'self_attn.q_proj.weight', 1),
      (fm + 'attn/key', hf + 'self_attn.k_proj.weight', 1),
      (fm + 'attn/value', hf + 'self_attn.v_proj.weight', 1),
      (fm + 'attn/out', hf + 'self_attn.o_proj.weight', 2),
      (fm + 'mlp_norm/scale', hf + 'post_attention_layernorm.weight', 0),
      (fm + 'mlp/gate', hf + 'mlp.gate_proj.weight', 1),
      (fm + 'mlp/up', hf + 'mlp.up_proj.weight', 1),
      (fm + 'mlp/down', hf + 'mlp.down_proj.weight', 1),
    ]
    if fields['qkv_bias']:
      out += [
        (fm + f'attn/{n}_bias', hf + f'self_attn.{n[0]}_proj.bias', -1)
        for n in ('query', 'key', 'value')
      ]
  out.append(('final_norm/scale', 'model.norm.weight', 0))
  if not fields['tie_embeddings']:
    out.append(('lm_head', 'lm_head.weight', 1))
  return out
