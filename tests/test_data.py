"""dotmoe_ds.data: loading, packing, held-out split, cache, batch order, and bad input.

Tokenizers are built here, offline: a word-level one (with and without a BOS post-processor) and
a sentencepiece model trained on the fly, used both as a converted Llama tokenizer and as a slow
sentencepiece tokenizer.
"""
import io
import json
import re

import numpy as np
import pytest
import torch

from dotmoe_ds import data as data_mod
from dotmoe_ds.data import (
    DataConfig,
    DataError,
    Separators,
    batch_indices,
    check_config,
    document_separators,
    eval_batches,
    prepare_data,
    steps_per_epoch,
    train_batches,
)

WORDS = [f"w{i}" for i in range(40)]


def doc_text(doc: int, length: int) -> str:
    # Every document has its own words, so a block's tokens tell which documents it came from.
    return " ".join(f"d{doc}t{j % 7}" for j in range(length))


def word_tokenizer(vocab_words, *, adds_bos=False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def doc_vocab(n_docs):
    return [f"d{d}t{j}" for d in range(n_docs) for j in range(7)] + WORDS


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def expected_stream(tokenizer, texts, seps: Separators):
    out = []
    for t in texts:
        out += ([seps.bos] if seps.bos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
        out += [seps.eos] if seps.eos is not None else []
    return np.array(out)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Separators and packing


def test_separators_follow_the_tokenizers_default():
    assert document_separators(word_tokenizer(WORDS)) == Separators(bos=None, eos=2)
    assert document_separators(word_tokenizer(WORDS, adds_bos=True)) == Separators(bos=1, eos=2)


@pytest.mark.parametrize("adds_bos", [False, True])
def test_packing_round_trip(tmp_path, cache, adds_bos):
    lengths = [5, 17, 1, 30, 8, 12]
    texts = [doc_text(d, n) for d, n in enumerate(lengths)]
    tok = word_tokenizer(doc_vocab(len(texts)), adds_bos=adds_bos)
    f = write_jsonl(tmp_path / "docs.jsonl", texts)
    packed = prepare_data(DataConfig(data=str(f), seq_len=7, cache_dir=cache), tok)

    stream = expected_stream(tok, texts, document_separators(tok))
    assert len(stream) == sum(lengths) + len(texts) * (2 if adds_bos else 1)
    n_blocks = len(stream) // 7
    assert packed.train.shape == (n_blocks, 7)
    assert packed.train.dtype == np.int32
    np.testing.assert_array_equal(packed.train.reshape(-1), stream[: n_blocks * 7])
    assert packed.stats["train_tokens"] == len(stream)
    assert packed.stats["train_dropped_tokens"] == len(stream) - n_blocks * 7
    # Splitting the stream at EOS gives back every document's words.
    words = tok.convert_ids_to_tokens(packed.train.reshape(-1).tolist())
    docs = " ".join(w for w in words if w != "<s>").split("</s>")
    assert [d.split() for d in docs[: len(texts) - 1]] == [t.split() for t in texts[: len(texts) - 1]]


def test_sentencepiece_tokenizers_llama_and_slow(tmp_path, cache):
    import sentencepiece as spm
    from transformers import AutoTokenizer, SentencePieceBackend

    lines = [
        "It is a truth universally acknowledged, that a single man in possession",
        "of a good fortune, must be in want of a wife.",
        "However little known the feelings or views of such a man may be",
        "on his first entering a neighbourhood, this truth is so well fixed.",
    ]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 3), model_writer=proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", minloglevel=2, hard_vocab_limit=False,
    )
    folder = tmp_path / "llama2_tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    # What a Llama-2 checkpoint's tokenizer_config.json says.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    texts = ["a truth universally acknowledged", "Ünïcode outside the training text: 1818!", lines[1]]
    f = write_jsonl(tmp_path / "sp.jsonl", texts)

    llama = AutoTokenizer.from_pretrained(folder)
    slow = SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for tok, seps in ((llama, Separators(bos=1, eos=2)), (slow, Separators(bos=None, eos=2))):
        assert document_separators(tok) == seps
        packed = prepare_data(DataConfig(data=str(f), seq_len=4, cache_dir=cache), tok)
        stream = [t for text in texts for t in ([1] if seps.bos else []) + sp.encode(text) + [2]]
        n = len(stream) // 4
        np.testing.assert_array_equal(packed.train.reshape(-1), np.array(stream[: n * 4]))
        assert sp.decode(sp.encode(texts[1])) == texts[1]  # byte fallback: the text survives exactly


# ---------------------------------------------------------------------------------------------
# Sources: text files, directories, globs, formats


def test_text_files_directories_and_globs(tmp_path, cache):
    tok = word_tokenizer(doc_vocab(6))
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(doc_text(0, 9) + "\n\n" + doc_text(1, 4) + "\n")
    (root / "b.txt").write_text(doc_text(2, 6))
    write_jsonl(root / "sub" / "c.jsonl", [doc_text(3, 5), doc_text(4, 3)])
    (root / ".hidden.txt").write_text(doc_text(5, 50))
    (root / "notes.csv").write_text("ignored,because,unsupported\n")

    whole = prepare_data(DataConfig(data=str(root), seq_len=2, cache_dir=cache), tok)
    # Each .txt file is one document, each jsonl row one; the hidden file and the .csv are skipped.
    assert whole.stats["train_documents"] == 4
    assert whole.stats["train_tokens"] == (9 + 4) + 6 + 5 + 3 + 4
    paragraphs = prepare_data(DataConfig(data=str(root), seq_len=2, cache_dir=cache, text_unit="paragraph"), tok)
    assert paragraphs.stats["train_documents"] == 5
    globbed = prepare_data(DataConfig(data=str(root / "*.txt"), seq_len=2, cache_dir=cache), tok)
    assert globbed.stats["train_documents"] == 2
    listed = prepare_data(DataConfig(data=[str(root / "b.txt"), str(root / "sub" / "c.jsonl")], seq_len=2, cache_dir=cache), tok)
    stream = expected_stream(tok, [doc_text(2, 6), doc_text(3, 5), doc_text(4, 3)], Separators(None, 2))
    np.testing.assert_array_equal(listed.train.reshape(-1), stream[: len(stream) // 2 * 2])


def test_parquet_and_other_text_column(tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = word_tokenizer(doc_vocab(3))
    texts = [doc_text(d, 4 + d) for d in range(3)]
    pq.write_table(pa.table({"body": texts, "id": [0, 1, 2]}), tmp_path / "d.parquet")
    packed = prepare_data(DataConfig(data=str(tmp_path / "d.parquet"), text_column="body", seq_len=3, cache_dir=cache), tok)
    stream = expected_stream(tok, texts, Separators(None, 2))
    np.testing.assert_array_equal(packed.train.reshape(-1), stream[: len(stream) // 3 * 3])
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, id\)"):
        prepare_data(DataConfig(data=str(tmp_path / "d.parquet"), seq_len=3, cache_dir=cache), tok)


# ---------------------------------------------------------------------------------------------
# Held-out split


def _documents_in(blocks, tok):
    words = tok.convert_ids_to_tokens(np.asarray(blocks).reshape(-1).tolist())
    return {int(m.group(1)) for w in words if (m := re.fullmatch(r"d(\d+)t\d", w))}


def test_eval_fraction_holds_out_whole_documents(tmp_path, cache):
    n_docs = 20
    tok = word_tokenizer(doc_vocab(n_docs))
    f = write_jsonl(tmp_path / "docs.jsonl", [doc_text(d, 11 + d) for d in range(n_docs)])
    cfg = DataConfig(data=str(f), eval_fraction=0.2, seq_len=4, cache_dir=cache)
    packed = prepare_data(cfg, tok)

    held = set(packed.stats["eval_documents_index"])
    assert len(held) == 4 and packed.stats["eval_documents"] == 4 and packed.stats["train_documents"] == 16
    in_train, in_eval = _documents_in(packed.train, tok), _documents_in(packed.eval, tok)
    assert in_train.isdisjoint(in_eval)
    assert in_eval == held
    # Every document is in one split; only the dropped tail (< one block) may hide part of the last one.
    assert len(in_train | in_eval) >= n_docs - 2
    # The split depends on split_seed only.
    again = prepare_data(DataConfig(data=str(f), eval_fraction=0.2, seq_len=8, cache_dir=cache), tok)
    assert set(again.stats["eval_documents_index"]) == held
    other = prepare_data(DataConfig(data=str(f), eval_fraction=0.2, seq_len=4, split_seed=1, cache_dir=cache), tok)
    assert set(other.stats["eval_documents_index"]) != held


def test_eval_data_files(tmp_path, cache):
    tok = word_tokenizer(doc_vocab(4))
    train = write_jsonl(tmp_path / "train.jsonl", [doc_text(0, 10), doc_text(1, 10)])
    held = write_jsonl(tmp_path / "held.jsonl", [doc_text(2, 10), doc_text(3, 10)])
    packed = prepare_data(DataConfig(data=str(train), eval_data=str(held), seq_len=5, cache_dir=cache), tok)
    assert _documents_in(packed.train, tok) == {0, 1}
    assert _documents_in(packed.eval, tok) == {2, 3}
    stream = expected_stream(tok, [doc_text(2, 10), doc_text(3, 10)], Separators(None, 2))
    np.testing.assert_array_equal(packed.eval.reshape(-1), stream[:20])


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_gives_identical_blocks_and_changes_miss(tmp_path, cache):
    tok = word_tokenizer(doc_vocab(5))
    f = write_jsonl(tmp_path / "docs.jsonl", [doc_text(d, 9) for d in range(4)])
    cfg = DataConfig(data=str(f), eval_fraction=0.25, seq_len=6, cache_dir=cache)
    first = prepare_data(cfg, tok)
    second = prepare_data(cfg, tok)
    assert (first.stats["cache_hit"], second.stats["cache_hit"]) == (False, True)
    assert first.stats["cache"] == second.stats["cache"]
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.eval, second.eval)

    assert not prepare_data(DataConfig(data=str(f), eval_fraction=0.25, seq_len=5, cache_dir=cache), tok).stats["cache_hit"]
    assert not prepare_data(cfg, word_tokenizer(doc_vocab(5), adds_bos=True)).stats["cache_hit"]
    write_jsonl(f, [doc_text(d, 9) for d in range(5)])
    changed = prepare_data(cfg, tok)
    assert not changed.stats["cache_hit"]
    assert changed.stats["train_documents"] + changed.stats["eval_documents"] == 5


def test_interrupted_cache_write_leaves_no_entry(tmp_path, cache, monkeypatch):
    tok = word_tokenizer(doc_vocab(4))
    f = write_jsonl(tmp_path / "docs.jsonl", [doc_text(d, 9) for d in range(4)])
    cfg = DataConfig(data=str(f), eval_fraction=0.25, seq_len=6, cache_dir=cache)
    real_save = np.save

    def crash_on_eval(path, arr):
        if str(path).endswith("eval.npy"):
            raise KeyboardInterrupt("killed mid-write")
        real_save(path, arr)

    monkeypatch.setattr(data_mod.np, "save", crash_on_eval)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, tok)
    monkeypatch.setattr(data_mod.np, "save", real_save)
    import pathlib

    assert list((pathlib.Path(cache) / "data" / "blocks").iterdir()) == []  # neither an entry nor a staging folder left
    rebuilt = prepare_data(cfg, tok)
    assert not rebuilt.stats["cache_hit"] and rebuilt.eval is not None


# ---------------------------------------------------------------------------------------------
# Batch order


def test_rank_shards_are_disjoint_and_cover_each_epoch():
    world, mb = 3, 2
    for n_blocks in (24, 23):
        per_epoch = steps_per_epoch(n_blocks, world, mb)
        assert per_epoch == n_blocks // 6
        for epoch in range(2):
            seen = np.concatenate([
                batch_indices(n_blocks, epoch * per_epoch + s, seed=7, rank=r, world_size=world, micro_batch_size=mb)
                for s in range(per_epoch) for r in range(world)
            ])
            assert len(seen) == per_epoch * world * mb == len(set(seen.tolist()))
            assert set(seen.tolist()) <= set(range(n_blocks))
            if n_blocks % (world * mb) == 0:
                assert sorted(seen.tolist()) == list(range(n_blocks))
    first = batch_indices(24, 0, seed=7, rank=0, world_size=3, micro_batch_size=2)
    next_epoch = batch_indices(24, 4, seed=7, rank=0, world_size=3, micro_batch_size=2)
    other_seed = batch_indices(24, 0, seed=8, rank=0, world_size=3, micro_batch_size=2)
    assert not np.array_equal(first, next_epoch) and not np.array_equal(first, other_seed)


def test_resume_from_step_yields_the_uninterrupted_batches():
    blocks = np.arange(50 * 4, dtype=np.int32).reshape(50, 4)
    for rank in (0, 1):
        kw = dict(seed=3, rank=rank, world_size=2, micro_batch_size=3)
        stream = train_batches(blocks, **kw)
        uninterrupted = [next(stream) for _ in range(20)]  # 8 steps per epoch: spans 3 epochs
        for start in (0, 5, 8, 13):
            resumed = train_batches(blocks, start_step=start, **kw)
            for expected in uninterrupted[start:]:
                assert torch.equal(next(resumed), expected)
        for step, batch in enumerate(uninterrupted):
            assert batch.dtype == torch.int64
            np.testing.assert_array_equal(batch.numpy(), blocks[batch_indices(50, step, **kw)])


def test_eval_batches_cover_every_block_once_with_equal_counts():
    blocks = np.arange(11 * 3).reshape(11, 3)
    rows, counts = [], []
    for rank in range(3):
        batches = list(eval_batches(blocks, rank=rank, world_size=3, micro_batch_size=2))
        counts.append(len(batches))
        for ids, real in batches:
            assert ids.shape == (2, 3)
            rows += [tuple(r) for r in ids[real].tolist()]
    assert counts == [2, 2, 2]
    assert sorted(rows) == sorted(tuple(r) for r in blocks.tolist())


def test_batch_layout_errors():
    blocks = np.zeros((5, 4), dtype=np.int32)
    with pytest.raises(DataError, match="5 blocks cannot fill one step of 2 ranks x 3 blocks"):
        next(train_batches(blocks, seed=0, rank=0, world_size=2, micro_batch_size=3))
    with pytest.raises(DataError, match="rank 2 is outside a world of 2"):
        batch_indices(5, 0, seed=0, rank=2, world_size=2, micro_batch_size=1)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, before the expensive part


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("documents were loaded before the input was checked")

    monkeypatch.setattr(data_mod, "_load_documents", fail)


def test_errors_before_any_loading(tmp_path, cache, no_loading):
    tok = word_tokenizer(WORDS)
    good = write_jsonl(tmp_path / "ok.jsonl", ["w1 w2"])
    cases = [
        (DataConfig(data=str(tmp_path / "missing.txt"), cache_dir=cache), r"data path .*missing.txt does not exist"),
        (DataConfig(data=str(tmp_path / "nope") + "/", cache_dir=cache), r"does not exist"),
        (DataConfig(data=str(tmp_path / "*.parquet"), cache_dir=cache), r"no data files .* match"),
        (DataConfig(data=str(good), eval_data=str(tmp_path / "held.txt"), cache_dir=cache), r"held.txt does not exist"),
        (DataConfig(data=str(good), seq_len=9000, cache_dir=cache), r"seq_len 9000 exceeds the model's maximum of 8192 tokens; pass --seq_len 8192"),
        (DataConfig(data=str(good), eval_fraction=0.1, eval_data=str(good), cache_dir=cache), r"either --eval_data or --eval_fraction"),
        (DataConfig(data=str(good), eval_fraction=1.0, cache_dir=cache), r"eval_fraction must be in \[0, 1\)"),
        (DataConfig(data="not a/valid hub name!", cache_dir=cache), r"not an existing path, a glob .* or a datasets hub name"),
    ]
    for cfg, message in cases:
        with pytest.raises(DataError, match=message):
            prepare_data(cfg, tok, model_max_length=8192)

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "readme.csv").write_text("x")
    with pytest.raises(DataError, match=r"directory .*empty holds no data files"):
        prepare_data(DataConfig(data=str(empty_dir), cache_dir=cache), tok)
    (tmp_path / "zero.txt").write_text("")
    with pytest.raises(DataError, match=r"every file is empty"):
        prepare_data(DataConfig(data=str(tmp_path / "zero.txt"), cache_dir=cache), tok)
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'"):
        prepare_data(DataConfig(data=str(tmp_path / "data.xml"), cache_dir=cache), tok)
    tok.model_max_length = 64  # the tokenizer's own limit counts when the model states none
    with pytest.raises(DataError, match=r"seq_len 128 exceeds the model's maximum of 64"):
        check_config(DataConfig(data=str(good), seq_len=128), tok)


def test_errors_that_need_the_text(tmp_path, cache):
    tok = word_tokenizer(doc_vocab(3))
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \n")
    with pytest.raises(DataError, match=r"--data holds no text \(every document is empty\)"):
        prepare_data(DataConfig(data=str(blank), cache_dir=cache), tok)
    short = write_jsonl(tmp_path / "short.jsonl", [doc_text(0, 30), doc_text(1, 20)])
    with pytest.raises(DataError, match=r"--data is too short: 52 tokens \(2 documents, separators included\), "
                                        r"but one block needs seq_len=64 tokens"):
        prepare_data(DataConfig(data=str(short), seq_len=64, cache_dir=cache), tok)
    # split_seed 0 holds out the first of two documents.
    with pytest.raises(DataError, match=r"the training split is too short: 21 tokens \(1 document,"):
        prepare_data(DataConfig(data=str(short), eval_fraction=0.5, seq_len=24, cache_dir=cache), tok)
    swapped = write_jsonl(tmp_path / "swapped.jsonl", [doc_text(1, 20), doc_text(0, 30)])
    with pytest.raises(DataError, match=r"held-out split \(eval_fraction=0.5\) is too short: 21 tokens \(1 document,"):
        prepare_data(DataConfig(data=str(swapped), eval_fraction=0.5, seq_len=24, cache_dir=cache), tok)
    one_doc = write_jsonl(tmp_path / "one.jsonl", [doc_text(0, 30)])
    with pytest.raises(DataError, match=r"eval_fraction needs at least 2 documents"):
        prepare_data(DataConfig(data=str(one_doc), eval_fraction=0.1, seq_len=4, eval_split="documents",
                                cache_dir=cache), tok)
    # A single document is split by paragraphs instead (auto), which needs two of them.
    with pytest.raises(DataError, match=r"eval_fraction needs at least 2 paragraphs"):
        prepare_data(DataConfig(data=str(one_doc), eval_fraction=0.1, seq_len=4, cache_dir=cache), tok)


def test_hub_name_failure_is_a_clear_error(cache, monkeypatch):
    import datasets

    calls = []

    def offline(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'someone/corpus' is no local path, so it was read as a datasets hub name "
                                        r"\(config=wiki, split='train\[:1%\]'\); loading it failed: ConnectionError"):
        prepare_data(DataConfig(data="someone/corpus@wiki:train[:1%]", cache_dir=cache), word_tokenizer(WORDS))
    assert calls == [("someone/corpus", "wiki", "train[:1%]")]
