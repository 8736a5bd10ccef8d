"""The trainer's single-process parts: bad input caught before any expensive work, the objective
and the temperature schedule. The multi-rank runs are in test_train_multirank.py (slow)."""
import math

import pytest
import torch
from transformers import AutoConfig

from dotmoe_ds import train
from dotmoe_ds.layer import DotMoEFFN, set_mode
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_model("llama", root / "llama")
    text = root / "text"
    text.mkdir()
    (text / "a.txt").write_text("It is a truth universally acknowledged. " * 200)
    held = root / "held.txt"
    held.write_text("However little known the feelings or views of such a man may be. " * 100)
    return {"model": model, "data": text, "held": held, "root": root}


def _args(tiny, tmp_path, **over):
    flags = {"model": str(tiny["model"]), "data": str(tiny["data"]), "eval_data": str(tiny["held"]),
             "output": str(tmp_path / "out"), "num_experts": "4", "top_k": "2", "seq_len": "32",
             "cache_dir": str(tmp_path / "cache")}
    flags.update({k: v for k, v in over.items() if v is not None})
    for k in [k for k, v in over.items() if v is None]:
        flags.pop(k)
    return [x for k, v in flags.items() for x in (f"--{k}", v)]


def _fails_cleanly(capsys, argv, *needles):
    assert train.main(argv) == train.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dotmoe: error: ")
    assert "Traceback" not in err and err.count("\n") == 1          # one paragraph, one line
    for needle in needles:
        assert needle in err, err


def test_missing_data(tiny, tmp_path, capsys, no_expensive_work):
    _fails_cleanly(capsys, _args(tiny, tmp_path, data=str(tmp_path / "nope.txt")), "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_data(tiny, tmp_path, capsys, no_expensive_work):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails_cleanly(capsys, _args(tiny, tmp_path, data=str(empty)), "every file is empty")


def test_model_that_is_not_a_causal_lm(tiny, tmp_path, capsys, no_expensive_work):
    AutoConfig.for_model("t5").save_pretrained(tmp_path / "t5")
    _fails_cleanly(capsys, _args(tiny, tmp_path, model=str(tmp_path / "t5")), "is not a causal language model",
                   "'t5'")


def test_model_folder_without_config(tiny, tmp_path, capsys, no_expensive_work):
    (tmp_path / "weights").mkdir()
    _fails_cleanly(capsys, _args(tiny, tmp_path, model=str(tmp_path / "weights")), "has no config.json")
    _fails_cleanly(capsys, _args(tiny, tmp_path, model=str(tmp_path / "absent")), "no such folder")


def test_unsupported_family(tiny, tmp_path, capsys, no_expensive_work):
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    _fails_cleanly(capsys, _args(tiny, tmp_path, model=str(tmp_path / "gpt2")), "unsupported model",
                   "'gpt2'", "llama")


def test_top_k_above_num_experts(tiny, tmp_path, capsys, no_expensive_work):
    _fails_cleanly(capsys, _args(tiny, tmp_path, top_k="5"), "--top_k=5 must be between 1 and --num_experts=4")


def test_shared_expert_on_a_family_without_one(tiny, tmp_path, capsys, no_expensive_work):
    olmo2 = save_tiny_model("olmo2", tmp_path / "olmo2")
    capsys.readouterr()
    _fails_cleanly(capsys, _args(tiny, tmp_path, model=str(olmo2), shared_neurons="16"), "shared expert",
                   "supported for: llama, mistral, qwen2")


def test_seq_len_above_the_context(tiny, tmp_path, capsys, no_expensive_work):
    _fails_cleanly(capsys, _args(tiny, tmp_path, seq_len="512"), "seq_len 512 exceeds", "256")


def test_existing_output_without_overwrite_or_resume(tiny, tmp_path, capsys, no_expensive_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails_cleanly(capsys, _args(tiny, tmp_path), "already exists", "--overwrite", "--resume")
    _fails_cleanly(capsys, _args(tiny, tmp_path) + ["--resume"], "no complete checkpoint")
    # --overwrite refuses a folder that is not a dotmoe run
    _fails_cleanly(capsys, _args(tiny, tmp_path) + ["--overwrite"], "only replaces dotmoe run folders")
    assert (out / "notes.txt").read_text() == "mine"


def test_unknown_flag_and_bad_deepspeed_config(tiny, tmp_path, capsys, no_expensive_work):
    _fails_cleanly(capsys, _args(tiny, tmp_path) + ["--topk", "2"], "unknown flag --topk", "--top_k")
    _fails_cleanly(capsys, _args(tiny, tmp_path, deepspeed=str(tmp_path / "none.json")), "no such file")


def test_preflight_accepts_good_input(tiny, tmp_path):
    cfg = train.parse_args(_args(tiny, tmp_path))
    plan = train.preflight(cfg)
    assert plan.action == "fresh" and plan.spec == MoESpec.uniform(96, 4, 2)
    assert plan.adapter.name == "llama"


# ---------------------------------------------------------------------- objective pieces

def test_tau_schedule_endpoints_and_monotone():
    for sched in ("cosine", "linear"):
        taus = [train.tau_at(s, 20, 1.0, 0.05, sched) for s in range(20)]
        assert taus[0] == pytest.approx(1.0) and taus[-1] == pytest.approx(0.05)
        assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert train.tau_at(7, 20, 0.7, 0.05, "constant") == 0.7
    mid = train.tau_at(10, 21, 1.0, 0.0 + 1e-9, "cosine")
    assert mid == pytest.approx(0.5, abs=1e-6)


def test_kd_loss_is_the_kl_divergence():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert train.kd_loss(t, t, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(t / 2, -1)
    expected = 4 * (p * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    assert train.kd_loss(s, t, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def _ffn(seed=0):
    torch.manual_seed(seed)
    d, d_ff, spec = 16, 24, MoESpec.uniform(24, 4, 2)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)   # noqa: E731
    layer = DotMoEFFN(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), torch.nn.functional.silu, spec,
                      init_assignment=torch.arange(d_ff) % 4, router_weight=torch.randn(4, d), mode="ste")
    return layer.train()


def test_aux_losses_enter_through_the_layer_output_with_the_right_gradient():
    """The hook-attached load-balance + z-loss gives the router exactly the gradient of adding
    them to the loss directly (mean over layers, divided by the accumulation steps)."""
    x = torch.randn(3, 5, 16)
    direct = _ffn()
    y = direct(x)
    stats = direct.last_router_stats
    lb_value, z_value = stats.load_balance.item(), stats.z_loss.item()
    ((y.square().mean()) + (0.3 * stats.load_balance + 0.1 * stats.z_loss) / (1 * 2)).backward()

    hooked = _ffn()
    aux = train.AuxLosses([hooked], lb_weight=0.3, z_weight=0.1, grad_accum=2)
    y2 = hooked(x)
    y2.square().mean().backward()
    for a, b in ((direct.router.weight, hooked.router.weight), (direct.scores, hooked.scores)):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    lb, z = aux.take()
    assert lb == pytest.approx(lb_value) and z == pytest.approx(z_value)
    assert aux.take() == (0.0, 0.0)
    # Dense mode and no-grad forwards (teacher, evaluation) attach nothing.
    set_mode(hooked, "dense")
    assert hooked(x).grad_fn is not None and aux.count == 0
    aux.remove()


def test_results_table_mentions_both_models():
    res = {"method": "dot", "budget": MoESpec.uniform(96, 4, 2).to_dict(),
           "dense": {"perplexity": 36.6, "mean_nll": math.log(36.6), "tokens": 1000},
           "converted": {"perplexity": 48.8, "mean_nll": math.log(48.8), "tokens": 1000}, "retention": 0.75}
    table = train.results_table(res)
    assert "dense" in table and "36.60" in table and "48.80" in table and "75.0%" in table
    assert "E=4, k=2" in table and "50%" in table and "trained weights" not in table
    # With the FFN weights trained, the dense row says it ran them, not the original model.
    trained = train.results_table({**res, "dense_weights": "trained"}).splitlines()
    assert trained[2].startswith("dense (trained weights, every neuron)") and trained[2].split()[-3] == "36.60"


# ---------------------------------------------------------------------- output folder states

def _fake_checkpoint(out, step, world_size):
    import json

    tag = f"step{step:08d}"
    (out / "checkpoints" / tag).mkdir(parents=True)
    (out / "checkpoints" / tag / "dotmoe_meta.json").write_text(json.dumps({"step": step, "world_size": world_size}))
    (out / "checkpoints" / "latest").write_text(tag)


def test_output_folder_states(tiny, tmp_path, capsys, no_expensive_work):
    argv = _args(tiny, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    train.parse_args(argv).save(out / "config.json")
    # Stopped before its first checkpoint: the same command starts it again.
    assert train.preflight(train.parse_args(argv)).action == "restart"
    _fails_cleanly(capsys, argv + ["--num_experts", "8"], "holds a run with other settings",
                   "--num_experts 4 -> 8")
    # A complete checkpoint: the same command resumes (what a requeued SLURM job does).
    _fake_checkpoint(out, 2, world_size=1)
    plan = train.preflight(train.parse_args(argv))
    assert plan.action == "resume" and plan.resume_from.step == 2
    assert train.preflight(train.parse_args(argv + ["--resume"])).action == "resume"
    (out / "checkpoints" / "latest").unlink()
    import shutil
    shutil.rmtree(out / "checkpoints")
    _fake_checkpoint(out, 4, world_size=2)
    _fails_cleanly(capsys, argv, "written by 2 process(es) but this run has 1")
    # A finished run is never resumed silently.
    shutil.rmtree(out / "checkpoints")
    _fake_checkpoint(out, 4, world_size=1)
    (out / "results.json").write_text("{}")
    _fails_cleanly(capsys, argv, "holds a finished run", "--overwrite")
    assert train.preflight(train.parse_args(argv + ["--overwrite"])).action == "overwrite"
