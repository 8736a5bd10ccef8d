"""Calibration and evaluation text: load with `datasets`, tokenise, pack into blocks, shard by rank.

Documents are tokenised with the model's own tokenizer and joined into one token stream as

    [BOS] doc_1 EOS [BOS] doc_2 EOS ...

EOS closes every document, so the model learns where one text ends and the next begins (as in
pretraining). BOS opens every document only when the tokenizer puts it in front of a sequence by
default (Llama-2, Llama-3): that is what the model saw before each text in pretraining; tokenizers
that never add it (SmolLM2, GPT-2, Qwen) get none. The stream is cut into blocks of `seq_len`
tokens; the final partial block is dropped. A held-out split is taken by whole documents before
packing, so no document contributes to both splits.

The packed blocks are cached (one .npy per split) under a key made of the tokenizer, the files
(path, size, modification time), and the settings; a cache entry is written under a temporary name
and renamed into place, so it is either complete or absent.

Batch order is a pure function of (seed, step, rank, world size, micro-batch size): a resumed run
that starts at step `s` sees exactly the batches an uninterrupted run saw from step `s`.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from .datacheck import DataFileError, check_encoding, count_documents

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIXES = (".parquet",)
_BUILDER_BY_SUFFIX = {
    **{s: "text" for s in TEXT_SUFFIXES},
    **{s: "json" for s in JSON_SUFFIXES},
    **{s: "parquet" for s in PARQUET_SUFFIXES},
}
_SUPPORTED = ", ".join(_BUILDER_BY_SUFFIX)
# Settings at these values leave the cache key as it was before the setting existed.
_KEY_NEUTRAL = {("encoding", "utf-8"), ("encoding_errors", "strict"), ("eval_split", "documents")}
# A datasets hub name: "name", "owner/name", optionally "@config", optionally ":split" (slices allowed).
_HUB_SPEC = re.compile(r"^(?P<name>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<config>[\w.-]+))?(?::(?P<split>.+))?$")
# Tokenizers that do not know their limit report a huge sentinel (about 1e30).
_NO_LIMIT = 10**9


class DataError(ValueError):
    """Bad data input; the message names the problem and the fix."""


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes blocks (the trainer's flags map onto these)."""

    data: str | list[str]  # files, directories, globs, or a hub dataset "name[@config][:split]"
    eval_data: str | list[str] | None = None  # held-out text; else `eval_fraction` of the documents
    eval_fraction: float = 0.0
    seq_len: int = 256
    text_column: str = "text"  # json/jsonl/parquet/hub column holding the text
    text_unit: Literal["document", "paragraph", "line"] = "document"  # one document of a .txt file
    split_seed: int = 0  # which documents `eval_fraction` holds out
    cache_dir: str | None = None  # dotmoe-ds cache root (default $DOTMOE_CACHE or ~/.cache/dotmoe_ds); data goes to its data/
    num_proc: int | None = None  # tokenisation processes (fast tokenizers are already parallel)
    encoding: str = "utf-8"  # of text and JSON files
    encoding_errors: str = "strict"  # strict (refuse undecodable bytes), replace (U+FFFD), ignore
    # How eval_fraction holds text out: whole documents, or the last paragraphs of a single document;
    # auto: paragraphs when the data is one document (check_config resolves it), else documents.
    eval_split: Literal["auto", "documents", "paragraphs"] = "auto"


@dataclass(frozen=True)
class Separators:
    bos: int | None  # prepended to every document, or None
    eos: int | None  # appended to every document, or None


@dataclass
class PackedData:
    train: np.ndarray  # [n_blocks, seq_len] int32 (memory-mapped from the cache)
    eval: np.ndarray | None  # [n_eval_blocks, seq_len] int32, or None without a held-out split
    seq_len: int
    separators: Separators
    stats: dict  # documents, tokens and dropped tail tokens per split, cache path, cache_hit


@dataclass(frozen=True)
class LocalSource:
    files: tuple[Path, ...]


@dataclass(frozen=True)
class HubSource:
    name: str
    config: str | None
    split: str


_Source = LocalSource | HubSource


# ---------------------------------------------------------------------------------------------
# Resolving --data before any expensive work


def _as_list(spec: str | Sequence[str]) -> list[str]:
    if isinstance(spec, (str, os.PathLike)):
        return [str(spec)]
    return [str(s) for s in spec]


def _files_in(directory: Path) -> list[Path]:
    found = [
        p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.suffix.lower() in _BUILDER_BY_SUFFIX
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    if not found:
        raise DataError(f"directory {directory} holds no data files ({_SUPPORTED}); point --data at files with text")
    return found


def _checked_file(path: Path) -> Path:
    if path.suffix.lower() not in _BUILDER_BY_SUFFIX:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {_SUPPORTED}")
    return path


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith(tuple(_BUILDER_BY_SUFFIX))


def resolve_source(spec: str) -> _Source:
    """One --data entry as local files or a hub dataset; raises DataError for paths that do not exist."""
    spec = spec.strip()
    if not spec:
        raise DataError("empty --data entry; pass a file, directory, glob, or hub dataset name")
    path = Path(spec).expanduser()
    if path.is_dir():
        return LocalSource(tuple(_files_in(path)))
    if path.is_file():
        return LocalSource((_checked_file(path),))
    if globlib.has_magic(spec) and (":" not in spec or _looks_like_path(spec)):
        matches = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in _BUILDER_BY_SUFFIX]
        if not files:
            raise DataError(f"no data files ({_SUPPORTED}) match {spec!r}; check the pattern")
        return LocalSource(tuple(files))
    if _looks_like_path(spec):
        raise DataError(f"data path {spec} does not exist; check --data/--eval_data")
    match = _HUB_SPEC.match(spec)
    if match is None:
        raise DataError(
            f"{spec!r} is not an existing path, a glob that matches files, or a datasets hub name "
            "(name[@config][:split], e.g. wikitext@wikitext-2-raw-v1:train)"
        )
    return HubSource(match["name"], match["config"], match["split"] or "train")


def _resolve_all(spec: str | Sequence[str], what: str) -> list[_Source]:
    sources = [resolve_source(s) for s in _as_list(spec)]
    if not sources:
        raise DataError(f"{what} is empty; pass at least one file, directory, glob, or hub dataset name")
    if all(isinstance(s, LocalSource) for s in sources):
        files = [f for s in sources for f in s.files]
        if all(f.stat().st_size == 0 for f in files):
            raise DataError(f"{what}: every file is empty ({', '.join(map(str, files[:5]))}); add text to them")
    return sources


def max_sequence_length(tokenizer, model_max_length: int | None = None) -> int | None:
    """The tightest known context limit of model and tokenizer, or None if neither states one."""
    limits = [int(model_max_length)] if model_max_length else []
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and int(tok_limit) < _NO_LIMIT:
        limits.append(int(tok_limit))
    return min(limits) if limits else None


def check_config(cfg: DataConfig, tokenizer, model_max_length: int | None = None, scan: bool = True) -> None:
    """Every check that needs no tokenising: call before loading a model. `scan`: also read the local
    files (decodable, well-formed, text column present, some text) and resolve cfg.eval_split."""
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {cfg.seq_len!r}")
    limit = max_sequence_length(tokenizer, model_max_length)
    if limit is not None and cfg.seq_len > limit:
        raise DataError(f"seq_len {cfg.seq_len} exceeds the model's maximum of {limit} tokens; pass --seq_len {limit} or less")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.eval_data is not None and cfg.eval_fraction > 0:
        raise DataError("give either --eval_data or --eval_fraction, not both")
    if cfg.text_unit not in ("document", "paragraph", "line"):
        raise DataError(f"text_unit must be 'document', 'paragraph' or 'line', got {cfg.text_unit!r}")
    if cfg.eval_split not in ("auto", "documents", "paragraphs"):
        raise DataError(f"eval_split must be 'auto', 'documents' or 'paragraphs', got {cfg.eval_split!r}")
    try:
        check_encoding(cfg.encoding, cfg.encoding_errors)
    except DataFileError as err:
        raise DataError(str(err)) from None
    sources = _resolve_all(cfg.data, "--data")
    n_docs = _scan(sources, cfg, "--data") if scan else None
    if cfg.eval_data is not None:
        eval_sources = _resolve_all(cfg.eval_data, "--eval_data")
        if scan:
            _scan(eval_sources, cfg, "--eval_data")
    elif cfg.eval_fraction > 0 and cfg.eval_split == "auto" and scan:
        cfg.eval_split = "paragraphs" if n_docs == 1 else "documents"
    document_separators(tokenizer)


def _scan(sources: list[_Source], cfg: DataConfig, what: str) -> int | None:
    """Non-empty documents of the local sources (None if a hub source is among them); DataError for
    a file that cannot be read or an all-empty data set."""
    if not all(isinstance(s, LocalSource) for s in sources):
        return None
    total = 0
    for f in (f for s in sources for f in s.files):
        try:
            total += count_documents(f, _BUILDER_BY_SUFFIX[f.suffix.lower()], encoding=cfg.encoding,
                                     errors=cfg.encoding_errors, text_column=cfg.text_column,
                                     text_unit=cfg.text_unit)
        except DataFileError as err:
            raise DataError(str(err)) from None
    if total == 0:
        raise DataError(f"{what} holds no text: every document is empty or whitespace once empty ones are "
                        "dropped; add text, check --text_column, or point it at other files")
    return total


# ---------------------------------------------------------------------------------------------
# Tokenizer policy and fingerprint


def document_separators(tokenizer) -> Separators:
    """EOS after every document; BOS before it only if the tokenizer adds BOS by default."""
    bos_id = tokenizer.bos_token_id
    eos_id = tokenizer.eos_token_id
    adds_bos = False
    if bos_id is not None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        adds_bos = with_special[:1] == [bos_id] and plain[:1] != [bos_id]
    seps = Separators(bos=bos_id if adds_bos else None, eos=eos_id)
    if seps.bos is None and seps.eos is None:
        raise DataError(
            "the tokenizer defines no EOS token (and adds no BOS), so documents cannot be separated; "
            "set tokenizer.eos_token to the model's end-of-text token"
        )
    return seps


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        sp = getattr(tokenizer, "sp_model", None)
        if sp is not None and hasattr(sp, "serialized_model_proto"):
            h.update(sp.serialized_model_proto())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(asdict(document_separators(tokenizer))).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading and tokenising


def _source_fingerprint(source: _Source) -> list:
    if isinstance(source, HubSource):
        return ["hub", source.name, source.config, source.split]
    return [["file", str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in source.files]


def _load_documents(sources: list[_Source], cfg: DataConfig, what: str):
    """All non-empty documents of the sources as one `datasets.Dataset` with a single 'text' column."""
    import datasets

    parts = []
    for source in sources:
        if isinstance(source, HubSource):
            try:
                ds = datasets.load_dataset(source.name, source.config, split=source.split)
            except Exception as err:  # offline, unknown name, bad split: all end the same way for the user
                raise DataError(
                    f"{what}: {source.name!r} is no local path, so it was read as a datasets hub name "
                    f"(config={source.config}, split={source.split!r}); loading it failed: "
                    f"{type(err).__name__}: {err}. Check the name, download it while online "
                    "(it is then found in the datasets cache; HF_DATASETS_OFFLINE=1 reads only the cache), "
                    "or pass local files."
                ) from None
            parts.append(_text_column(ds, cfg.text_column, f"{source.name}:{source.split}"))
            continue
        by_builder: dict[str, list[str]] = {}
        for f in source.files:
            by_builder.setdefault(_BUILDER_BY_SUFFIX[f.suffix.lower()], []).append(str(f))
        for builder, files in by_builder.items():
            extra = {"sample_by": cfg.text_unit} if builder == "text" else {}
            if builder in ("text", "json"):
                extra.update(encoding=cfg.encoding, encoding_errors=cfg.encoding_errors)
            # Arrow copies of local files go under our cache root too, so one folder holds all derived data.
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train",
                                           cache_dir=str(_cache_root(cfg) / "arrow"), **extra)
            except Exception as err:   # check_config read these files; this is the fallback
                cause = err.__cause__ or err
                raise DataError(f"{what}: reading {', '.join(files[:3])} failed ({type(cause).__name__}: "
                                f"{str(cause).splitlines()[0] if str(cause) else ''}); check the files "
                                "(--encoding / --encoding_errors for text)") from None
            parts.append(_text_column(ds, "text" if builder == "text" else cfg.text_column, ", ".join(files[:3])))
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    docs = docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True,
                       keep_in_memory=True, desc="dropping empty documents")
    if len(docs) == 0:
        raise DataError(f"{what} holds no text (every document is empty); add text or point it at other files")
    return docs


def _text_column(ds, column: str, where: str):
    if column not in ds.column_names:
        raise DataError(f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}); pass --text_column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _token_stream(docs, tokenizer, seps: Separators, cfg: DataConfig, key: str) -> np.ndarray:
    """[BOS] doc EOS for every document, concatenated, as one int32 array."""
    import pyarrow.compute as pc

    head = [seps.bos] if seps.bos is not None else []
    tail = [seps.eos] if seps.eos is not None else []

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [head + x + tail for x in ids]}

    import datasets

    tokenised = docs.map(encode, batched=True, remove_columns=["text"], num_proc=cfg.num_proc,
                         features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
                         keep_in_memory=True, new_fingerprint=key, desc="tokenising")
    flat = pc.list_flatten(tokenised.data.column("ids"))
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int32)


def _pack(stream: np.ndarray, seq_len: int, what: str, n_docs: int) -> np.ndarray:
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"{what} is too short: {len(stream)} tokens ({n_docs} document{'s' if n_docs != 1 else ''}, separators "
            f"included), but one "
            f"block needs seq_len={seq_len} tokens; add text or lower --seq_len"
        )
    return stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)


def _split_documents(n_docs: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document indices (train, eval), each ascending; eval is a seeded random `fraction` of them."""
    if n_docs < 2:
        raise DataError(
            f"eval_fraction needs at least 2 documents to hold whole documents out, the data has {n_docs}; "
            "pass --eval_data, or split text files into more documents (text_unit='paragraph')"
        )
    n_eval = min(n_docs - 1, max(1, round(fraction * n_docs)))
    chosen = np.random.default_rng(seed).permutation(n_docs)[:n_eval]
    is_eval = np.zeros(n_docs, dtype=bool)
    is_eval[chosen] = True
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def _split_paragraphs(docs, fraction: float):
    """(train docs, eval docs, paragraphs, held-out paragraphs) of a single document: its last
    `fraction` of paragraphs (blocks between blank lines, never one split in two) held out."""
    import datasets

    if len(docs) != 1:
        raise DataError(f"eval_split 'paragraphs' holds out paragraphs of a single document, the data has "
                        f"{len(docs)}; use eval_split 'documents' (or auto)")
    text = docs[0]["text"]
    starts = [0] + [m.end() for m in re.finditer(r"\n[ \t\r\f\v]*\n\s*", text)]
    pieces = [(a, b) for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b].strip()]
    if len(pieces) < 2:
        raise DataError("eval_fraction needs at least 2 paragraphs (blocks separated by a blank line) to hold "
                        f"the last ones of a single document out, the data has {len(pieces)}; pass --eval_data")
    n_eval = min(len(pieces) - 1, max(1, round(fraction * len(pieces))))
    cut = pieces[-n_eval][0]
    train = datasets.Dataset.from_dict({"text": [text[:cut].rstrip()]})
    held = datasets.Dataset.from_dict({"text": [text[cut:].strip()]})
    return train, held, len(pieces), n_eval


# ---------------------------------------------------------------------------------------------
# The cache


def _cache_root(cfg: DataConfig) -> Path:
    from .demo import cache_root

    return (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()) / "data"


def _load_cached(entry: Path, seps: Separators) -> PackedData | None:
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    train = np.load(entry / "train.npy", mmap_mode="r")
    held = np.load(entry / "eval.npy", mmap_mode="r") if (entry / "eval.npy").is_file() else None
    return PackedData(train, held, meta["seq_len"], seps, {**meta["stats"], "cache": str(entry), "cache_hit": True})


def _store(entry: Path, train: np.ndarray, held: np.ndarray | None, seq_len: int, stats: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        np.save(staging / "train.npy", train)
        if held is not None:
            np.save(staging / "eval.npy", held)
        # meta.json last: its presence marks a complete entry even on filesystems without atomic rename.
        (staging / "meta.json").write_text(json.dumps({"version": FORMAT_VERSION, "seq_len": seq_len, "stats": stats}, indent=2))
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not just a concurrent builder that finished first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The entry point


def prepare_data(cfg: DataConfig, tokenizer, model_max_length: int | None = None) -> PackedData:
    """Load, tokenise and pack `cfg.data` (and the held-out text), or read them from the cache.

    In a multi-process run call it on one rank per machine first, then on the others after a
    barrier: they find the cache. (Concurrent builders are safe, only wasteful.)
    """
    check_config(cfg, tokenizer, model_max_length, scan=False)
    seps = document_separators(tokenizer)
    train_sources = _resolve_all(cfg.data, "--data")
    eval_sources = _resolve_all(cfg.eval_data, "--eval_data") if cfg.eval_data is not None else None
    key_parts = {
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": [_source_fingerprint(s) for s in train_sources],
        "eval_data": [_source_fingerprint(s) for s in eval_sources] if eval_sources else None,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("data", "eval_data", "cache_dir", "num_proc")
                     and (k, v) not in _KEY_NEUTRAL
                     and not (k == "eval_split" and (cfg.eval_data is not None or cfg.eval_fraction <= 0))},
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    entry = _cache_root(cfg) / "blocks" / key
    cached = _load_cached(entry, seps)
    if cached is not None:
        return cached

    docs = _load_documents(train_sources, cfg, "--data")
    stats: dict = {}
    if eval_sources is not None:
        eval_docs = _load_documents(eval_sources, cfg, "--eval_data")
    elif cfg.eval_fraction > 0 and (cfg.eval_split == "paragraphs" or cfg.eval_split == "auto" and len(docs) == 1):
        docs, eval_docs, n_par, n_eval = _split_paragraphs(docs, cfg.eval_fraction)
        stats.update(paragraphs=n_par, eval_paragraphs=n_eval)
    elif cfg.eval_fraction > 0:
        train_idx, eval_idx = _split_documents(len(docs), cfg.eval_fraction, cfg.split_seed)
        docs, eval_docs = docs.select(train_idx), docs.select(eval_idx)
        stats["eval_documents_index"] = eval_idx.tolist()
    else:
        eval_docs = None

    train_stream = _token_stream(docs, tokenizer, seps, cfg, key + "-train")
    split_by_fraction = eval_sources is None and eval_docs is not None
    train = _pack(train_stream, cfg.seq_len, "the training split" if split_by_fraction else "--data", len(docs))
    stats.update(train_documents=len(docs), train_tokens=len(train_stream),
                 train_dropped_tokens=len(train_stream) - train.size)
    held = None
    if eval_docs is not None:
        eval_stream = _token_stream(eval_docs, tokenizer, seps, cfg, key + "-eval")
        what = "--eval_data" if eval_sources else f"the held-out split (eval_fraction={cfg.eval_fraction})"
        held = _pack(eval_stream, cfg.seq_len, what, len(eval_docs))
        stats.update(eval_documents=len(eval_docs), eval_tokens=len(eval_stream),
                     eval_dropped_tokens=len(eval_stream) - held.size)
    _store(entry, train, held, cfg.seq_len, stats)
    loaded = _load_cached(entry, seps)
    assert loaded is not None
    loaded.stats["cache_hit"] = False
    return loaded


# ---------------------------------------------------------------------------------------------
# Batch order


def steps_per_epoch(n_blocks: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-steps per epoch: every rank takes `micro_batch_size` distinct blocks per step; the
    remainder of fewer than `world_size * micro_batch_size` blocks is skipped that epoch."""
    return n_blocks // (world_size * micro_batch_size)


def _check_layout(n_blocks: int, rank: int, world_size: int, micro_batch_size: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside a world of {world_size} processes")
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    per_epoch = steps_per_epoch(n_blocks, world_size, micro_batch_size)
    if per_epoch == 0:
        raise DataError(
            f"{n_blocks} blocks cannot fill one step of {world_size} ranks x {micro_batch_size} blocks; "
            "add data, lower --seq_len, or lower the micro-batch size"
        )
    return per_epoch


def _epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    # Seeded by the pair (seed, epoch), so seed 1 epoch 0 and seed 0 epoch 1 differ.
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def batch_indices(n_blocks: int, step: int, *, seed: int, rank: int, world_size: int, micro_batch_size: int) -> np.ndarray:
    """Block indices of `rank`'s micro-batch at micro-step `step` (steps count from 0 across epochs).

    Within an epoch the ranks' batches are disjoint; each epoch reshuffles with (seed, epoch).
    With gradient accumulation, the micro-step is optimizer_step * accumulation_steps + micro index.
    """
    per_epoch = _check_layout(n_blocks, rank, world_size, micro_batch_size)
    epoch, within = divmod(step, per_epoch)
    order = _epoch_order(n_blocks, seed, epoch)
    start = (within * world_size + rank) * micro_batch_size
    return order[start : start + micro_batch_size]


def train_batches(blocks: np.ndarray, *, seed: int, rank: int, world_size: int, micro_batch_size: int,
                  start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless micro-batches (LongTensor [micro_batch_size, seq_len]) for `rank`, from `start_step` on."""
    n_blocks = len(blocks)
    per_epoch = _check_layout(n_blocks, rank, world_size, micro_batch_size)
    if start_step < 0:
        raise DataError(f"start_step must be >= 0, got {start_step}")
    step = start_step
    epoch, order = -1, None
    while True:
        e, within = divmod(step, per_epoch)
        if e != epoch:
            epoch, order = e, _epoch_order(n_blocks, seed, e)
        start = (within * world_size + rank) * micro_batch_size
        rows = order[start : start + micro_batch_size]
        yield torch.from_numpy(np.asarray(blocks[rows]).astype(np.int64))
        step += 1


def eval_batches(blocks: np.ndarray, *, rank: int, world_size: int, micro_batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every held-out block exactly once over all ranks, in order, as (input_ids, real_rows).

    All ranks yield the same number of batches (ZeRO-3 needs every rank in every forward); rows
    that only pad a rank's share repeat block 0 and are False in `real_rows`, to be left out of sums.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside a world of {world_size} processes")
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    n_blocks = len(blocks)
    per_rank = -(-n_blocks // world_size)
    n_batches = -(-per_rank // micro_batch_size)
    mine = np.arange(rank, n_blocks, world_size)
    for b in range(n_batches):
        idx = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        real = np.zeros(micro_batch_size, dtype=bool)
        real[: len(idx)] = True
        rows = np.concatenate([idx, np.zeros(micro_batch_size - len(idx), dtype=np.int64)]).astype(np.int64)
        yield torch.from_numpy(np.asarray(blocks[rows]).astype(np.int64)), torch.from_numpy(real)
