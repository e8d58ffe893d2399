"""Type-check the README's Python snippets with mypy, together with the package: ``python scripts/check_readme.py [README.md ...]``.

Each fenced ``python`` block is written to a file of its own in a temporary folder (a snippet is
read as a user would paste it: it imports what it uses), then one mypy run checks the package and
those files with the settings of pyproject.toml. A snippet that mypy should skip (a fragment, a
session transcript) uses another fence (``pycon``, ``text``). Exits with mypy's status.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets(path: Path) -> list[str]:
    """The fenced ``python`` blocks of a Markdown file, in order."""
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    docs = [Path(a) for a in argv] or [ROOT / "README.md"]
    with tempfile.TemporaryDirectory(prefix="readme_snippets_") as tmp:
        files = []
        for doc in docs:
            for n, code in enumerate(snippets(doc), 1):
                file = Path(tmp) / f"{re.sub(r'[^A-Za-z0-9]', '_', doc.stem)}_snippet_{n}.py"
                file.write_text(code, encoding="utf-8")
                files.append(str(file))
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(ROOT / "lightning_nan"), *files]
        return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
