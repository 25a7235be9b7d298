"""Argument helpers shared by `flax-impl parity`, `bench` and `train`: the same option means the same thing in
every command, and every check runs before any work (no model is built, nothing is compiled or written before
a bad value is reported).

Errors are ValueError naming the option, the bad value and what is allowed; `fail` prints one as
`flax-impl <command>: error: ...` and returns exit status 2, as argparse does for its own errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import Any

from flax_impl.config import POSITIONS, TransformerConfig
from flax_impl.validation import check_float


def _default(value: Any, unset: str) -> str:
    return f"[{unset}]" if value is None else f"[{value}]"


def add_model_options(
    parser: argparse.ArgumentParser,
    *,
    d_model: int | None,
    n_heads: int | None,
    n_layers: int | None,
    d_ff: int | None,
    unset: str = "the config's",
    d_ff_unset: str = "4 x d_model",
) -> None:
    """--d-model, --n-heads (alias --heads), --n-layers (alias --layers), --d-ff: the architecture's sizes.

    Args:
        parser: the subcommand's parser.
        d_model, n_heads, n_layers, d_ff: the defaults; None means "not overridden" (help shows `unset`, or
            `d_ff_unset` for --d-ff).
        unset: what a None default stands for in the help text.
        d_ff_unset: what a None --d-ff stands for in the help text.
    """
    parser.add_argument("--d-model", type=int, default=d_model, help=f"model width D {_default(d_model, unset)}")
    parser.add_argument(
        "--n-heads", "--heads", dest="n_heads", type=int, default=n_heads,
        help=f"attention heads N, a divisor of D {_default(n_heads, unset)}",
    )
    parser.add_argument(
        "--n-layers", "--layers", dest="n_layers", type=int, default=n_layers,
        help=f"encoder blocks {_default(n_layers, unset)}",
    )
    parser.add_argument("--d-ff", type=int, default=d_ff, help=f"feed-forward width F {_default(d_ff, d_ff_unset)}")


def add_position_option(parser: argparse.ArgumentParser, default: str | None, unset: str = "the config's") -> None:
    """--position: one of config.POSITIONS."""
    parser.add_argument(
        "--position", choices=POSITIONS, default=default, help=f"position scheme {_default(default, unset)}"
    )


MAX_SEED = 2**32 - 1  # numpy's and JAX's seeds both take it (and seed + 1)


def add_seed_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--seed (default 0, checked by `check_seed`); `what` says what it seeds."""
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {what}, in [0, 2**32) [0]")


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--json PATH; its directory is checked before any work (`check_output_paths`)."""
    parser.add_argument("--json", metavar="PATH", help=f"also write {what} as JSON to PATH")


def add_plot_option(parser: argparse.ArgumentParser, what: str, default_text: str = "no plot") -> None:
    """--plot PATH; needs matplotlib."""
    parser.add_argument("--plot", metavar="PATH", help=f"write a PNG of {what} (needs matplotlib) [{default_text}]")


def add_mesh_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--mesh data=D,model=M (flax_impl.distributed)."""
    parser.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help=f"{what} on a (data, model) device mesh (flax_impl.distributed); on CPU simulate devices with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 [off]",
    )


def check_at_least(args: argparse.Namespace, names: Iterable[str], minimum: int = 1) -> None:
    """ValueError unless every option in `names` (dest names) is None or >= `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= {minimum}")


def check_seed(args: argparse.Namespace) -> None:
    """ValueError unless --seed is in [0, MAX_SEED]."""
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed={args.seed} must be in [0, {MAX_SEED}]")


def check_number(
    option: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "",
) -> None:
    """ValueError unless `value` is finite and within [low, high] (an open end excludes the bound).

    Args:
        option: the option's name as typed, e.g. "--lr".
        value: its parsed value (argparse's float() also accepts "nan" and "inf", which are refused here).
        low, high: the bounds; None: no bound on that side.
        low_open, high_open: exclude the bound itself.
        what: appended to the message (e.g. "(0 = off)").
    """
    try:
        check_float(option, value, low=low, high=high, low_open=low_open, high_open=high_open)
    except ValueError as error:  # the library's rule and wording (flax_impl.validation), plus `what`
        raise ValueError(f"{error}" + (f" {what}" if what else "")) from None


def check_output_dir(option: str, path: str | os.PathLike) -> None:
    """ValueError unless `path` is a writable directory or can be created as one: not a file, and its nearest
    existing ancestor is a writable directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{option} {path!r} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path!r} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path!r}: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path!r}: cannot create it, {parent!r} is not writable")


def check_output_path(option: str, path: str | os.PathLike) -> None:
    """ValueError unless `path` can be written as a file: its directory exists and is writable, and `path` is not
    a directory. Run it before any work, so a typo does not cost a whole run."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory; give a file path")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path!r}: the directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path!r}: the directory {folder!r} is not writable")


def check_output_paths(args: argparse.Namespace) -> None:
    """`check_output_path` for --json and --plot when given (and --plot is not 'none'); --plot also needs
    matplotlib."""
    if getattr(args, "json", None):
        check_output_path("--json", args.json)
    plot = getattr(args, "plot", None)
    if plot and plot.lower() != "none":
        check_output_path("--plot", plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ValueError("--plot needs matplotlib: pip install matplotlib") from err


def build_mesh(text: str, config: TransformerConfig, batch_sizes: Iterable[int]) -> Any:
    """The --mesh Mesh, checked against the devices, the model (`check_shardable`) and every batch size.

    Raises:
        ValueError: naming the option, when the sizes do not fit.
    """
    from flax_impl.distributed import check_shardable, make_mesh, parse_mesh

    try:
        mesh = make_mesh(**parse_mesh(text))
        check_shardable(config, mesh)
    except ValueError as err:
        raise ValueError(f"--mesh {text}: {err}") from None
    n = mesh.shape["data"]
    bad = sorted({b for b in batch_sizes if b % n})
    if bad:
        raise ValueError(f"--mesh {text}: batch sizes {bad} are not divisible by the data axis size {n}")
    return mesh


def fail(command: str, err: BaseException | str) -> int:
    """Print `flax-impl <command>: error: <err>` on stderr; returns 2, the exit status of bad input."""
    print(f"flax-impl {command}: error: {err}", file=sys.stderr)
    return 2
