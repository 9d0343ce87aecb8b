"""BERT-style bidirectional transformer encoder with a tied masked-LM head.

The same blocks as the decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) with every token
attending to every token of its own packed document. Dimensions as in decoder.py.
`Model(model_cfg).apply(params, tokens_BL, segment_ids_BL, positions_BL) -> logits_BLV` (MLM
logits). It reads a whole text bidirectionally, so a classifier pools the mean (the default POOL)
and it does not write targets (no SEQ2SEQ layout).
"""

import functools

from fm.models import decoder

Config = decoder.Config
inputs = decoder.inputs
param_count = decoder.param_count
flops_per_token = decoder.flops_per_token  # Counts the full attention square already.
VARIANTS = {
  **{k: decoder.VARIANTS[k] for k in ('tiny', 'mini', 'small')},
  # BERT-base shape, for planning.
  'bert-base': dict(
    num_layers=12,
    d_model=768,
    num_heads=12,
    num_kv_heads=12,
    head_dim=64,
    mlp_dim=3072,
    max_len=512,
    vocab_size=30522,
  ),
}
Model = functools.partial(decoder.Model, causal=False)
