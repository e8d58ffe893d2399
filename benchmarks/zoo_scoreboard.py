"""The zoo's scoreboard: every real-world NaN bug of ``tests/zoo/scenarios.py`` once, under ``recommended()``.

Per scenario: the expected cause, the causes diagnosed (every incident's, in order of first appearance),
whether they are right (every incident's cause among those the scenario accepts), false quarantines
(quarantined indices that are not truly dirty), whether the run survived (finished, or raised
NonFiniteError where the scenario expects it: an unsafe operation that recurs, a broken pipeline),
BatchBisection's forward passes (``bisection/forward_passes``) and, of those, the confirmation passes.

    python benchmarks/zoo_scoreboard.py                 # every scenario (about a minute on 2 cores)
    python benchmarks/zoo_scoreboard.py --only nan_sample,divergence --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.zoo.scenarios import BY_NAME, ZOO, Result  # noqa: E402


@dataclass
class Row:
    name: str
    expected: str
    diagnosed: list[str]
    right: bool
    false_quarantines: int
    survived: bool
    forward_passes: int
    confirm_passes: int
    seconds: float


def score(result: Result) -> Row:
    causes = list(dict.fromkeys(i.cause for i in result.incidents))
    accepted = set(result.scenario.causes)
    confirm = sum(
        i.bisection.confirm_passes if i.bisection is not None else 0 for i in result.incidents
    )
    return Row(
        name=result.scenario.name,
        expected=" or ".join(result.scenario.causes),
        diagnosed=causes,
        right=bool(causes) and set(causes) <= accepted,
        false_quarantines=len(result.false_quarantines),
        survived=result.survived,
        forward_passes=result.forward_passes,
        confirm_passes=confirm,
        seconds=result.seconds,
    )


def table(rows: list[Row]) -> str:
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = [
        "| scenario | expected cause | diagnosed | right? | false quarantines | survived | bisection passes (confirmation) |",
        "|---|---|---|---|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.expected} | {', '.join(r.diagnosed) or '(no incident)'} | {yes(r.right)} "
            f"| {r.false_quarantines} | {yes(r.survived)} | {r.forward_passes} ({r.confirm_passes}) |"
        )
    n = len(rows)
    lines.append(
        f"| **total** | | | {sum(r.right for r in rows)}/{n} | {sum(r.false_quarantines for r in rows)} "
        f"| {sum(r.survived for r in rows)}/{n} | {sum(r.forward_passes for r in rows)} "
        f"({sum(r.confirm_passes for r in rows)}) |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated scenario names, of: {', '.join(BY_NAME)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [s.name for s in ZOO]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose among {', '.join(BY_NAME)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo_") as root:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows.append(score(BY_NAME[name].run(Path(root) / name)))
    print(table(rows))
    print(f"\n(torch {torch.__version__}, {torch.get_num_threads()} threads; total wall time {time.perf_counter() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
