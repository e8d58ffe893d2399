"""Every ``python`` snippet of the README runs as written (``make lint`` type-checks the same snippets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("n", range(1, len(BLOCKS) + 1))
def test_readme_snippet_runs(n, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a snippet writes (lightning_logs/...) lands here
    exec(compile(BLOCKS[n - 1], f"README.md python snippet {n}", "exec"), {"__name__": f"readme_snippet_{n}"})
