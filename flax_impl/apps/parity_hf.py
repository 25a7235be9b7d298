"""`flax-impl parity --hf PATH`: where the Flax model and transformers' model part ways, layer by layer.

Both load the same local Hugging Face folder (or the Flax side another one, `--flax`, e.g. the user's own port),
run the same right-padded batch in float32 eval mode with matmul precision "highest", and the table gives, per
layer, max |Flax - transformers| of the hidden states (real positions only) and of the gradients of a scalar loss
with respect to that layer's parameters (relative to the largest gradient entry of each tensor). The first layer
past its tolerance is marked; the exit status is 1 when any is.

Hidden states are read by forward hooks on transformers' layer list (the input of its first layer, then each
layer's output), so the comparison does not depend on what a family's `output_hidden_states` includes.
transformers runs with `attn_implementation="eager"` (PITFALLS: SDPA builds its masks differently).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flax_impl import tolerances


@dataclass
class LayerRow:
    layer: str  # "input", "0".."N-1", "output" (final norm / head)
    hidden_diff: float | None  # max |Flax - transformers| of this layer's output, real positions
    grad_rel: float | None  # max |dFlax - dHF| over this layer's tensors / their largest |dHF|
    hidden_tol: float
    grad_tol: float

    @property
    def ok(self) -> bool:
        hidden = self.hidden_diff is None or self.hidden_diff <= self.hidden_tol
        grad = self.grad_rel is None or self.grad_rel <= self.grad_tol
        return bool(hidden and grad)


def check_paths(hf_path: str, flax_path: str | None) -> None:
    """Misuse fails before any work: ValueError naming the path and what is missing."""
    for name, path in (("--hf", hf_path), ("--flax", flax_path)):
        if path is None:
            continue
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"{name} {path}: no config.json (a Hugging Face model folder is expected)")
        elif not (name == "--flax" and path.endswith(".safetensors") and os.path.isfile(path)):
            raise ValueError(f"{name} {path}: not a Hugging Face model folder" + (
                " or a .safetensors file of flax_impl.save" if name == "--flax" else ""
            ))


def _layer_list(module: Any, n_layers: int) -> Any:
    """transformers' list of its n_layers decoder / encoder layers (the ModuleList of that length)."""
    import torch

    found = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise ValueError(f"cannot find the one list of {n_layers} layers in {type(module).__name__}")
    return found[0]


def _hf_forward(hf_model: Any, ids: np.ndarray, mask: np.ndarray, n_layers: int) -> tuple[list, Any]:
    """(the input of layer 0 and every layer's output as (B, L, D) tensors, the model's output tensor)."""
    import torch

    layers, captured = _layer_list(hf_model, n_layers), []

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    def hook(module: Any, args: tuple, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(hook) for layer in layers]
    try:
        out = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    finally:
        for h in handles:
            h.remove()
    result = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return captured, result


def _layer_of(key: str) -> str:
    """"3" for a key of layer 3 (the first integer path component), "other" for embeddings, norms and heads."""
    match = re.search(r"\.(\d+)\.", key)
    return match.group(1) if match else "other"


MODEL_OPTIONS = ("--d-model", "--n-heads", "--heads", "--n-layers", "--layers", "--d-ff", "--table-length")


def check_options(args: argparse.Namespace) -> None:
    """Every option of `flax-impl parity --hf`, before any work: the paths (`check_paths`), --batch >= 1,
    --length >= 2 (the padded row keeps a real token: nothing compared is no comparison), --seed, --json; the
    architecture options (the folder's config.json defines the model) refused when given.

    Raises:
        ValueError: naming the option, the bad value and what is allowed.
    """
    from flax_impl.apps import args as shared

    check_paths(args.hf, args.flax)
    given = [a.split("=")[0] for a in getattr(args, "argv", []) if a.split("=")[0] in MODEL_OPTIONS]
    if given:
        raise ValueError(f"{given[0]} does not apply with --hf: the folder's config.json defines the model")
    shared.check_at_least(args, ("batch",))
    shared.check_at_least(args, ("length",), minimum=2)
    shared.check_seed(args)
    shared.check_output_paths(args)


def load_sides(hf_path: str, flax_path: str | None = None) -> tuple[Any, Any, Any, str]:
    """(config, the Flax model, transformers' model in eval mode, model_type), every file read and checked.

    Raises:
        ValueError, OSError: a folder or file that cannot be compared (an unsupported model_type or option, a
            missing or misshaped key, a --flax of another architecture or config), before any comparison.
    """
    import torch
    import transformers

    import flax_impl as fi
    from flax_impl import hf

    cfg, model = hf.from_pretrained(hf_path)
    if flax_path is not None and os.path.isdir(flax_path):
        cfg2, model = hf.from_pretrained(flax_path)
        if cfg2 != cfg:
            raise ValueError(f"--flax {flax_path} has another architecture than --hf {hf_path}")
    elif flax_path is not None:
        fi.load(model, flax_path)
    model_type = hf.io.read_config(hf_path)["model_type"]
    auto = transformers.AutoModelForCausalLM if cfg.causal else transformers.AutoModel
    ref = auto.from_pretrained(hf_path, attn_implementation="eager", dtype=torch.float32).eval()
    return cfg, model, ref, model_type


def compare(
    hf_path: str,
    flax_path: str | None = None,
    *,
    batch: int = 2,
    length: int = 16,
    seed: int = 0,
    sides: tuple[Any, Any, Any, str] | None = None,
) -> list:
    """The per-layer rows (see the module docstring).

    Args:
        hf_path: the reference Hugging Face folder, run by transformers.
        flax_path: what the Flax side loads: another Hugging Face folder, a `flax_impl.save` .safetensors file
            (weights for the architecture of `hf_path`), or None (the same folder).
        batch: B of the random batch; its last row is right-padded by a quarter of `length`.
        length: L >= 2.
        seed: the batch's and the loss weights' seed.
        sides: `load_sides(hf_path, flax_path)` when already loaded.
    Returns:
        A list of LayerRow: "input", one per layer, "output".
    Raises:
        ValueError: `length` < 2 (the padded row would have no real token).
    """
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from flax_impl import hf

    if length < 2:
        raise ValueError(f"length={length} must be >= 2: the padded row keeps at least one real token")
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg, model, ref, model_type = sides if sides is not None else load_sides(hf_path, flax_path)

    rng = np.random.default_rng(seed)
    B, L = batch, length
    ids = rng.integers(0, cfg.vocab_size, (B, L)).astype(np.int64)
    mask = np.ones((B, L), np.int64)
    mask[-1, L - max(1, L // 4) :] = 0
    real = mask.astype(bool)

    ours_hidden = np.asarray(model.hidden_states(jnp.asarray(ids), jnp.asarray(mask)))  # (N + 1, B, L, D)
    theirs_hidden, theirs_out = _hf_forward(ref, ids, mask, cfg.n_layers)
    w = rng.standard_normal(tuple(theirs_out.shape)).astype(np.float32) * real[..., None]

    def head(m: Any) -> Any:
        h = m(jnp.asarray(ids), jnp.asarray(mask))
        return m.logits(h) if cfg.causal else h

    grads = nnx.grad(lambda m: jnp.sum(head(m) * w))(model)
    ours_out = np.asarray(head(model))
    graph, _, rest = nnx.split(model, nnx.Param, ...)
    ours_grads = hf.to_hf_state_dict(nnx.merge(graph, grads, rest), model_type)
    (theirs_out * torch.from_numpy(w)).sum().backward()
    theirs_grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}

    # Relative to the layer's largest gradient entry, not each tensor's: some tensors' exact gradient is zero
    # (BERT's key bias, which the softmax cancels), and their roundoff relative to themselves means nothing.
    diffs: dict[str, float] = {}
    scales: dict[str, float] = {}
    for key, g in theirs_grads.items():
        if key not in ours_grads:
            continue
        layer = _layer_of(key)
        diffs[layer] = max(diffs.get(layer, 0.0), float(np.abs(ours_grads[key] - g).max()))
        scales[layer] = max(scales.get(layer, 0.0), float(np.abs(g).max()))
    grad_rel = {layer: diffs[layer] / max(scales[layer], 1e-30) for layer in diffs}

    hidden_tol, grad_tol = tolerances.HF_FORWARD, tolerances.GRAD_REL
    rows = []
    for i, t in enumerate(theirs_hidden):
        diff = float(np.abs(ours_hidden[i][real] - t.detach().numpy()[real]).max())
        name = "input" if i == 0 else str(i - 1)
        rows.append(LayerRow(name, diff, None if i == 0 else grad_rel.get(str(i - 1)), hidden_tol, grad_tol))
    out_diff = float(np.abs(ours_out[real] - theirs_out.detach().numpy()[real]).max())  # logits or last hidden
    rows.append(LayerRow("output", out_diff, grad_rel.get("other"), hidden_tol, grad_tol))
    return rows


def first_divergence(rows: list[LayerRow]) -> tuple[str, str] | None:
    """Where the two part ways: (layer, "forward") for the first row whose output is past tolerance; else
    (layer, "backward") for the last row whose gradients are (the backward pass runs from the top, and a layer's
    gradients also depend on every layer above it). None when every row is within tolerance."""
    for r in rows:
        if r.hidden_diff is not None and r.hidden_diff > r.hidden_tol:
            return r.layer, "forward"
    for r in reversed(rows):
        if r.grad_rel is not None and r.grad_rel > r.grad_tol:
            return r.layer, "backward"
    return None


def format_rows(rows: list[LayerRow]) -> str:
    """The terminal table, the layer where the two part ways marked (see `first_divergence`)."""
    lines = [f"{'layer':<8}{'max |dh|':>12}{'tol':>9}{'grad rel':>12}{'tol':>9}  status"]
    first = first_divergence(rows)
    for r in rows:
        h = "-" if r.hidden_diff is None else f"{r.hidden_diff:.2e}"
        g = "-" if r.grad_rel is None else f"{r.grad_rel:.2e}"
        here = first is not None and r.layer == first[0]
        status = "ok" if r.ok else (f"PARTS WAYS HERE ({first[1]})" if here else "past tolerance")
        lines.append(f"{r.layer:<8}{h:>12}{r.hidden_tol:>9.0e}{g:>12}{r.grad_tol:>9.0e}  {status}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`flax-impl parity --hf`: 0 when every layer is within tolerance, 1 otherwise, 2 for misuse."""
    try:
        check_options(args)
        import transformers  # noqa: F401  (the reference; a test dependency, not a core one)
    except ImportError:
        print("flax-impl parity: error: --hf needs transformers (pip install 'transformers>=5,<6')", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"flax-impl parity: error: {e}", file=sys.stderr)
        return 2
    try:
        sides = load_sides(args.hf, args.flax)
    except (ValueError, OSError) as e:
        print(f"flax-impl parity: error: {e}", file=sys.stderr)
        return 2
    rows = compare(args.hf, args.flax, batch=args.batch, length=args.length, seed=args.seed, sides=sides)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], f, indent=2)
    return 0 if all(r.ok for r in rows) else 1
