"""Every ```python block of README.md runs as written, top to bottom in one namespace (as a reader would)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_examples_run():
    assert len(BLOCKS) >= 5
    namespace = {"__name__": "__readme__"}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
