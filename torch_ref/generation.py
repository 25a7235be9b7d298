"""Cached generation in plain torch, the same loop as flax_impl.generation run eagerly: prefill the left-padded
prompts, then one token per step from the last logits (greedy, or temperature + top-k + top-p sampling), stop
tokens, `pad_id` after a row stops. Prompts are left-padded to their longest, with no bucketing."""

from dataclasses import dataclass

import torch

from flax_impl.generation_config import GenerationConfig, left_pad, stop_lengths


@dataclass(frozen=True)
class GenerateOutput:
    """tokens (B, T) int64, lengths (B,) (stop token included), logits (B, T, V) float32 or None."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    logits: torch.Tensor | None


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k (ties with the k-th kept), then top-p: keep each token, by decreasing probability, whose preceding
    tokens' probability sum is < top_p. Removed entries become -inf. (B, V) -> (B, V) float32."""
    logits = logits.float()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs
        removed = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(removed, -float("inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    prompts,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens=(),
    pad_id: int = 0,
    return_logits: bool = False,
) -> GenerateOutput:
    """Continue each of B prompts (lists of ids) by up to max_new_tokens tokens; see flax_impl.generate
    (the same options, checked by the same flax_impl.generation_config). Sampling draws with a torch.Generator
    seeded by `seed` (not the same draws as JAX's)."""
    options = GenerationConfig(
        max_new_tokens, do_sample, temperature, top_k, top_p, seed, tuple(stop_tokens), pad_id, return_logits
    )
    options.check_vocabulary(model.config.vocab_size)
    ids, real = left_pad(prompts, None, model.config, max_new_tokens)  # (B, P), pads 0
    ids, mask = torch.from_numpy(ids), torch.from_numpy(real).long()
    B, P = ids.shape
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    stop = torch.as_tensor(options.stop_tokens, dtype=torch.long)
    h, cache = model(ids, mask, cache=model.init_cache(B, P + max_new_tokens))  # prefill fills the cache
    logits = model.logits(h[:, -1:])[:, 0].float()  # (B, V)
    done = torch.zeros(B, dtype=torch.bool)
    tokens, steps_logits = [], []
    for t in range(max_new_tokens):
        if t > 0:
            h, cache = model(tokens[-1][:, None], cache=cache)
            logits = model.logits(h)[:, 0].float()
        if do_sample:
            shifted = logits - logits.amax(dim=-1, keepdim=True)  # max 0: a tiny temperature gives -inf, not NaN
            probs = torch.softmax(filter_logits(shifted / temperature, top_k, top_p), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.tensor(pad_id), token)
        tokens.append(token)
        steps_logits.append(logits)
        done = done | torch.isin(token, stop)
        if bool(done.all()):
            break
    tokens = torch.stack(tokens, dim=1)  # (B, T)
    logits = torch.stack(steps_logits, dim=1) if return_logits else None
    return GenerateOutput(tokens, torch.from_numpy(stop_lengths(tokens.numpy(), options.stop_tokens)), logits)
