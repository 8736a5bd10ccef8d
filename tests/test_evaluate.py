"""Evaluation: held-out perplexity of a folder, the cloze task (construction and scoring), the
lm-eval-harness adapter and the `dotmoe eval` command, on tiny models and the shipped held-out text."""
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from dotmoe_ds.cli import main as cli_main
from dotmoe_ds.data import DataConfig, prepare_data
from dotmoe_ds.demo import demo_data_files
from dotmoe_ds.evaluate import (ClozeConfig, EvalSettings, build_cloze, build_cloze_from_texts, choice_loglikelihoods,
                                evaluate_model, heldout_blocks, parameter_counts, perplexity, read_text_files,
                                score_cloze, split_paragraphs, split_sentences)
from dotmoe_ds.export import export_moe, read_dotmoe
from dotmoe_ds.families import adapter_for
from dotmoe_ds.layer import DotMoEFFN, set_mode
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import TINY_FAMILIES, tiny_model, tiny_tokenizer

VOCAB = 2048   # a tokenizer trained on the held-out text: Austen's sentences become 10-30 tokens
HELDOUT = [str(p) for p in demo_data_files().heldout]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spinning
    # workers make each small matmul ~100x slower (OMP_WAIT_POLICY=PASSIVE avoids that too).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fold(text: str) -> str:
    return " ".join(text.split()).lower()


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return read_text_files(HELDOUT)


@pytest.fixture(scope="module")
def tokenizer(texts):
    return tiny_tokenizer(VOCAB, text="\n".join(texts.values()))


@pytest.fixture(scope="module")
def items(texts, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the excerpt yields fewer than 500 items
        return build_cloze_from_texts(texts, tokenizer, ClozeConfig(n_items=500))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny dense Llama folder whose tokenizer knows the held-out text."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", seed=0, vocab_size=VOCAB).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def convert(model, spec: MoESpec, seed: int = 0):
    """Every MLP as a DotMoEFFN with a random capacity-exact partition and a random router, hard mode."""
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(seed)
    cols = torch.cat([torch.full((c,), j) for j, c in enumerate(spec.column_capacities)])

    def make(i, gate, up, down, act):
        return DotMoEFFN(gate, up, down, act, spec, init_assignment=cols[torch.randperm(spec.d_ff, generator=gen)],
                         router_weight=torch.randn(spec.num_experts, model.config.hidden_size, generator=gen))

    adapter.swap_in(model, make)
    set_mode(model, "hard")
    return adapter


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, model_dir):
    """The tiny Llama converted (E=4, k=2) and exported as a Mixtral checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    spec = MoESpec.uniform(model.config.intermediate_size, num_experts=4, top_k=2)
    adapter = convert(model, spec)
    out = tmp_path_factory.mktemp("export") / "moe"
    export_moe(model, adapter, spec, out, source_dir=model_dir, command="test")
    return out


# ---------------------------------------------------------------------- cloze construction

def test_sentences_split_after_terminal_punctuation_not_after_titles():
    paragraph = ('Mr. Elliot came in. "Is it so?" said Mrs. Smith. She smiled! Then Dr. J. Shirley left; '
                 'nobody cared. The end')
    assert split_sentences(paragraph) == ["Mr. Elliot came in.", '"Is it so?" said Mrs. Smith.', "She smiled!",
                                          "Then Dr. J. Shirley left; nobody cared.", "The end"]
    assert split_paragraphs("a\nb\n\n  \n c  d \r\n\r\ne") == ["a b", "c d", "e"]


def test_cloze_builder_is_deterministic_and_seeded(texts, tokenizer, items):
    again = build_cloze_from_texts(texts, tokenizer, ClozeConfig(n_items=20, seed=0))
    assert again == build_cloze_from_texts(dict(texts), tokenizer, ClozeConfig(n_items=20, seed=0))
    other = build_cloze_from_texts(texts, tokenizer, ClozeConfig(n_items=20, seed=1))
    assert [i.source for i in again] != [i.source for i in other]
    assert len(again) == 20 and len(items) > 20     # 20 of all the eligible sentences
    assert {i.source for i in again} <= {i.source for i in items}


def test_cloze_items_obey_the_construction(texts, tokenizer, items):
    cfg = ClozeConfig()
    folded_docs = {name: _fold(text) for name, text in texts.items()}
    assert len(items) >= 25
    labels = [item.label for item in items]
    assert len(set(labels)) == 4                       # the true position is drawn, not fixed
    for item in items:
        assert len(item.choices) == 4
        folded = [_fold(c) for c in item.choices]
        assert len(set(folded)) == 4                   # four distinct candidates
        true = folded[item.label]
        for k, d in enumerate(folded):
            if k != item.label:                        # never the true continuation, nor overlapping it
                assert true not in d and d not in true
                assert d not in _fold(item.context)
        doc = item.source.rsplit("#", 1)[0]
        # the context is real text and the true sentence follows it directly
        assert _fold(item.context + " " + item.choices[item.label]) in folded_docs[doc]
        n_ctx = len(tokenizer(item.context, add_special_tokens=False)["input_ids"])
        assert cfg.context_tokens[0] <= n_ctx <= cfg.context_tokens[1]
        n = [len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in item.choices]
        assert all(cfg.continuation_tokens[0] <= x <= cfg.continuation_tokens[1] for x in n)
        assert all(abs(x - n[item.label]) <= cfg.length_tolerance for x in n)


def test_distractors_come_from_far_away():
    # One document of numbered sentences: the sentence index is readable from its text.
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    sentences = [f"Sentence {i} says {words[i % 5]} {words[(i // 5) % 5]} and {words[(i // 25) % 5]}." for i in range(400)]
    text = "\n\n".join(" ".join(sentences[p:p + 8]) for p in range(0, 400, 8))
    tok = tiny_tokenizer(1024, text=text)
    cfg = ClozeConfig(n_items=30, context_tokens=(20, 40), continuation_tokens=(3, 40), min_distance=60)
    built = build_cloze_from_texts({"numbers": text}, tok, cfg)
    assert len(built) == 30
    for item in built:
        true_index = int(item.choices[item.label].split()[1])
        assert item.source == f"numbers#{true_index}"
        for k, c in enumerate(item.choices):
            if k != item.label:
                assert abs(int(c.split()[1]) - true_index) > 60


def test_too_little_text_is_a_clear_error(tokenizer):
    from dotmoe_ds.evaluate import EvalError

    with pytest.raises(EvalError, match="yields no cloze item"):
        build_cloze_from_texts({"short": "One sentence. Two sentences."}, tokenizer)


# ---------------------------------------------------------------------- cloze scoring

class _PrefixCache:
    """The token history, standing in for a KV cache."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def batch_repeat_interleave(self, n: int) -> None:
        self.ids = self.ids.repeat_interleave(n, dim=0)


class MemorisingLM(nn.Module):
    """Puts logit 10 on the token that continues the current prefix in one of `sequences`, else 0 everywhere."""

    def __init__(self, sequences, vocab: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.next = {tuple(seq[:t + 1]): seq[t + 1] for seq in sequences for t in range(len(seq) - 1)}

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        full = input_ids if past_key_values is None else torch.cat([past_key_values.ids, input_ids], dim=1)
        start = full.shape[1] - input_ids.shape[1]
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b in range(full.shape[0]):
            for t in range(input_ids.shape[1]):
                nxt = self.next.get(tuple(full[b, :start + t + 1].tolist()))
                if nxt is not None:
                    logits[b, t, nxt] = 10.0
        logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        return SimpleNamespace(logits=logits, past_key_values=_PrefixCache(full) if use_cache else None)


@pytest.mark.parametrize("method", ["kv", "full"])
def test_a_model_that_knows_the_text_picks_every_true_continuation(items, tokenizer, method):
    from dotmoe_ds.evaluate import _context_ids

    sequences = [_context_ids(tokenizer, i.context)
                 + tokenizer(" " + i.choices[i.label], add_special_tokens=False)["input_ids"] for i in items]
    model = MemorisingLM(sequences, VOCAB)
    result = score_cloze(model, tokenizer, items, method=method)
    assert result.items == len(items)
    assert result.accuracy == result.accuracy_norm == result.accuracy_per_token == 1.0
    # The true continuation's log-likelihood is L * log softmax(10 among zeros) (up to the fp32
    # log-softmax; one token more or less would be off by 0.09).
    hit = 10.0 - math.log(math.exp(10.0) + VOCAB - 1)
    for item, ll in zip(items, result.loglikelihoods):
        n = len(tokenizer(" " + item.choices[item.label], add_special_tokens=False)["input_ids"])
        assert ll[item.label] == pytest.approx(n * hit, rel=1e-4)
        assert np.delete(ll, item.label).max() < ll[item.label] - 5    # a miss costs log(V) - 0.09
    assert result.mean_nll_true == pytest.approx(-hit, rel=1e-4)


def _random_case(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, vocab, (50,), generator=gen).tolist()
    choices = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 7, 1, 5)]
    return ctx, choices


def _assert_kv_equals_full(model, vocab=512):
    for seed in range(2):
        ctx, choices = _random_case(vocab, seed)
        kv = choice_loglikelihoods(model, ctx, choices, method="kv")
        full = choice_loglikelihoods(model, ctx, choices, method="full")
        torch.testing.assert_close(kv, full, rtol=0, atol=1e-5)
        # and both equal one plain forward per choice
        for c, ll in zip(choices, full):
            seq = torch.tensor([ctx + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq).logits[0, len(ctx) - 1:-1].double(), -1)
            assert float(logp.gather(1, torch.tensor(c)[:, None]).sum()) == pytest.approx(float(ll), abs=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kv_cache_scoring_equals_recomputation_dense(family):
    _assert_kv_equals_full(tiny_model(family, seed=0))


@pytest.mark.parametrize("family,shared", [("llama", 0), ("mistral", 0), ("qwen2", 32), ("qwen3", 0), ("olmo2", 0)])
def test_kv_cache_scoring_equals_recomputation_moe(family, shared, tmp_path):
    model = tiny_model(family, seed=0)
    d_ff = model.config.intermediate_size
    spec = MoESpec.uniform(d_ff, num_experts=4, top_k=2, shared=shared)
    adapter = convert(model, spec)
    _assert_kv_equals_full(model)                    # in memory, DotMoEFFN layers
    export_moe(model, adapter, spec, tmp_path / "moe", command="test")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert reloaded.config.model_type == adapter.target_model_type
    _assert_kv_equals_full(reloaded)                 # Mixtral / Qwen2-MoE / Qwen3-MoE / FlexOlmo


# ---------------------------------------------------------------------- perplexity and parameters

def test_heldout_perplexity_of_a_folder(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DOTMOE_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    blocks = heldout_blocks(tok, HELDOUT, seq_len=64)
    # the trainer's packing of the same files
    trainer_blocks = prepare_data(DataConfig(data=HELDOUT, seq_len=64), tok).train
    np.testing.assert_array_equal(blocks, trainer_blocks)
    # every file is one document closed by EOS; windows do not overlap
    stream = [t for f in HELDOUT for t in tok(Path(f).read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    n = len(stream) // 64
    np.testing.assert_array_equal(blocks, np.asarray(stream[: n * 64]).reshape(n, 64))

    result = evaluate_model(model_dir, EvalSettings(data=HELDOUT, cloze_items=0, ppl_blocks=5, seq_len=64))
    ours = perplexity(model, blocks, max_blocks=5)
    assert result["perplexity"]["perplexity"] == pytest.approx(ours.ppl, rel=1e-6)
    assert result["perplexity"]["tokens"] == 5 * 63 and result["perplexity"]["blocks"] == 5
    with torch.no_grad():
        ids = torch.from_numpy(blocks[:5].astype(np.int64))
        logits = model(input_ids=ids).logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp()
    assert result["perplexity"]["perplexity"] == pytest.approx(float(manual), rel=1e-5)
    assert result["params"] == {"total": sum(p.numel() for p in model.parameters()),
                                "active": sum(p.numel() for p in model.parameters()), "active_ffn_fraction": 1.0,
                                "source": "counted (dense)"}


def test_parameter_counts_agree_in_memory_on_disk_and_counted(model_dir, moe_dir):
    meta = read_dotmoe(moe_dir)["params"]
    reloaded = AutoModelForCausalLM.from_pretrained(moe_dir)
    from_json = parameter_counts(reloaded, moe_dir)
    assert (from_json["total"], from_json["active"], from_json["source"]) == (meta["total"], meta["active"], "dotmoe.json")
    counted = parameter_counts(reloaded)             # experts of 24 neurons: no padding
    assert (counted["total"], counted["active"]) == (meta["total"], meta["active"])
    assert counted["active"] < counted["total"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    convert(model, MoESpec.uniform(model.config.intermediate_size, num_experts=4, top_k=2))
    in_memory = parameter_counts(model)
    assert (in_memory["total"], in_memory["active"]) == (meta["total"], meta["active"])
    fraction = read_dotmoe(moe_dir)["active_ffn_fraction"]
    assert fraction == 0.5 and from_json["active_ffn_fraction"] == 0.5
    assert counted["active_ffn_fraction"] == pytest.approx(0.5) and in_memory["active_ffn_fraction"] == pytest.approx(0.5)


# ---------------------------------------------------------------------- lm-eval-harness

def test_lm_eval_local_task_matches_our_cloze_scoring(model_dir, items, tmp_path):
    pytest.importorskip("lm_eval")
    from dotmoe_ds.evaluate import run_lm_eval

    data = tmp_path / "toy_cloze.jsonl"
    data.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "label": i.label}) + "\n"
                            for i in items))
    (tmp_path / "toy_cloze.yaml").write_text(f"""task: dotmoe_toy_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    metrics = run_lm_eval(model_dir, ["dotmoe_toy_cloze"], include_path=tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = score_cloze(model, tok, items)
    assert metrics["dotmoe_toy_cloze"]["acc,none"] == pytest.approx(ours.accuracy, abs=1e-12)
    assert metrics["dotmoe_toy_cloze"]["acc_norm,none"] == pytest.approx(ours.accuracy_norm, abs=1e-12)
    # the same through evaluate_model with the model in memory (as the quality-study tool calls it)
    result = evaluate_model(None, EvalSettings(cloze_items=0, ppl_blocks=-1, lm_eval_tasks=["dotmoe_toy_cloze"],
                                               lm_eval_include=[str(tmp_path)], lm_eval_limit=10),
                            model=model, tokenizer=tok)
    first10 = score_cloze(model, tok, items[:10])
    assert result["lm_eval"]["dotmoe_toy_cloze"]["acc,none"] == pytest.approx(first10.accuracy, abs=1e-12)


@pytest.mark.slow
def test_lm_eval_unknown_task_is_a_clear_error(model_dir):
    pytest.importorskip("lm_eval")
    from dotmoe_ds.evaluate import EvalError, run_lm_eval

    with pytest.raises(EvalError, match="unknown lm-eval task"):
        run_lm_eval(model_dir, ["no_such_task_xyz"])


# ---------------------------------------------------------------------- the command

def test_dotmoe_eval_on_an_exported_moe_writes_json(moe_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOTMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results.json"
    rc = cli_main(["eval", str(moe_dir), "--data", ",".join(HELDOUT), "--cloze_items", "8", "--ppl_blocks", "3",
                   "--seq_len", "64", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert "| perplexity (3 x 64 tokens)" in capsys.readouterr().out
    meta = read_dotmoe(moe_dir)["params"]
    assert result["params"]["active"] == meta["active"] and result["params"]["total"] == meta["total"]
    model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    tok = AutoTokenizer.from_pretrained(moe_dir)
    ppl = perplexity(model, heldout_blocks(tok, HELDOUT, seq_len=64), max_blocks=3)
    assert result["perplexity"]["perplexity"] == pytest.approx(ppl.ppl, rel=1e-6)
    cloze = score_cloze(model, tok, build_cloze(HELDOUT, tok, ClozeConfig(n_items=8)))
    assert result["cloze"]["items"] == 8
    assert result["cloze"]["accuracy"] == cloze.accuracy and result["cloze"]["accuracy_norm"] == cloze.accuracy_norm


def test_dotmoe_eval_refuses_missing_paths_before_loading(tmp_path, model_dir, capsys):
    assert cli_main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", str(model_dir), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert cli_main(["eval", str(model_dir), "--output", str(tmp_path / "no_dir" / "r.json")]) == 2
    assert "--output" in capsys.readouterr().err
