"""Rebuild the shipped excerpt from the full novels (run from the repository root).

    python dotmoe_ds/demo_data/make_excerpt.py /work/shared/data/austen

Each excerpt is the beginning of one novel cut at a chapter heading: the first chapter heading at or
after TARGET characters, so every excerpt holds whole chapters and the cut is reproducible.
"""
import pathlib
import re
import sys

CALIBRATION = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma"]
HELD_OUT = ["persuasion", "northangerabbey"]
TARGET = {"calibration": 60_000, "heldout": 40_000}
CHAPTER = re.compile(r"^(?:CHAPTER|Chapter) +[0-9IVXLC]+\.?\s*$", re.MULTILINE)


def excerpt(text: str, target: int) -> str:
    starts = [m.start() for m in CHAPTER.finditer(text)]
    cut = next((s for s in starts if s >= target), None)
    if cut is None:
        raise SystemExit(f"no chapter heading after {target} characters")
    return text[:cut].rstrip() + "\n"


def main(source: str) -> None:
    here = pathlib.Path(__file__).parent
    for role, books in (("calibration", CALIBRATION), ("heldout", HELD_OUT)):
        (here / role).mkdir(exist_ok=True)
        for book in books:
            text = (pathlib.Path(source) / f"{book}.txt").read_text(encoding="utf-8")
            part = excerpt(text, TARGET[role])
            (here / role / f"{book}.txt").write_text(part, encoding="utf-8")
            print(f"{role}/{book}.txt: {len(part)} characters, {len(CHAPTER.findall(part))} chapters")


if __name__ == "__main__":
    main(sys.argv[1])
