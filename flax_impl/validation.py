"""Argument checks by type, written once, read by the configs, the library and the torch twins.

Pure Python (numpy only where an array is inspected): `flax_impl.config` and `torch_ref` import it, jax never.

The rule, everywhere (docs/conventions.md#bad-input):
- a value of the wrong *type* raises `ArgumentTypeError`: a `TypeError` that is also a `ValueError`, so that code
  which catches ValueError for "a bad setting" (the commands, the Hugging Face config reader) still catches it.
  A bool is not an integer (`True` is refused where a count is expected), a str is never a number, None only
  where the argument documents it;
- a value of the right type outside its range or set (NaN, inf, a negative count, an unknown name) raises
  `ValueError`.
Each message names the argument, repeats the value (`repr`) and says what is allowed, e.g.
`n_heads=0 must be an integer >= 1` or `norm_eps=inf must be a finite number > 0`. Every checker returns the
value as a plain Python value: builtin ints and floats as they are (an int stays an int where a number is
expected, so a config written back to a file keeps its types), numpy scalars converted, so a config's
`to_dict()` stays JSON-serialisable.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "ArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_json_kind",
    "check_param_dtype_trains",
    "check_train_batch",
]

# Targets equal to this are left out of the loss on both twins (torch's and Hugging Face's convention).
IGNORE_INDEX = -100


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError for callers that catch bad settings as such."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_bool(name: str, value: object, *, none_ok: bool = False) -> bool | None:
    """`value` itself if it is a bool (or None when `none_ok`).

    Raises:
        ArgumentTypeError: anything else, "False" and 0 included (they would be read by truthiness).
    """
    if value is None and none_ok:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = "a bool (True or False)" + (" or None" if none_ok else "")
        raise ArgumentTypeError(f"{name}={value!r} must be {allowed}, got {type(value).__name__}")
    return bool(value)


def check_int(
    name: str, value: object, *, low: int | None = None, high: int | None = None, none_ok: bool = False
) -> int | None:
    """`value` as an int, checked to lie in [low, high) (either bound optional).

    Raises:
        ArgumentTypeError: not an integer (a bool, a float such as 2.0, a str), or None when not `none_ok`.
        ValueError: outside [low, high).
    """
    if value is None and none_ok:
        return None
    if low is not None and high is not None:
        allowed = f"an integer in [{low}, {high})"
    elif low is not None:
        allowed = f"an integer >= {low}"
    else:
        allowed = "an integer" + (f" < {high}" if high is not None else "")
    allowed += " or None" if none_ok else ""
    if not _is_int(value):
        raise ArgumentTypeError(f"{name}={value!r} must be {allowed}, got {type(value).__name__}")
    value = int(value)  # type: ignore[arg-type]
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name}={value!r} must be {allowed}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    none_ok: bool = False,
) -> float | None:
    """`value` as a finite float within the bounds (closed unless `*_open`; either optional). Ints are numbers.

    Raises:
        ArgumentTypeError: not a real number (a bool, a str such as "1e-5"), or None when not `none_ok`.
        ValueError: NaN, +-inf, or outside the bounds.
    """
    if value is None and none_ok:
        return None
    bounds = _bounds(low, high, low_open, high_open)
    allowed = "a finite number" + (f" {bounds}" if bounds else "") + (" or None" if none_ok else "")
    if not _is_real(value):
        raise ArgumentTypeError(f"{name}={value!r} must be {allowed}, got {type(value).__name__}")
    value = value if type(value) in (int, float) else float(value)  # type: ignore[arg-type]
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name}={value!r} must be {allowed}")
    return value


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """`value` if it is one of the `allowed` strings.

    Raises:
        ArgumentTypeError: not a str.
        ValueError: a str not in `allowed`.
    """
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name}={value!r} is not one of {list(allowed)}: got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
    return value


# The kinds of value a JSON file (a Hugging Face config.json) may hold where a field is read, by the rules above: a
# bool is not a number, a str is neither a number nor a bool, a number is finite. "a|b" admits either kind; a
# trailing "?" admits null.
JSON_KINDS = {
    "bool": "a bool (true or false)",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "list[str]": "a list of strings",
}


def check_json_kind(name: str, value: object, kind: str) -> None:
    """Check one value read from a JSON file against its declared kind (`JSON_KINDS`, "a|b", "?" for null).

    Args:
        name: the key, as the message shows it (e.g. "attn_config.alibi").
        value: the value as `json.load` gives it.
        kind: e.g. "bool", "int?", "float", "float|str?", "list[str]?".
    Raises:
        ArgumentTypeError: a value of another kind ("false" where a bool belongs, 2.0 where an integer does).
        ValueError: a number that is NaN or infinite where a "float" belongs.
    """
    kinds = kind.rstrip("?").split("|")
    unknown = [k for k in kinds if k not in JSON_KINDS]
    if unknown:
        raise ValueError(f"kind={kind!r} of {name}: {unknown} not in {sorted(JSON_KINDS)}")
    if value is None and kind.endswith("?"):
        return
    allowed = " or ".join(JSON_KINDS[k] for k in kinds) + (" or null" if kind.endswith("?") else "")
    tests = {
        "bool": lambda v: isinstance(v, (bool, np.bool_)),
        "int": _is_int,
        "float": _is_real,
        "str": lambda v: isinstance(v, str),
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    }
    if not any(tests[k](value) for k in kinds):
        raise ArgumentTypeError(f"{name}={value!r} must be {allowed}, got {type(value).__name__}")
    if "float" in kinds and _is_real(value) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be {allowed}")


def check_param_dtype_trains(param_dtype: str, where: str = "param_dtype") -> None:
    """Refuse float16 parameters for AdamW training, up front (a command can call this before any work).

    Raises:
        ValueError: `param_dtype` is "float16", with the reason and what to use instead.
    """
    if param_dtype == "float16":
        raise ValueError(
            f"{where}='float16' does not train with AdamW: eps=1e-8 and the squared gradients underflow to 0 in "
            "float16 and the first update is NaN; use float32 parameters with float16 compute "
            "(FlaxConfig(dtype='float16', param_dtype='float32'))"
        )


# ------------------------------------------------------------------------------------------- training batches
def check_train_batch(batch: Any, vocab_size: int, *, values: bool = True) -> None:
    """Check a training batch before the loss is computed: the same rules on both twins.

    Shapes and dtypes are always checked; with `values` (arrays with concrete values, not jax tracers) also
    the targets' range and the weights' sign. Targets equal to `IGNORE_INDEX` (-100) are left out of the loss
    whatever their weight.

    Args:
        batch: a mapping with "inputs", "targets", "weights" (B, L) and optional "attention_mask" (B, L); numpy
            arrays, CPU torch tensors or jax arrays (anything `np.shape` / `np.asarray` read).
        vocab_size: V, the number of logits: targets must be in [0, V) or IGNORE_INDEX.
        values: also check the values (False for traced arrays under `jit`).

    Raises:
        ArgumentTypeError: `batch` not a mapping; targets not integers; weights not real numbers.
        ValueError: a key missing; shapes that differ from `inputs`' (B, L); a weight negative or not finite.
        IndexError: a target outside [0, V) that is not IGNORE_INDEX, naming it, its position and V.
    """
    if not hasattr(batch, "keys") or not hasattr(batch, "__getitem__"):
        raise ArgumentTypeError(f"batch must be a dict of arrays, got {type(batch).__name__}")
    missing = [k for k in ("inputs", "targets", "weights") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch holds 'inputs', 'targets', 'weights' (B, L)")
    shape = tuple(np.shape(batch["inputs"]))
    if len(shape) != 2:
        raise ValueError(f"batch['inputs'] must have shape (B, L), got {shape}")
    for key in ("targets", "weights", "attention_mask"):
        if key in batch and batch[key] is not None and tuple(np.shape(batch[key])) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(np.shape(batch[key]))}, not inputs' (B, L) = {shape}")
    t_kind, w_kind = _dtype_kind(batch["targets"]), _dtype_kind(batch["weights"])
    if t_kind not in "iu":
        raise ArgumentTypeError(f"batch['targets'] must be integer token ids, got dtype kind {t_kind!r}")
    if w_kind not in "iufb":
        raise ArgumentTypeError(f"batch['weights'] must be real numbers >= 0, got dtype kind {w_kind!r}")
    if not values:
        return
    targets = np.asarray(batch["targets"])
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise IndexError(
            f"batch['targets'] holds {int(targets[pos])} at {pos}: targets must be in [0, vocab_size={vocab_size})"
            f" or {IGNORE_INDEX} (ignored); {int(bad.sum())} target(s) out of range"
        )
    weights = np.asarray(batch["weights"], dtype=np.float64)
    if not np.all(np.isfinite(weights) & (weights >= 0)):
        pos = tuple(int(i) for i in np.argwhere(~(np.isfinite(weights) & (weights >= 0)))[0])
        raise ValueError(f"batch['weights'] holds {float(weights[pos])!r} at {pos}: weights must be finite and >= 0")


def _dtype_kind(x: Any) -> str:
    """numpy's dtype kind letter of an array of any of the three libraries (torch: through its numpy twin)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return np.asarray(x).dtype.kind
    try:
        return np.dtype(dtype).kind
    except TypeError:  # a torch dtype: torch.int64 -> "i" etc., without importing torch
        name = str(dtype).removeprefix("torch.")
        if name == "bool":
            return "b"
        return {"int": "i", "uin": "u", "flo": "f", "bfl": "f", "com": "c"}.get(name[:3], "O")
