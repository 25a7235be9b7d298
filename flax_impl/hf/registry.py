"""The registry of family tables: `register_family` checks a table and adds it; `family` looks one up.

The built-in tables register themselves in `flax_impl.hf.families`; a user's table is registered from Python
(`flax_impl.hf.register_family(Family(...))`) or, for commands run in their own process (`flax-impl generate`,
`flax-impl parity --hf`), by an installed package that names it under the entry-point group
`flax_impl.hf_families` (the entry point's object: a `Family` or a sequence of them), loaded the first time a
model_type is not found. See docs/adding-a-family.md.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Mapping
from typing import Any

from flax_impl.config import TransformerConfig
from flax_impl.hf.layouts import LAYOUTS, Layout
from flax_impl.hf.spec import Convert, Derived, Family, Field, Key, Require
from flax_impl.validation import JSON_KINDS

ENTRY_POINT_GROUP = "flax_impl.hf_families"
FAMILIES: dict[str, Family] = {}
_entry_points_loaded = False
_OUR_FIELDS = frozenset(f.name for f in dataclasses.fields(TransformerConfig))


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Check a family table and make `from_pretrained` / `save_pretrained` (and the commands) use it for its
    model_type.

    Args:
        family: the table (`flax_impl.hf.spec.Family`).
        replace: replace a table already registered for the same model_type (a built-in one included).
    Returns:
        The family.
    Raises:
        TypeError: `family` is not a Family.
        ValueError: the table is malformed (one message listing every problem: an unknown TransformerConfig
            field, JSON kind or layout, a template placeholder other than {i}, {p}, {part}, ...), or its
            model_type is registered already and `replace` is False.
    """
    check_family(family)
    old = FAMILIES.get(family.model_type)
    if old is not None and not replace:
        raise ValueError(
            f"model_type={family.model_type!r} is registered already (architecture {old.architecture}); "
            "pass replace=True to replace its table"
        )
    FAMILIES[family.model_type] = family
    return family


def family(model_type: object) -> Family:
    """The table for a Hugging Face model_type; ValueError naming the supported ones otherwise."""
    if isinstance(model_type, str) and model_type not in FAMILIES:
        load_entry_points()
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def load_entry_points() -> None:
    """Register the tables that installed packages name under `ENTRY_POINT_GROUP` (once per process; a table
    whose model_type is registered already is skipped: built-in and Python-registered tables win).

    Raises:
        ValueError: an entry point that cannot be loaded or does not give Family tables, naming it.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # an ImportError or whatever the plugin's module raises
            raise ValueError(f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP}: {err}") from err
        tables = [obj] if isinstance(obj, Family) else list(obj) if isinstance(obj, (list, tuple)) else [obj]
        for table in tables:
            if not isinstance(table, Family):
                raise ValueError(
                    f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP} gives a {type(table).__name__}, "
                    "not a flax_impl.hf.spec.Family (or a list of them)"
                )
            if table.model_type not in FAMILIES:
                register_family(table)


# ---------------------------------------------------------------------------------------------------------------
# Checking a table.


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _kind_problem(where: str, kind: object) -> str | None:
    if not isinstance(kind, str) or any(k not in JSON_KINDS for k in kind.rstrip("?").split("|")):
        return f"{where}: kind={kind!r} is not a JSON kind ({sorted(JSON_KINDS)}, 'a|b', a trailing '?')"
    return None


def _entries(fam: Family, name: str, cls: type) -> tuple[list[Any], list[str]]:
    value = getattr(fam, name)
    if not isinstance(value, tuple):
        return [], [f"{name} must be a tuple of {cls.__name__}, got {type(value).__name__}"]
    bad = [f"{name}[{n}] is a {type(e).__name__}, not a {cls.__name__}" for n, e in enumerate(value)
           if not isinstance(e, cls)]  # fmt: skip
    return [e for e in value if isinstance(e, cls)], bad


def _config_problems(fam: Family) -> list[str]:
    fields, problems = _entries(fam, "config", Field)
    for f in fields:
        if f.ours not in _OUR_FIELDS:
            problems.append(f"Field {f.hf!r}: ours={f.ours!r} is not a TransformerConfig field")
        if not isinstance(f.convert, Convert):
            problems.append(f"Field {f.hf!r}: convert is a {type(f.convert).__name__}, not a Convert")
        else:
            problems += [p for k, (_, kind) in f.convert.reads.items() if (p := _kind_problem(f"reads {k!r}", kind))]
        problems += [p for p in [_kind_problem(f"Field {f.hf!r}", f.kind)] if p]
    requires, bad = _entries(fam, "require", Require)
    problems += bad
    for r in requires:
        problems += [p for p in [_kind_problem(f"Require {r.hf!r}", r.kind)] if p]
        if r.check is None and not r.allowed:
            problems.append(f"Require {r.hf!r} names neither the allowed values nor a check")
    derived, bad = _entries(fam, "derived", Derived)
    problems += bad
    if not isinstance(fam.fixed, Mapping):
        problems.append(f"fixed must be a mapping of TransformerConfig fields, got {type(fam.fixed).__name__}")
    else:
        problems += [f"fixed: {k!r} is not a TransformerConfig field" for k in fam.fixed if k not in _OUR_FIELDS]
    return problems


def _key_problems(key: Key) -> list[str]:
    where, problems = f"Key {key.hf!r}", []
    if not (isinstance(key.layout, Layout) or key.layout in LAYOUTS):
        problems.append(f"{where}: layout={key.layout!r} is neither a Layout nor one of {sorted(LAYOUTS)}")
    ours = key.ours_templates
    if not ours or not all(isinstance(t, str) and t for t in ours):
        return [*problems, f"{where}: ours={key.ours!r} must be a template or a tuple of templates"]
    names = [_placeholders(t) for t in ours]
    if any(n - {"i", "p"} for n in names) or any(n != names[0] for n in names):
        problems.append(f"{where}: our templates {list(ours)} must use the same placeholders among {{i}}, {{p}}")
    hf_names = _placeholders(key.hf)
    if hf_names - {"i", "p", "part"} or hf_names - {"part"} != names[0]:
        problems.append(f"{where}: its placeholders {sorted(hf_names)} must be ours ({sorted(names[0])}) + 'part'")
    if ("part" in hf_names) != bool(key.parts):
        problems.append(f"{where}: {{part}} in the template and parts={key.parts!r} go together")
    if key.when is not None and not callable(key.when):
        problems.append(f"{where}: when={key.when!r} must be a function of the config.json values")
    return problems


def check_family(fam: object) -> None:
    """Check a table's structure before it is registered (not its mapping: that is what the parity tests prove).

    Raises:
        TypeError: `fam` is not a Family.
        ValueError: one message naming the family and listing every problem.
    """
    if not isinstance(fam, Family):
        raise TypeError(f"a family table must be a flax_impl.hf.spec.Family, got {type(fam).__name__}")
    problems = [
        f"{name} must be a string, got {getattr(fam, name)!r}"
        for name in ("model_type", "architecture", "prefix")
        if not isinstance(getattr(fam, name), str)
    ]
    if isinstance(fam.model_type, str) and not fam.model_type:
        problems.append("model_type must not be empty")
    if fam.saved_prefix is not None and not isinstance(fam.saved_prefix, str):
        problems.append(f"saved_prefix must be a string or None, got {fam.saved_prefix!r}")
    problems += _config_problems(fam)
    keys, bad = _entries(fam, "keys", Key)
    problems += bad
    for key in keys:
        problems += _key_problems(key)
    for pattern in fam.ignore:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            problems.append(f"ignore: {pattern!r} is not a regular expression ({err})")
    if not isinstance(fam.renamed, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in fam.renamed.items()):  # fmt: skip
        problems.append(f"renamed must map old config.json keys to dotted keys, got {fam.renamed!r}")
    if problems:
        raise ValueError(f"family table {getattr(fam, 'model_type', '?')!r} is malformed:\n  " + "\n  ".join(problems))
