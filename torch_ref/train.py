"""Training twin in plain torch: torch.optim.AdamW, LambdaLR warmup + cosine, clip_grad_norm_, parameter groups.

Batches as in flax_impl.train (same keys, torch tensors or numpy):
`inputs` (B, L), `targets` (B, L), `weights` (B, L) (1 = counts in the loss), optional `attention_mask` (B, L)
(1 = real token). Loss = sum(weights * CE) / max(sum(weights), 1), CE in nats through the tied head. The Flax
twin's rules: the batch checked first (`flax_impl.validation.check_train_batch`: shapes, targets in [0, V) or
IGNORE_INDEX = -100, which counts for nothing, weights finite and >= 0); a weight-0 position never changes the
loss; no position with weight > 0 gives loss 0 and gradient 0; float16 parameters are refused by
`make_optimizer` (AdamW's state underflows in float16).

AdamW (torch's decoupled form): p <- p * (1 - lr_t * weight_decay), then p <- p - lr_t * m_hat / (sqrt(v_hat) +
eps), eps outside the square root, bias-corrected; TrainConfig gives every hyper-parameter explicitly.

Example:
    >>> optimizer, scheduler = make_optimizer(twin, tcfg)
    >>> metrics = train_step(twin, optimizer, scheduler, batch, tcfg.clip_norm)   # {"loss", "grad_norm"}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flax_impl.validation import IGNORE_INDEX, ArgumentTypeError, check_param_dtype_trains, check_train_batch
from torch_ref.config import TrainConfig

DecayRule = Callable[[str, nn.Module], bool]


def lr_lambda(tcfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at update t (0-based): t / warmup during warmup, then
    r + (1 - r) * (1 + cos(pi * min(t - warmup, T) / T)) / 2 with T = total - warmup, r = end_lr_ratio.

    Args:
        tcfg: warmup_steps, total_steps, end_lr_ratio.

    Returns:
        t -> multiplier, for torch.optim.lr_scheduler.LambdaLR.
    """
    warmup, span, r = tcfg.warmup_steps, tcfg.total_steps - tcfg.warmup_steps, tcfg.end_lr_ratio

    def f(t: int) -> float:
        if t < warmup:
            return t / warmup
        progress = min(t - warmup, span) / span
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def default_decay(name: str, module: nn.Module) -> bool:
    """Weight decay for the weight matrices of nn.Linear and the attention's packed `in_proj_weight` only; no
    decay for biases, LayerNorm weights, token or position embeddings. `name` is the parameter's own name
    (e.g. "weight"), `module` the module that owns it."""
    return (isinstance(module, nn.Linear) and name == "weight") or name == "in_proj_weight"


def param_groups(model: nn.Module, weight_decay: float, decay: DecayRule = default_decay) -> list[dict[str, Any]]:
    """The model's parameters in two AdamW groups, decayed and not.

    Args:
        model: the module to train.
        weight_decay: the decayed group's rate.
        decay: (parameter's own name, owning module) -> whether it is decayed.

    Returns:
        [{"params": decayed, "names": their state_dict keys, "weight_decay": weight_decay},
        {"params": the rest, "names": ..., "weight_decay": 0.0}].
    """
    groups = {True: ([], []), False: ([], [])}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            params, names = groups[bool(decay(p_name, module))]
            params.append(p)
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return [
        {"params": groups[True][0], "names": groups[True][1], "weight_decay": weight_decay},
        {"params": groups[False][0], "names": groups[False][1], "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, tcfg: TrainConfig, *, decay: DecayRule = default_decay
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` plus the LambdaLR schedule: the twin of flax_impl.train.make_optimizer.

    Call `scheduler.step()` after each `optimizer.step()` (`train_step` does).

    Args:
        model: the module to train.
        tcfg: the optimiser settings (shared with flax_impl.train).
        decay: (parameter's own name, owning module) -> whether it is decayed; default `default_decay`.

    Returns:
        (optimizer, scheduler).

    Raises:
        TypeError: `tcfg` is not a TrainConfig.
        ValueError: a float16 parameter (the Flax twin's reason).
    """
    if not isinstance(tcfg, TrainConfig):
        raise ArgumentTypeError(f"tcfg={tcfg!r:.60} must be a TrainConfig, got {type(tcfg).__name__}")
    half = [name for name, p in model.named_parameters() if p.dtype == torch.float16]
    if half:
        check_param_dtype_trains("float16", where=f"dtype of {half[0]} (and {len(half) - 1} more)")
    optimizer = torch.optim.AdamW(
        param_groups(model, tcfg.weight_decay, decay),
        lr=tcfg.learning_rate,
        betas=(tcfg.b1, tcfg.b2),
        eps=tcfg.eps,
        weight_decay=tcfg.weight_decay,
        amsgrad=False,
        foreach=False,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    return optimizer, scheduler


def _tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(x).to(dtype)


def loss_sums(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the tied-head logits (float32) against `targets`, in nats, summed with the batch's weights.

    Args:
        model: a Transformer (or any module with `forward(inputs, mask)` and `logits`).
        batch: {"inputs", "targets", "weights"} (B, L), optional {"attention_mask"} (B, L); tensors or numpy.

    Returns:
        (sum of weights * CE, sum of weights), two float32 scalars; IGNORE_INDEX targets count as weight 0.

    Raises:
        ValueError, TypeError, IndexError: as `flax_impl.validation.check_train_batch`, before any work.
    """
    check_train_batch({k: _numpy(v) for k, v in batch.items()}, model.config.vocab_size)
    mask = batch.get("attention_mask")
    mask = None if mask is None else _tensor(mask, torch.long)
    hidden = model(_tensor(batch["inputs"], torch.long), mask)  # (B, L, D)
    logits = model.logits(hidden).float()  # (B, L, V)
    targets = _tensor(batch["targets"], torch.long).flatten()
    ce = nn.functional.cross_entropy(
        logits.flatten(0, 1), targets, reduction="none", ignore_index=IGNORE_INDEX
    )  # (B*L,)
    w = _tensor(batch["weights"], torch.float32).flatten()
    w = torch.where(targets == IGNORE_INDEX, torch.zeros(()), w)
    terms = torch.where(w > 0, ce * w, torch.zeros(()))  # weight 0: nothing, even from a NaN logit
    return terms.sum(), w.sum()


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy (nats) over the positions with weight 1; 0 if no position counts."""
    total, count = loss_sums(model, batch)
    return total / count.clamp(min=1.0)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: dict[str, Any],
    clip_norm: float | None,
) -> dict[str, float]:
    """One update: zero_grad -> loss.backward -> clip_grad_norm_ (if clip_norm) -> optimizer.step ->
    scheduler.step. The twin of flax_impl.train.train_step.

    Args:
        model: the module being trained (in train mode for dropout).
        optimizer: from `make_optimizer`.
        scheduler: from `make_optimizer`.
        batch: as `loss_sums` reads it.
        clip_norm: the global gradient norm to clip to, or None.

    Returns:
        {"loss": the loss before the update, "grad_norm": the gradient norm before clipping}.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if clip_norm is not None:
        norm = nn.utils.clip_grad_norm_(params, clip_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    optimizer.step()
    scheduler.step()
    return {"loss": float(loss.detach()), "grad_norm": float(norm)}
