"""The committed study results (``results/``), read for the app's Study page.

Every report folder holds ``report.md`` (text, Markdown tables, figure references) next to
its PNG figures; ``results/index.toml`` gives the reports' order, titles and the commands
that produced them. Only files inside a report's folder are ever read, whatever a
report's figure references say.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

#: The results committed with the code (a checkout's ``results/``).
DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "results"
INDEX, REPORT = "index.toml", "report.md"
FIGURE_RE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


@dataclass
class Report:
    """One committed report: where, what it is, how it was made, and its content as
    ``("markdown", text)`` and ``("figure", path)`` blocks in reading order."""

    folder: Path
    title: str
    summary: str = ""
    commands: list[str] = field(default_factory=list)
    blocks: list[tuple[str, object]] = field(default_factory=list)

    @property
    def figures(self) -> list[Path]:
        return [b for kind, b in self.blocks if kind == "figure"]


def blocks(text: str, folder: Path) -> list[tuple[str, object]]:
    """A report's Markdown split around its figures, without its top-level heading (the
    page titles each report). A figure is kept only if it is a PNG directly inside
    ``folder`` (a reference elsewhere is dropped, never followed)."""
    text = re.sub(r"\A\s*# [^\n]*\n", "", text)
    out, pos = [], 0
    for match in FIGURE_RE.finditer(text):
        out.append(("markdown", text[pos:match.start()]))
        path = folder / Path(match.group(2)).name
        if Path(match.group(2)).name == match.group(2) and path.is_file():
            out.append(("figure", path))
        pos = match.end()
    out.append(("markdown", text[pos:]))
    return [(kind, b) for kind, b in out if kind == "figure" or b.strip()]


def load_reports(root: Path | str = DEFAULT_RESULTS) -> list[Report]:
    """The reports under ``root``: those ``index.toml`` lists, in its order, then any
    other folder with a ``report.md``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"results folder {root} does not exist")
    try:
        index = tomllib.loads((root / INDEX).read_text()) if (root / INDEX).is_file() else {}
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{root / INDEX}: invalid TOML ({exc})") from None
    listed = {(root / e["folder"]).resolve(): e for e in index.get("report", [])}
    found = [p.parent.resolve() for p in sorted(root.glob(f"**/{REPORT}"))]
    order = [f for f in listed if f in found] + [f for f in found if f not in listed]
    reports = []
    for folder in order:
        entry = listed.get(folder, {})
        text = (folder / REPORT).read_text(errors="replace")
        reports.append(Report(folder, entry.get("title", folder.name), entry.get("summary", ""),
                              list(entry.get("commands", [])), blocks(text, folder)))
    return reports
