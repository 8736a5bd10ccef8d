"""The run frame's reliability: one run per OUTPUT (the lock), bad data refused before anything is
loaded (with file and line / byte offset), a single text file that trains and evaluates with default
flags, exports without paths of this machine, and a damaged newest checkpoint survived."""
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from dotmoe_ds import runframe, train
from dotmoe_ds.demo import DEMO_HUB_ID, GGUF_FILE
from dotmoe_ds.provenance import portable_command, public_model_name
from dotmoe_ds.runlock import LOCK_NAME, RunLock, RunLockError
from dotmoe_ds.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "dotmoe_ds" / "demo_data" / "calibration" / "emma.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("frame")
    model = save_tiny_model("llama", root / "llama", text=BOOK.read_text())
    return {"model": model, "root": root}


def _argv(tiny, tmp_path, data, *extra):
    return ["--model", str(tiny["model"]), "--data", str(data), "--output", str(tmp_path / "out"),
            "--num_experts", "4", "--top_k", "2", "--seq_len", "32", "--cache_dir", str(tmp_path / "cache"),
            *extra]


def _refused(capsys, argv, *needles) -> str:
    assert train.main(argv) == runframe.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dotmoe: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------------- the lock

def test_a_second_lock_is_refused_with_the_holder_named(tmp_path):
    first = RunLock.acquire(tmp_path / "out")
    holder = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(RunLockError) as err:
        RunLock.acquire(tmp_path / "out")
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and f"host {holder['host']}" in msg and holder["started"] in msg
    first.release()
    second = RunLock.acquire(tmp_path / "out")     # released: the next run takes it
    second.release()


def test_a_refused_preflight_leaves_no_folder_and_keeps_an_existing_one(tiny, tmp_path, capsys, no_expensive_work):
    _refused(capsys, _argv(tiny, tmp_path, tmp_path / "absent.txt"), "does not exist")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    _refused(capsys, _argv(tiny, tmp_path, tmp_path / "absent.txt"), "does not exist")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [LOCK_NAME]


def test_a_sigkilled_holder_leaves_no_lock(tiny, tmp_path, capsys, no_expensive_work):
    code = (f"from dotmoe_ds.runlock import RunLock; RunLock.acquire({str(tmp_path / 'out')!r}); "
            "print('locked', flush=True); import time; time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "locked"
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "x"}\n')
        # Any run on that OUTPUT is refused at once, naming the holder; --overwrite deletes nothing.
        for extra in ([], ["--overwrite"], ["--resume"]):
            _refused(capsys, _argv(tiny, tmp_path, bad, *extra), "in use by another dotmoe run",
                     f"pid {child.pid}", "started ")
        assert (tmp_path / "out" / LOCK_NAME).is_file()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock = RunLock.acquire(tmp_path / "out")        # the kernel released it with the process
    lock.release()


# ---------------------------------------------------------------------- bad data

def _bad_data_cases(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"first line\nsecond line with caf\xe9 in it\n")
    jsonl = tmp_path / "cut.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr')
    column = tmp_path / "column.jsonl"
    column.write_text('{"body": "one"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "  "}\n{"text": ""}\n')
    array = tmp_path / "array.json"
    array.write_text('[{"text": "a"},\n {"text": "b",]\n')
    return [(text, ["latin1.txt", "byte offset 31 (line 2)", "--encoding", "--encoding_errors replace"]),
            (jsonl, ["cut.jsonl: line 3: malformed JSON"]),
            (column, ["column.jsonl: line 1: no field 'text' (fields: body)", "--text_column"]),
            (empty, ["--data holds no text"]),
            (array, ["array.json: line 2, column 15: malformed JSON"])]


def test_bad_data_is_refused_before_anything_is_loaded(tiny, tmp_path, capsys, no_expensive_work):
    out = tmp_path / "out"
    for data, needles in _bad_data_cases(tmp_path):
        _refused(capsys, _argv(tiny, tmp_path, data), *needles)
        assert not out.exists()                         # nothing written, not even the folder
    # An existing run folder gets nothing but the lock's own file.
    out.mkdir()
    data, needles = _bad_data_cases(tmp_path)[0]
    train.parse_args(_argv(tiny, tmp_path, data)).save(out / "config.json")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _refused(capsys, _argv(tiny, tmp_path, data), *needles)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_NAME}
    assert after == before and (out / LOCK_NAME).is_file()
    assert not (tmp_path / "cache").exists()


def test_encoding_flags_read_the_file(tiny, tmp_path, no_expensive_work):
    data = _bad_data_cases(tmp_path)[0][0]
    for extra in (["--encoding", "latin-1"], ["--encoding_errors", "replace"]):
        plan = train.preflight(train.parse_args(_argv(tiny, tmp_path, data, *extra)))
        assert plan.data_cfg.encoding == (extra[1] if extra[0] == "--encoding" else "utf-8")
    with pytest.raises(train.DataError, match="--encoding 'utf-9' is not a known text encoding"):
        train.preflight(train.parse_args(_argv(tiny, tmp_path, data, "--encoding", "utf-9")))


def test_a_truncated_json_line_is_named_also_past_the_first_chunk(tmp_path):
    from dotmoe_ds.datacheck import DataFileError, count_documents

    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": "word " * 50}) for _ in range(8000)]     # ~2 MB: several read chunks
    path.write_text("\n".join(lines) + '\n{"text": "cut off')
    with pytest.raises(DataFileError, match=r"big.jsonl: line 8001: malformed JSON"):
        count_documents(path, "json", encoding="utf-8", errors="strict", text_column="text", text_unit="document")
    raw = tmp_path / "big.txt"
    raw.write_bytes(b"a" * (3 << 20) + b"\n\xff")
    with pytest.raises(DataFileError, match=rf"byte offset {(3 << 20) + 1} \(line 2\)"):
        count_documents(raw, "text", encoding="utf-8", errors="strict", text_column="text", text_unit="document")


# ---------------------------------------------------------------------- provenance

def test_loop_time_and_the_uninterrupted_run_time(monkeypatch):
    """add_loop_time adds the seconds since the last step (a state resumed from a checkpoint without
    loop time keeps None); run_seconds is this invocation's wall time + the loop time carried in from
    earlier invocations (a run killed after step 5, checkpointed at 4, resumed: steps 5.. counted once)."""
    from types import SimpleNamespace

    now = iter([10.0, 13.5, 20.0])
    monkeypatch.setattr(runframe.time, "perf_counter", lambda: next(now))
    state, old = SimpleNamespace(loop_seconds=40.0), SimpleNamespace(loop_seconds=None)
    assert runframe.add_loop_time(state, 8.0) == 10.0 and state.loop_seconds == pytest.approx(42.0)
    assert runframe.add_loop_time(state, 10.0) == 13.5 and state.loop_seconds == pytest.approx(45.5)
    assert runframe.add_loop_time(old, 15.0) == 20.0 and old.loop_seconds is None
    assert runframe.run_seconds(25.0, 40.0) == pytest.approx(65.0)   # 40 s of loop before this invocation
    assert runframe.run_seconds(25.0, 0.0) == 25.0                   # a fresh run: its own wall time
    assert runframe.run_seconds(25.0, None) is None


def test_portable_command_and_public_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    cmd = portable_command(["/opt/env/bin/dotmoe", "train", "--model", str(tmp_path / "runs"),
                            f"--data={tmp_path}/a.txt", "--steps", "3"])
    assert cmd == "dotmoe train --model runs --data=a.txt --steps 3"
    assert portable_command([str(tmp_path / "x" / "train.py"), "--output", "/elsewhere/out"]) == \
        f"python x/train.py --output {os.path.relpath('/elsewhere/out')}"
    demo = tmp_path / "demo-model"
    demo.mkdir()
    (demo / "dotmoe_source.json").write_text(json.dumps({"source": f"/site-packages/x/{GGUF_FILE}"}))
    assert public_model_name(demo) == DEMO_HUB_ID
    assert public_model_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert public_model_name(tmp_path / "runs") == "runs"


# ---------------------------------------------------------------------- one text file, end to end

def _absolute_paths(text: str) -> list[str]:
    return re.findall(r"(?<![\w.:/])/[\w.-]+/[\w./-]*", text)


@pytest.fixture(scope="module")
def single_file_run(tiny):
    """One run with default flags on one text file, a model folder that is the demo model (by its
    provenance file), and a second run started on the same OUTPUT while it holds the lock."""
    root = tiny["root"]
    model = root / "demo-model"
    shutil.copytree(tiny["model"], model)
    (model / "dotmoe_source.json").write_text(json.dumps({"source": f"/somewhere/{GGUF_FILE}"}))
    out = root / "single"
    argv = ["--model", str(model), "--data", str(BOOK), "--output", str(out), "--cache_dir", str(root / "cache")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), *argv], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline:
        lock = out / LOCK_NAME
        if lock.is_file() and lock.read_text().strip():
            break
        time.sleep(0.1)
    # The second run, in this process (no start-up time, so the first surely still runs): --overwrite.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        second_rc = train.main([*argv, "--overwrite"])
    still_running = first.poll() is None
    log, _ = first.communicate(timeout=600)
    return {"rc": first.returncode, "log": log, "out": out, "root": root,
            "second": {"rc": second_rc, "stderr": err.getvalue(), "first_was_running": still_running}}


@pytest.mark.slow     # the run behind these three: ~25 s
def test_a_second_run_is_refused_and_the_first_finishes(single_file_run):
    second = single_file_run["second"]
    assert second["first_was_running"]
    assert second["rc"] == runframe.EXIT_USAGE, second["stderr"]
    assert second["stderr"].startswith("dotmoe: error: --output ") and "in use by another dotmoe run" in second["stderr"]
    assert "Traceback" not in second["stderr"]
    assert single_file_run["rc"] == 0, single_file_run["log"][-3000:]
    assert (single_file_run["out"] / "results.json").is_file()


@pytest.mark.slow     # the run behind these three: ~25 s
def test_a_single_text_file_trains_and_evaluates_with_default_flags(single_file_run):
    out, log = single_file_run["out"], single_file_run["log"]
    assert single_file_run["rc"] == 0, log[-3000:]
    res = json.loads((out / "results.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["eval_split"] == "paragraphs" and cfg["data"]["eval_fraction"] == 0.05
    paragraphs = [p for p in re.split(r"\n\s*\n", BOOK.read_text()) if p.strip()]
    held = round(0.05 * len(paragraphs))
    assert f"held out the last {held} of {len(paragraphs)} paragraphs" in log
    assert res["steps"] == 20 and res["dense"]["tokens"] > 0 and res["converted"]["tokens"] == res["dense"]["tokens"]
    assert res["converted"]["perplexity"] > 1


@pytest.mark.slow     # the run behind these three: ~25 s
def test_the_export_names_no_path_of_this_machine(single_file_run):
    model = single_file_run["out"] / "model"
    card = (model / "README.md").read_text()
    meta_text = (model / "dotmoe.json").read_text()
    assert f"base_model: {DEMO_HUB_ID}\n" in card
    meta = json.loads(meta_text)
    assert meta["source_model"] == DEMO_HUB_ID
    assert meta["command"].startswith("python ") and "--data " in meta["command"]
    for text in (card, meta_text):
        assert _absolute_paths(text) == [], _absolute_paths(text)
        assert str(single_file_run["root"]) not in text and sys.executable not in text


# ---------------------------------------------------------------------- damaged checkpoints, end to end

def _train(tiny, out, *extra, env=None):
    argv = ["--model", str(tiny["model"]), "--data", str(BOOK), "--output", str(out), "--steps", "6",
            "--checkpoint_every", "2", "--keep_checkpoints", "3", "--num_experts", "4", "--top_k", "2",
            "--seq_len", "64", "--cache_dir", str(tiny["root"] / "cache"), "--eval_blocks", "4", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "dotmoe_ds" / "train.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _outcome(out):
    res = json.loads((out / "results.json").read_text())
    layers = json.loads((out / "model" / "dotmoe.json").read_text())["layers"]
    return res["final_train_loss"], res["converted"]["mean_nll"], layers


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_same_result(tiny, tmp_path):
    ref = _train(tiny, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    killed = _train(tiny, out, env={"DOTMOE_FAULT": "kill_in_checkpoint:6"})
    assert killed.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000004"
    optim = next((ckpts / "step00000004").glob("*optim_states.pt"))
    with open(optim, "r+b") as f:                       # what a full disk or a killed copy leaves
        f.truncate(optim.stat().st_size // 2)
    resumed = _train(tiny, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step00000004 is damaged" in resumed.stdout and "falling back" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step00000002 at step 2" in resumed.stdout
    loss, nll, layers = _outcome(out)
    ref_loss, ref_nll, ref_layers = _outcome(tmp_path / "ref")
    assert layers == ref_layers                         # the same final assignment
    assert loss == pytest.approx(ref_loss, abs=1e-6) and nll == pytest.approx(ref_nll, abs=1e-6)
    # Every checkpoint damaged: a clear refusal.
    for tag in ("step00000002", "step00000004", "step00000006"):
        rank_file = ckpts / tag / "rank00000.pt"
        if rank_file.exists():
            rank_file.unlink()
    (out / "results.json").unlink()
    refused = _train(tiny, out, "--resume")
    assert refused.returncode == 2 and "dotmoe: error: no intact checkpoint" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def _checkpoint_with_manifest(out, step, files):
    tag = f"step{step:08d}"
    folder = out / "checkpoints" / tag
    folder.mkdir(parents=True)
    manifest = {}
    for name, content in files.items():
        (folder / name).write_bytes(content)
        manifest[name] = [len(content), zlib.crc32(content)]
    (folder / "dotmoe_meta.json").write_text(json.dumps({"step": step, "world_size": 1, "files": manifest}))
    (out / "checkpoints" / "latest").write_text(tag)


def test_preflight_falls_back_past_a_damaged_checkpoint_and_refuses_when_all_are(tiny, tmp_path, capsys,
                                                                               no_expensive_work):
    data = tmp_path / "one.txt"
    data.write_text("A paragraph of text.\n\nAnother paragraph of text.\n")
    argv = _argv(tiny, tmp_path, data)
    out = tmp_path / "out"
    out.mkdir()
    train.parse_args(argv).save(out / "config.json")
    _checkpoint_with_manifest(out, 2, {"a.pt": b"x" * 50})
    _checkpoint_with_manifest(out, 4, {"a.pt": b"y" * 50})
    (out / "checkpoints" / "step00000004" / "a.pt").write_bytes(b"y" * 20)      # truncated
    plan = train.preflight(train.parse_args(argv))
    assert plan.action == "resume" and plan.resume_from.step == 2
    assert "step00000004 is damaged" in capsys.readouterr().out
    (out / "checkpoints" / "step00000002" / "a.pt").unlink()
    _refused(capsys, argv, "no intact checkpoint under", "--overwrite")


@pytest.mark.slow
def test_a_two_rank_run_on_a_locked_output_is_refused_as_a_whole(tiny, tmp_path):
    """Rank 0 alone locks; refused, it exits with 2 and the launcher ends rank 1 (no hang)."""
    import socket

    out = tmp_path / "out"
    lock = RunLock.acquire(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                               str(port), str(ROOT / "dotmoe_ds" / "train.py"), "--model", str(tiny["model"]),
                               "--data", str(BOOK), "--output", str(out), "--seq_len", "64",
                               "--cache_dir", str(tmp_path / "cache")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log[-3000:]
    assert log.count("dotmoe: error: --output") == 1 and f"pid {os.getpid()}" in log
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
