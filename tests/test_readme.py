"""README.md's curriculum table says what spec/curriculum.py says (the table PROGRESS.md renders)."""

from __future__ import annotations

from pathlib import Path

from spec.curriculum import TOPICS

README = Path(__file__).resolve().parents[1] / "README.md"


def curriculum_rows() -> list[list[str]]:
    """The cells of each topic row of README's `## The curriculum` table, code marks removed."""
    section = README.read_text(encoding="utf-8").split("## The curriculum", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return [[cell.strip().replace("`", "") for cell in row.strip("|").split("|")] for row in rows]


def test_readme_curriculum_table_matches_the_curriculum():
    rows = curriculum_rows()
    assert [r[0] for r in rows] == [t.id for t in TOPICS], "README's table has other topic ids, or another order"
    for (id_, title, spec_file, checked), t in zip(rows, TOPICS, strict=True):
        assert title == t.title, f"{id_}: README says {title!r}, spec/curriculum.py {t.title!r}"
        assert checked == t.checked_against, f"{id_}: README checks against {checked!r}, spec/curriculum.py {t.checked_against!r}"
        expected = f"spec/{t.spec_file}" if t.spec_file else "not yet"
        assert spec_file.split(" (")[0] == expected, f"{id_}: README's spec file {spec_file!r}, expected {expected!r}"
