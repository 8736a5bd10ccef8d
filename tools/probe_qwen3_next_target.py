"""Probe (issue 15): can Qwen3-Next (transformers' Qwen3NextForCausalLM) carry a dense Qwen3 model plus a
shared expert exactly? Not used by the package; kept to reproduce the finding in README ("Shared
experts by family").

Mapping tried: every layer full attention (layer_types), partial_rotary_factor 1.0; its gated attention
gets zero gate rows in q_proj (sigmoid(0) = 0.5) and a doubled o_proj; its zero-centred RMSNorms
(x * (1 + w)) get w - 1; the dense FFN becomes the shared expert (shared gate weight 0 -> 0.5, down
projection doubled), routed experts zero. Prints the largest logit difference to the dense Qwen3.

    PYTHONPATH=. .venv/bin/python tools/probe_qwen3_next_target.py
"""
import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from dotmoe_ds.tiny_models import tiny_model


def main() -> None:
    dense = tiny_model("qwen3", seed=0)
    c = dense.config
    H, hd = c.num_attention_heads, c.head_dim
    cfg = Qwen3NextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=H, num_key_value_heads=c.num_key_value_heads, head_dim=hd,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, hidden_act=c.hidden_act, attention_bias=False,
        rope_parameters={**c.rope_parameters, "partial_rotary_factor": 1.0},
        layer_types=["full_attention"] * c.num_hidden_layers, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=8, shared_expert_intermediate_size=c.intermediate_size, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id)
    target = Qwen3NextForCausalLM(cfg).eval()
    src = dense.state_dict()
    with torch.no_grad():
        for name, p in target.named_parameters():
            p.zero_()
        tgt = dict(target.named_parameters())
        tgt["model.embed_tokens.weight"].copy_(src["model.embed_tokens.weight"])
        if not c.tie_word_embeddings:
            tgt["lm_head.weight"].copy_(src["lm_head.weight"])
        tgt["model.norm.weight"].copy_(src["model.norm.weight"] - 1)
        for i in range(c.num_hidden_layers):
            s, t = f"model.layers.{i}.", f"model.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
                tgt[t + norm + ".weight"].copy_(src[s + norm + ".weight"] - 1)
            q = src[s + "self_attn.q_proj.weight"].view(H, hd, -1)
            qg = torch.cat([q, torch.zeros_like(q)], dim=1).reshape(2 * H * hd, -1)   # per head: [query; gate]
            tgt[t + "self_attn.q_proj.weight"].copy_(qg)
            for k in ("k_proj", "v_proj"):
                tgt[t + f"self_attn.{k}.weight"].copy_(src[s + f"self_attn.{k}.weight"])
            tgt[t + "self_attn.o_proj.weight"].copy_(2 * src[s + "self_attn.o_proj.weight"])
            for k in ("gate_proj", "up_proj"):
                tgt[t + f"mlp.shared_expert.{k}.weight"].copy_(src[s + f"mlp.{k}.weight"])
            tgt[t + "mlp.shared_expert.down_proj.weight"].copy_(2 * src[s + "mlp.down_proj.weight"])
    x = torch.randint(3, c.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (target(x).logits - dense(x).logits).abs().max().item()
        scale = dense(x).logits.abs().max().item()
    print(f"Qwen3 (tiny, head_dim {hd}) -> Qwen3-Next, dense FFN as shared expert: max logit difference "
          f"{diff:.3g} (max |logit| {scale:.3g})")


if __name__ == "__main__":
    main()
