"""Read the package's docstrings (Google style with a little reST) as Markdown for mkdocstrings.

A griffe extension, loaded by ``mkdocs.yml``; the package's docstrings stay as they are (doctests run them):

- ``>>>`` examples become ``pycon`` code blocks wherever they are (not only under ``Examples:``);
- reST roles (``:class:`~a.b.C` ``) become inline code (``C``);
- simple reST tables (``====  ====`` borders) become Markdown tables.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _is_border(line: str) -> bool:
    return bool(re.fullmatch(r"\s*=+(\s+=+)+\s*", line))


def _table(lines: list[str], indent: str) -> list[str]:
    """A reST simple table (border, header, border, rows, border) as a Markdown table."""
    border = lines[0]
    spans = [m.span() for m in re.finditer(r"=+", border)]
    rows: list[list[str]] = []
    for line in lines[1:]:
        if _is_border(line):
            continue
        cells = [line[a : (spans[i + 1][0] if i + 1 < len(spans) else len(line))].strip() for i, (a, _) in enumerate(spans)]
        if rows and not cells[0]:  # a continuation line: append to the row above
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    out = [indent + "| " + " | ".join(rows[0]) + " |", indent + "|" + "---|" * len(spans)]
    out += [indent + "| " + " | ".join(row) + " |" for row in rows[1:]]
    return out


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its doctests fenced, its roles as code and its tables in Markdown."""
    text = ROLE.sub(_role, text)
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        indent = line[: len(line) - len(line.lstrip())]
        if line.lstrip().startswith(">>>"):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out += [indent + "```pycon", *lines[i:j], indent + "```"]
            i = j
        elif _is_border(line):
            j, borders = i + 1, 1
            while j < len(lines) and borders < 3:
                borders += _is_border(lines[j])
                j += 1
            out += _table(lines[i:j], indent)
            i = j
        else:
            out.append(line)
            i += 1
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Rewrite every docstring with :func:`to_markdown` as it is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
