"""Checkpoint atomicity without DeepSpeed: a stand-in engine writes its files like DeepSpeed does
(several files per tag folder, not atomically); processes are SIGKILLed at the worst moments."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dotmoe_ds.checkpoint import (FAULT_ENV, LATEST, META, CheckpointError, StopSignal, atomic_write_text,
                                  latest_checkpoint, load_checkpoint, prune, rng_state, save_checkpoint,
                                  set_rng_state, tag_for)

ROOT = Path(__file__).resolve().parents[1]

FAKE_ENGINE = '''
import os, signal
from pathlib import Path
import torch

class FakeEngine:
    """Writes two files per tag like DeepSpeed's model and optimizer states; `die_after_first`
    SIGKILLs the process between them (a kill inside engine.save_checkpoint)."""
    def __init__(self, value, die_after_first=False):
        self.value, self.die_after_first = value, die_after_first
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"value": self.value, "client": client_state}, d / "model_states.pt")
        if self.die_after_first:
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save({"adam": self.value * 2}, d / "optim_states.pt")
    def load_checkpoint(self, load_dir, tag, **kwargs):
        obj = torch.load(Path(load_dir) / tag / "model_states.pt", weights_only=False)
        assert (Path(load_dir) / tag / "optim_states.pt").is_file()
        self.value = obj["value"]
        return str(Path(load_dir) / tag), obj["client"]
'''
exec(FAKE_ENGINE)   # noqa: S102  (the same class in this process and in the killed children)


def _save(ckpt, step, value, keep=2):
    return save_checkpoint(FakeEngine(value), ckpt, step, {"step": step}, {"rng": rng_state()}, keep=keep)


def _run_child(ckpt: Path, step: int, value: float, env_extra=None, die_in_engine=False) -> int:
    code = FAKE_ENGINE + textwrap.dedent(f'''
        from dotmoe_ds.checkpoint import save_checkpoint, rng_state
        save_checkpoint(FakeEngine({value}, die_after_first={die_in_engine}), {str(ckpt)!r}, {step},
                        {{"step": {step}}}, {{"rng": rng_state()}})
    ''')
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120).returncode


def test_save_then_load_round_trip(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpt) is None
    torch.manual_seed(7)
    info = _save(ckpt, 3, 1.5)
    expected = torch.rand(4)                     # what the RNG produces right after the save
    assert (info.tag, info.step, info.world_size) == (tag_for(3), 3, 1)
    assert latest_checkpoint(ckpt) == info
    assert (ckpt / LATEST).read_text() == tag_for(3)
    torch.rand(100)                              # move the RNG on
    engine = FakeEngine(0.0)
    client, rank_state = load_checkpoint(engine, info)
    assert engine.value == 1.5 and client == {"step": 3}
    set_rng_state(rank_state["rng"])
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("die_in_engine", [False, True], ids=["after-engine-files", "inside-engine"])
def test_kill_during_a_save_leaves_the_previous_checkpoint_latest(tmp_path, die_in_engine):
    ckpt = tmp_path / "checkpoints"
    assert _run_child(ckpt, 2, 2.0) == 0
    env = {} if die_in_engine else {FAULT_ENV: "kill_in_checkpoint:4"}
    rc = _run_child(ckpt, 4, 4.0, env_extra=env, die_in_engine=die_in_engine)
    assert rc == -signal.SIGKILL
    assert (ckpt / tag_for(4)).is_dir() and not (ckpt / tag_for(4) / META).exists()   # half-written
    latest = latest_checkpoint(ckpt)
    assert latest.step == 2
    engine = FakeEngine(0.0)
    load_checkpoint(engine, latest)
    assert engine.value == 2.0
    # The next save of the same step replaces the partial folder and becomes latest.
    info = _save(ckpt, 4, 4.5)
    assert latest_checkpoint(ckpt) == info
    load_checkpoint(engine, info)
    assert engine.value == 4.5
    assert (ckpt / tag_for(4) / "optim_states.pt").is_file()


def test_saving_an_already_complete_step_keeps_it(tmp_path):
    ckpt = tmp_path / "checkpoints"
    first = _save(ckpt, 5, 1.0)
    again = _save(ckpt, 5, 99.0)
    assert again == first
    engine = FakeEngine(0.0)
    load_checkpoint(engine, first)
    assert engine.value == 1.0


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(ckpt, step, float(step), keep=2)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [tag_for(3), tag_for(4)]
    (ckpt / tag_for(9)).mkdir()                  # a partial folder from a killed, later save
    assert prune(ckpt, keep=1) == [ckpt / tag_for(3), ckpt / tag_for(9)]
    assert latest_checkpoint(ckpt).step == 4


def test_latest_naming_a_deleted_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "checkpoints"
    info = _save(ckpt, 1, 1.0)
    (info.path / META).unlink()
    with pytest.raises(CheckpointError, match="deleted or damaged"):
        latest_checkpoint(ckpt)


def test_resume_with_another_world_size_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoints"
    info = _save(ckpt, 1, 1.0)
    meta = json.loads((info.path / META).read_text())
    meta["world_size"] = 4
    (info.path / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="written by 4 process"):
        load_checkpoint(FakeEngine(0.0), latest_checkpoint(ckpt))


def test_atomic_write_replaces_whole_content(tmp_path):
    p = tmp_path / "pointer"
    atomic_write_text(p, "step00000001")
    atomic_write_text(p, "step2")
    assert p.read_text() == "step2"
    assert [q.name for q in tmp_path.iterdir()] == ["pointer"]     # no temporary left behind


def test_stop_signal_turns_signals_into_a_flag():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


# ---------------------------------------------------------------------- verification

def test_the_manifest_records_every_file_and_catches_damage(tmp_path):
    from dotmoe_ds.checkpoint import file_checksum, resume_candidates, verify_checkpoint

    ckpt = tmp_path / "checkpoints"
    info = _save(ckpt, 2, 2.0)
    meta = json.loads((info.path / META).read_text())
    assert meta["checksum"] == "crc32"
    assert sorted(meta["files"]) == ["model_states.pt", "optim_states.pt", "rank00000.pt"]
    for name, (size, crc) in meta["files"].items():
        assert (info.path / name).stat().st_size == size and file_checksum(info.path / name) == crc
    assert verify_checkpoint(info) is None
    optim = info.path / "optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF                         # same size, one byte flipped
    optim.write_bytes(bytes(data))
    assert verify_checkpoint(info, checksums=False) is None
    assert "fails its crc32 checksum" in verify_checkpoint(info)
    # Spread over two ranks, the flipped file (index 1 of 3) is rank 1's to hash.
    assert verify_checkpoint(info, rank=0, world=2) is None
    assert "fails its crc32 checksum" in verify_checkpoint(info, rank=1, world=2)
    optim.write_bytes(bytes(data[:100]))
    assert "has 100 bytes, its manifest says" in verify_checkpoint(info, checksums=False)
    optim.unlink()
    assert "is missing" in verify_checkpoint(info, checksums=False)
    assert [c.step for c in resume_candidates(ckpt)] == [2]


def test_resume_candidates_skip_lost_folders_and_unfinished_saves(tmp_path):
    from dotmoe_ds.checkpoint import resume_candidates

    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(ckpt, step, float(step), keep=5)
    (ckpt / tag_for(4)).mkdir()                          # a save killed before its manifest
    assert [c.step for c in resume_candidates(ckpt)] == [3, 2, 1]
    import shutil
    shutil.rmtree(ckpt / tag_for(3))                     # `latest` names a folder that is gone
    assert [c.step for c in resume_candidates(ckpt)] == [2, 1]
    (ckpt / LATEST).unlink()
    assert resume_candidates(ckpt) == []


def test_prune_never_counts_a_damaged_checkpoint_towards_keep(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1, 1.0, keep=2)
    _save(ckpt, 2, 2.0, keep=2)
    (ckpt / tag_for(2) / "optim_states.pt").write_bytes(b"cut")     # step 2 damaged on disk
    _save(ckpt, 3, 3.0, keep=2)
    # keep=2 keeps the two newest INTACT checkpoints: 3 and 1; the damaged 2 goes.
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [tag_for(1), tag_for(3)]


def test_confirm_resume_point_falls_back_and_moves_latest(tmp_path, capsys):
    from types import SimpleNamespace

    from dotmoe_ds.checkpoint import resume_candidates
    from dotmoe_ds.runframe import confirm_resume_point

    out = tmp_path / "out"
    ckpt = out / "checkpoints"
    for step in (2, 4):
        _save(ckpt, step, float(step), keep=3)
    newest = resume_candidates(ckpt)[0]
    model = newest.path / "model_states.pt"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0x01
    model.write_bytes(bytes(data))
    plan = SimpleNamespace(output=out, resume_from=newest)
    chosen = confirm_resume_point(plan)
    assert chosen.step == 2 and (ckpt / LATEST).read_text() == tag_for(2)
    log = capsys.readouterr().out
    assert f"{newest.path} is damaged" in log and "fails its crc32 checksum" in log
    plan = SimpleNamespace(output=out, resume_from=chosen)
    data = bytearray((chosen.path / "optim_states.pt").read_bytes())
    data[-10] ^= 0x01
    (chosen.path / "optim_states.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        confirm_resume_point(plan)
