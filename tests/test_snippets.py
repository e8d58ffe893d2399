"""Every ``python`` snippet of README.md and docs/ runs as written (``make lint`` type-checks the same snippets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SNIPPETS = [
    pytest.param(code, id=f"{page.relative_to(ROOT)}:{n}")
    for page in PAGES
    for n, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8")), 1)
]


def test_the_readme_has_python_snippets():
    assert len(BLOCK.findall(PAGES[0].read_text(encoding="utf-8"))) >= 2


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # what a snippet writes (lightning_logs/...) lands here
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "snippet"})
