"""The documentation's code runs: every ```python block in docs/*.md and the README's
example script (docs/examples/), so that examples cannot silently rot."""

import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def doc_blocks():
    for md in sorted((ROOT / "docs").glob("*.md")):
        for i, code in enumerate(BLOCK.findall(md.read_text())):
            yield pytest.param(code, id=f"{md.name}:{i}")


@pytest.mark.parametrize("code", list(doc_blocks()))
def test_doc_code_block_runs(code):
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def test_there_are_doc_blocks():
    assert len(list(doc_blocks())) >= 3


@pytest.mark.parametrize("script", sorted((ROOT / "docs" / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_script_runs(script):
    runpy.run_path(str(script), run_name="__main__")
