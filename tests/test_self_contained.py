"""The repository stands on its own: no user-facing file points at documents a user of the repository does
not have (the development workspace's notes, papers and tracker), and every docs/ page it cites exists.

CHANGELOG.md is exempt: it is history, and its entries keep the words they were written with.
experiments/results/ is exempt too: generated reports, rewritten only when the experiments run again.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = ("CHANGELOG.md", "experiments/results/")
# written in pieces so that this file does not match itself
FORBIDDEN = [
    re.compile(r"\.\./" + "shared"),                     # a sibling folder of the checkout
    re.compile("shared/" + r"(DATA|eval_api|papers)"),   # the workspace's data notes, eval interface, papers
    re.compile(r"(?<![\w/])" + "DATA" + r"\.md"),          # the same notes by name (docs/data.md is ours)
    re.compile("CONTRACT" + r"\.md"),
    re.compile(r"\bissues?\s+#?\d+\b", re.IGNORECASE),  # a tracker's issue number
]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".sh", ".toml", ".cfg", ".ini", ""}


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / n for n in names.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        files = [p for p in ROOT.rglob("*") if p.is_file() and not any(
            part.startswith(".") or part in ("__pycache__", "build", "dist") for part in p.relative_to(ROOT).parts)]
    return [f for f in files if f.is_file() and f.suffix in TEXT_SUFFIXES
            and not str(f.relative_to(ROOT)).startswith(EXEMPT)]


def test_no_file_points_outside_the_repository() -> None:
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(pattern.search(line) for pattern in FORBIDDEN):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_cited_docs_pages_exist() -> None:
    cited = set()
    for path in tracked_files():
        try:
            cited |= set(re.findall(r"\bdocs/[a-z_]+\.md\b", path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    assert {"docs/data.md", "docs/api.md"} <= cited
    assert all((ROOT / page).is_file() for page in cited), sorted(p for p in cited if not (ROOT / p).is_file())
