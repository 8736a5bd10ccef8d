"""CUDA variants of the core checks: each result on the GPU against the same computation on the CPU.

Skipped without CUDA (every CPU machine, CI included); tools/gpu_check.sh runs them on a GPU
(step `cuda_tests`). Tolerances, and why:
- fp32 layer, Sinkhorn plan and gradients: 1e-5 absolute. The same float32 operations in another
  order (GPU reductions are tree-shaped); TF32 stays off for float32 products (PyTorch's default,
  and a fixture here makes sure), so no 10-bit-mantissa products sneak in.
- float64 Sinkhorn: 1e-12 (the plan is O(1); float64 rounding differences stay near 1e-15 per op).
- rounding: identical assignments. It runs on the CPU in float64 whatever the input's device, so a
  GPU plan must give the very same hard assignment as the CPU plan it equals to 1e-5 (the test
  also checks that no two scores of a row are closer than that, so the comparison is meaningful).
- fp32 export on the GPU: 1e-4, DESIGN.md contract 1, as on the CPU.
- bf16 export: the exact part is the tensors: the exported ones are bit-identical to the bf16
  conversion model's own weights (rows picked, down projections multiplied by k = 2, exact in
  bf16). The logits cannot be: the conversion model applies the gates as one mask before a single
  down projection, the reloaded MoE sums per-expert bf16 outputs, and a router near-tie in bf16 can
  pick another expert for a token. Measured with this test's helpers on the CPU in bf16 (logits up
  to 3.4): per-token max |conversion - export| median ~0.02, largest 0.21 (one token), and the
  export 0.21 from the fp32 logits. Asserted: the median token within 2^-5 x max|logit| of the bf16
  conversion model, every logit within 2^-3 x max|logit| of the fp32 conversion (a wrong expert,
  scale or layout moves logits by O(max|logit|)).
The helpers take a `device` so the same code runs on the CPU as a reference (`run_all('cpu')`).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dotmoe_ds.export import export_moe
from dotmoe_ds.families import adapter_for
from dotmoe_ds.layer import DotMoEFFN, set_mode
from dotmoe_ds.sinkhorn import marginal_error, round_to_assignment, sinkhorn
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh)")

FP32_ATOL = 1e-5
FP64_ATOL = 1e-12
EXPORT_FP32_ATOL = 1e-4
BF16_MEDIAN_REL = 2.0 ** -5
BF16_MAX_REL = 2.0 ** -3


def _partition(spec: MoESpec, gen: torch.Generator) -> torch.Tensor:
    cols = torch.cat([torch.full((c,), j) for j, c in enumerate(spec.column_capacities)])
    return cols[torch.randperm(spec.d_ff, generator=gen)]


def _layer(device: str, spec: MoESpec, seed: int = 0) -> DotMoEFFN:
    """A DotMoEFFN over a random SwiGLU MLP, scores perturbed so the plan is not one-hot."""
    gen = torch.Generator().manual_seed(seed)
    d, d_ff = 32, spec.d_ff
    gate, up = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
    down = nn.Linear(d_ff, d, bias=False)
    for lin in (gate, up, down):
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.2)
    layer = DotMoEFFN(gate, up, down, nn.functional.silu, spec, init_assignment=_partition(spec, gen),
                      router_weight=torch.randn(spec.num_experts, d, generator=gen) * 0.5, tau=0.5, mode="ste")
    with torch.no_grad():
        layer.scores.add_(0.3 * torch.randn(layer.scores.shape, generator=gen))
    return layer.to(device).train()


def layer_results(device: str) -> dict:
    spec = MoESpec.uniform(48, 4, top_k=2)
    layer = _layer(device, spec)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    out = {}
    for mode in ("ste", "hard"):
        layer.mode = mode
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        out[mode] = {"y": y.detach().cpu(), "x.grad": x.grad.cpu().clone(),
                     "router.grad": layer.router.weight.grad.cpu().clone(),
                     "scores.grad": None if layer.scores.grad is None else layer.scores.grad.cpu().clone(),
                     "assign": layer.hard_assignment().cpu()}
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return out


def sinkhorn_results(device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 256, 8, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    caps = [32] * 8
    plan = sinkhorn(scores, caps, tau=0.3, n_iters=500, tol=None)
    weight = torch.randn(plan.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    (plan * weight).sum().backward()
    return {"plan": plan.detach().cpu(), "grad": scores.grad.cpu(), "marginal": marginal_error(plan.detach(), caps).item()}


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 products in full float32 (PyTorch's default; set here in case an import changed it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_layer_on_cuda_matches_cpu():
    cpu, gpu = layer_results("cpu"), layer_results("cuda")
    for mode in ("ste", "hard"):
        assert torch.equal(cpu[mode]["assign"], gpu[mode]["assign"])
        for key in ("y", "x.grad", "router.grad", "scores.grad"):
            if cpu[mode][key] is None:
                assert gpu[mode][key] is None
                continue
            diff = (cpu[mode][key] - gpu[mode][key]).abs().max().item()
            assert diff <= FP32_ATOL, f"{mode} {key}: cpu vs cuda differ by {diff:.2e}"
    assert cpu["ste"]["scores.grad"].abs().max() > 1e-4      # the STE really sends gradient to the scores


@pytest.mark.parametrize("dtype,atol", [(torch.float32, FP32_ATOL), (torch.float64, FP64_ATOL)])
def test_sinkhorn_on_cuda_matches_cpu(dtype, atol):
    cpu, gpu = sinkhorn_results("cpu", dtype), sinkhorn_results("cuda", dtype)
    assert (cpu["plan"] - gpu["plan"]).abs().max().item() <= atol
    assert (cpu["grad"] - gpu["grad"]).abs().max().item() <= atol * 10   # implicit backward: one linear solve
    assert gpu["marginal"] <= (1e-4 if dtype == torch.float32 else 1e-9)


def test_rounding_of_a_cuda_plan_equals_the_cpu_rounding():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 512, 8, generator=gen)
    caps = [64] * 8
    top2 = scores.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-5 * 10   # no near-ties a 1e-5 difference could flip
    plan_cpu = sinkhorn(scores, caps, tau=0.5, n_iters=300, tol=None)
    plan_gpu = sinkhorn(scores.cuda(), caps, tau=0.5, n_iters=300, tol=None)
    a_cpu, a_gpu = round_to_assignment(plan_cpu, caps), round_to_assignment(plan_gpu, caps)
    assert a_gpu.device.type == "cuda"
    assert torch.equal(a_cpu, a_gpu.cpu())
    for layer in a_gpu.cpu():
        assert torch.bincount(layer, minlength=8).tolist() == caps            # capacity-exact


# ---------------------------------------------------------------------- export

def _converted(device: str, dtype: torch.dtype, seed: int = 5):
    """Tiny llama, every MLP a DotMoEFFN (random partition and router), hard mode, on device/dtype."""
    model = tiny_model("llama", seed=seed).to(device, dtype)
    spec = MoESpec.uniform(model.config.intermediate_size, 4, top_k=2)
    gen = torch.Generator().manual_seed(seed)
    adapter = adapter_for(model.config)
    adapter.swap_in(model, lambda i, g, u, d, act: DotMoEFFN(
        g, u, d, act, spec, init_assignment=_partition(spec, gen),
        router_weight=torch.randn(spec.num_experts, model.config.hidden_size, generator=gen)))
    set_mode(model, "hard")
    return model.eval(), adapter, spec


def _tokens(device: str) -> torch.Tensor:
    return torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(1)).to(device)


@torch.no_grad()
def export_results(device: str, dtype: torch.dtype, folder) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, adapter, spec = _converted(device, dtype)
    x = _tokens(device)
    expected = model(x).logits.float().cpu()
    export_moe(model, adapter, spec, folder)
    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    got = moe(x).logits.float().cpu()
    # On-disk tensors vs the conversion model's own: every expert row is a dense row (x k for down).
    disk = {}
    for f in sorted(folder.glob("*.safetensors")):
        disk.update(load_file(f))
    mlp = adapter.mlps(model)[0]
    weights = mlp.materialise()
    first = {n: t for n, t in adapter.moe_tensors(0, weights, adapter.expert_intermediate_size(spec, 8))}
    same = all(torch.equal(disk[n].cpu(), t.to(disk[n].dtype).cpu()) for n, t in first.items())
    return {"expected": expected, "got": got, "tensors_equal": same, "dtype_on_disk": {t.dtype for t in disk.values()}}


def test_fp32_export_on_cuda_is_exact(tmp_path):
    r = export_results("cuda", torch.float32, tmp_path / "moe")
    assert r["tensors_equal"]
    assert (r["got"] - r["expected"]).abs().max().item() <= EXPORT_FP32_ATOL


def test_bf16_export_on_cuda_is_exact_to_bf16(tmp_path):
    ref = export_results("cuda", torch.float32, tmp_path / "fp32")["expected"]
    r = export_results("cuda", torch.bfloat16, tmp_path / "bf16")
    assert r["tensors_equal"] and r["dtype_on_disk"] == {torch.bfloat16}
    scale = ref.abs().max().item()
    per_token = (r["got"] - r["expected"]).abs().amax(-1).flatten()
    assert per_token.median().item() <= BF16_MEDIAN_REL * scale, per_token.tolist()
    export_err = (r["got"] - ref).abs().max().item()
    assert export_err <= BF16_MAX_REL * scale, f"bf16 export off by {export_err:.3g} (logits up to {scale:.3g})"
