"""Lesson 08's exercise in plain torch: N blocks in an nn.ModuleList, depth from the config."""

import torch
from torch import nn

from torch_ref.block import TransformerBlock
from torch_ref.config import as_config
from torch_ref.norm import make_norm
from torch_ref.pipeline import TransformerInput


class Transformer(nn.Module):
    """ids (B, L) -> (B, L, D): `input` -> `blocks` (nn.ModuleList) -> `final_norm` (if configured).

    Checkpoint keys: input.embed.weight, input.pos.weight, input.token_type.weight, input.norm.*,
    blocks.{i}.{attn,ln1,ln2,ff}.*, final_norm.*, lm_head.* (untied head).
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

    def forward(self, ids, attention_mask=None, token_type_ids=None):
        x = self.hidden_states(ids, attention_mask, token_type_ids)[-1]
        if self.config.final_norm:
            x = self.final_norm(x)
        return x

    def hidden_states(self, ids, attention_mask=None, token_type_ids=None):
        """(n_layers + 1, B, L, D): the input of block 1, then each block's output (before final_norm)."""
        outs = [self.input(ids, token_type_ids)]
        for block in self.blocks:
            outs.append(block(outs[-1], attention_mask))
        return torch.stack(outs)

    def prefill(self, ids, attention_mask, cache_len: int):
        """A left-padded prompt (B, P) -> (hidden (B, P, D), cache): see flax_impl's Transformer.prefill.
        The cache is a dict: k, v lists of (B, K, S, H) per layer, key_mask (B, S), index, next_position (B,)."""
        B, P = ids.shape
        mask = torch.ones(B, P, dtype=torch.long) if attention_mask is None else attention_mask.long()
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P): pads get 0, as transformers
        x, ks, vs = self.input(ids, positions=positions), [], []
        for block in self.blocks:
            x, (k, v) = block.prefill(x, mask, positions, cache_len)
            ks.append(k)
            vs.append(v)
        key_mask = torch.zeros(B, cache_len, dtype=torch.bool)
        key_mask[:, :P] = mask.bool()
        cache = dict(k=ks, v=vs, key_mask=key_mask, index=P, next_position=mask.sum(dim=1))
        return self._final(x), cache

    def decode(self, ids, cache):
        """(B, L) new tokens at slots cache["index"].. -> (hidden (B, L, D), the updated cache)."""
        B, L = ids.shape
        index = cache["index"]
        positions = cache["next_position"][:, None] + torch.arange(L)  # (B, L)
        key_mask = cache["key_mask"].clone()
        key_mask[:, index : index + L] = True
        x, ks, vs = self.input(ids, positions=positions), [], []
        for n, block in enumerate(self.blocks):
            x, (k, v) = block.decode(x, (cache["k"][n], cache["v"][n]), index, key_mask, positions)
            ks.append(k)
            vs.append(v)
        cache = dict(k=ks, v=vs, key_mask=key_mask, index=index + L, next_position=cache["next_position"] + L)
        return self._final(x), cache

    def _final(self, x):
        return self.final_norm(x) if self.config.final_norm else x

    def logits(self, hidden):
        """LM head: (B, L, D) -> (B, L, V): tied (hidden @ input.embed.weight.T) or the `lm_head` Linear."""
        if self.config.lm_head == "untied":
            return self.lm_head(hidden)
        return self.input.embed.attend(hidden)
