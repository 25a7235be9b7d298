"""The documentation runs as written.

- Every ```python block of README.md and docs/*.md runs, top to bottom in one namespace per file, as a reader
  would run them. Pages in EIGHT_DEVICES show code for a mesh of 8 devices: their blocks run in a subprocess with 8
  simulated CPU devices (as test_distributed.py does), so that this process keeps one device.
- Every `flax-impl ...` line of a ```bash or ```console block parses with that subcommand's options.
- Relative links between the pages, and the docs/*.md#anchor links that the code cites, point at a file and
  heading that exist.

Run one page by hand with `python tests/test_docs.py docs/distributed.md`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EIGHT_DEVICES = {"docs/distributed.md"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def code_blocks(page: Path, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """(first line number, source) of each fenced block of `page` in one of `languages`."""
    text = page.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) in languages
    ]


def run_python_blocks(page: Path) -> int:
    """Exec the page's python blocks in order in one namespace; returns how many ran."""
    namespace: dict = {"__name__": "__docs__"}
    blocks = code_blocks(page, ("python",))
    for line, source in blocks:
        # Pad with blank lines so that a traceback names the line of the page.
        exec(compile("\n" * (line - 1) + source, str(page), "exec"), namespace)
    return len(blocks)


def _pages_with(languages: tuple[str, ...]) -> list[Path]:
    return [p for p in PAGES if code_blocks(p, languages)]


def test_readme_has_a_quick_start():
    assert code_blocks(ROOT / "README.md", ("python",)), "README.md has no python block"


def _python_pages() -> list:
    """Pages with python blocks; the 8-device ones are `slow` (a subprocess that starts jax and compiles afresh)."""
    slow = pytest.mark.slow
    return [pytest.param(p, marks=[slow] if _name(p) in EIGHT_DEVICES else []) for p in _pages_with(("python",))]


@pytest.mark.parametrize("page", _python_pages(), ids=_name)
def test_python_blocks_run(page: Path):
    if _name(page) not in EIGHT_DEVICES:
        assert run_python_blocks(page) > 0
        return
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, str(page)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{_name(page)} failed with 8 devices:\n{proc.stderr[-4000:]}"


def command_lines(page: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after `flax-impl`) of every `flax-impl` command in the page's bash/console blocks.

    Continuation lines are joined, `#` comments and a leading `$ ` prompt dropped, `&&` chains split, and
    leading VAR=value environment assignments skipped.
    """
    found = []
    for first, source in code_blocks(page, ("bash", "console")):
        logical, start = "", first
        for offset, raw in enumerate(source.splitlines()):
            if not logical:
                start = first + offset
            logical += raw.rstrip("\\") + " "
            if raw.endswith("\\"):
                continue
            words = shlex.split(logical.strip().removeprefix("$ "), comments=True)
            logical = ""
            command: list[str] = []
            for word in [*words, "&&"]:
                if word != "&&":
                    command.append(word)
                    continue
                while command and re.fullmatch(r"[A-Z_]+=\S*", command[0]):
                    command.pop(0)
                if command[:1] == ["flax-impl"]:
                    found.append((start, command[1:]))
                command = []
    return found


def _parse(argv: list[str]) -> None:
    """Parse argv with the `flax-impl` subcommand's own options (nothing runs); argparse exits on an error."""
    from flax_impl.apps.cli import SUBCOMMANDS

    assert argv and argv[0] in SUBCOMMANDS, f"unknown subcommand in flax-impl {' '.join(argv)}"
    parser = argparse.ArgumentParser(prog=f"flax-impl {argv[0]}")
    importlib.import_module(SUBCOMMANDS[argv[0]][0]).add_arguments(parser)
    parser.parse_args(argv[1:])


@pytest.mark.parametrize("page", _pages_with(("bash", "console")), ids=_name)
def test_command_lines_parse(page: Path):
    for line, argv in command_lines(page):
        try:
            _parse(argv)
        except SystemExit as exit_:
            pytest.fail(f"{_name(page)}:{line}: `flax-impl {shlex.join(argv)}` does not parse (exit {exit_.code})")


def test_every_command_is_documented():
    documented = {argv[0] for page in PAGES for _, argv in command_lines(page) if argv}
    from flax_impl.apps.cli import SUBCOMMANDS

    assert documented >= set(SUBCOMMANDS), f"no example of flax-impl {sorted(set(SUBCOMMANDS) - documented)}"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces -> hyphens."""
    headings = re.findall(r"^#+ (.+?)\s*$", FENCE.sub("", page.read_text(encoding="utf-8")), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _check_target(target: Path, anchor: str, where: str) -> None:
    assert target.exists(), f"{where}: {target.relative_to(ROOT)} does not exist"
    if anchor and target.suffix == ".md":
        assert anchor in anchors(target), f"{where}: no heading #{anchor} in {target.relative_to(ROOT)}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page: Path):
    for link in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", link):
            continue  # http(s)://, mailto:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if target.relative_to(ROOT).parts[:1] == ("benchmarks",) and not (ROOT / "benchmarks").exists():
            continue  # benchmarks/ holds recorded runs; checked once the folder is there
        _check_target(target, anchor, f"{_name(page)} link {link}")


def test_design_anchors_cited_by_the_code_exist():
    cited = set()
    for source in (ROOT / "flax_impl").rglob("*.py"):
        cited |= {(m.group(1), m.group(2)) for m in re.finditer(r"docs/(\w+\.md)#([\w-]+)", source.read_text())}
    assert cited, "no docs/*.md#anchor cited in flax_impl/"
    for page, anchor in sorted(cited):
        _check_target(ROOT / "docs" / page, anchor, "flax_impl/ cites")


if __name__ == "__main__":
    print(f"{run_python_blocks(Path(sys.argv[1]).resolve())} python blocks ran")
