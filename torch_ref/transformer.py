"""The Transformer in plain torch, the twin of flax_impl/transformer.py: N blocks in an nn.ModuleList, depth from
the config, one loop over them for the forward, the per-layer hidden states and cached decoding."""

import torch
from torch import nn

from torch_ref.block import TransformerBlock
from torch_ref.cache import KVCache, advance, init_cache
from torch_ref.config import as_config
from torch_ref.masks import layer_kinds
from torch_ref.norm import make_norm
from torch_ref.pipeline import TransformerInput


class Transformer(nn.Module):
    """ids (B, L) -> (B, L, D): `input` -> `blocks` (nn.ModuleList) -> `final_norm` (if configured).

    Checkpoint keys: input.embed.weight, input.pos.weight, input.token_type.weight, input.norm.*,
    blocks.{i}.{attn,ln1,ln2,post_attn_norm,post_ff_norm,ff}.*, final_norm.*, lm_head.* (untied head).
    """

    def __init__(self, config):
        super().__init__()
        config = as_config(config)
        self.config = config
        self.input = TransformerInput(config)
        self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        if config.final_norm:
            self.final_norm = make_norm(config)
        if config.lm_head == "untied":
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)

    def forward(self, ids, attention_mask=None, positions=None, token_type_ids=None, cache: KVCache | None = None):
        """(B, L, D) after final_norm; with a cache (from `init_cache`, written in place), (hidden, cache). The
        arguments as flax_impl's Transformer.__call__."""
        x, _ = self._run(ids, attention_mask, positions, token_type_ids, cache, collect=False)
        return x if cache is None else (x, cache)

    def hidden_states(self, ids, attention_mask=None, positions=None, token_type_ids=None):
        """(n_layers + 1, B, L, D): the input of block 1, then each block's output (before final_norm)."""
        return self._run(ids, attention_mask, positions, token_type_ids, None, collect=True)[1]

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KVCache (torch_ref.cache.init_cache) in the model's parameter dtype."""
        return init_cache(self.config, batch, max_len, dtype=self.input.embed.weight.dtype)

    def default_positions(self, ids, attention_mask):
        """(B, L) positions by the config's positions_from / position_offset, or None for 0 .. L - 1."""
        cfg = self.config
        if cfg.positions_from == "index" or (cfg.positions_from == "mask" and attention_mask is None):
            if cfg.position_offset == 0:
                return None
            return (cfg.position_offset + torch.arange(ids.shape[1])).expand(ids.shape)
        real = attention_mask != 0 if cfg.positions_from == "mask" else ids != cfg.padding_idx
        count = real.long().cumsum(dim=1)
        return (torch.where(real, count, 0) + cfg.position_offset - 1).clamp(min=0)

    def _run(self, ids, attention_mask, positions, token_type_ids, cache, collect: bool):
        B, L = ids.shape
        if positions is not None and positions.dim() == 1:
            positions = positions.expand(B, L)
        cache_index = 0
        if cache is None:
            positions = self.default_positions(ids, attention_mask) if positions is None else positions
            layer_mask = attention_mask
        else:
            real = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask != 0
            cache_index = cache.index
            positions = advance(cache, real)
            layer_mask = cache.key_mask
        x = self.input(ids, token_type_ids, positions)
        outs = [x]
        for n, (block, kind) in enumerate(zip(self.blocks, layer_kinds(self.config), strict=True)):
            layer_cache = None if cache is None else (cache.k[n], cache.v[n])
            x = block(x, layer_mask, positions, kind, layer_cache, cache_index)
            x = x if cache is None else x[0]
            outs.append(x)
        hidden = self.final_norm(x) if self.config.final_norm else x
        return hidden, torch.stack(outs) if collect else None

    def logits(self, hidden):
        """LM head: (B, L, D) -> (B, L, V): tied (hidden @ input.embed.weight.T) or the `lm_head` Linear; divided by
        logits_scaling (Granite), then soft-capped to c tanh(logits / c), c = final_logit_softcap (Gemma 2)."""
        cfg = self.config
        logits = self.lm_head(hidden) if cfg.lm_head == "untied" else self.input.embed.attend(hidden)
        if cfg.logits_scaling != 1:
            logits = logits / cfg.logits_scaling
        if cfg.final_logit_softcap is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits
