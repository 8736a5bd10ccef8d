"""Write a tiny random dense model folder (weights, config, tokenizer) for offline tests and demos.

    python tools/make_tiny_model.py --family llama --output_dir /tmp/tiny-llama [--seed 0] [--overwrite]

Families: llama, mistral, qwen2, qwen3, olmo2. The folder loads with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` and no network, so it can
stand in for a hub model path in trainer, SLURM and end-to-end tests. Any config field can be
overridden, e.g. `--num_hidden_layers 4 --intermediate_size 256`.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(family: str = "llama", output_dir: str = "tiny-model", seed: int = 0, overwrite: bool = False,
         text_file: str | None = None, **config_overrides) -> None:
    """Save a tiny `family` model to `output_dir` (refused if it exists and is not empty, unless --overwrite)."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    # Imported only now, so a refused call returns at once instead of after loading torch.
    from dotmoe_ds.tiny_models import save_tiny_model

    text = Path(text_file).read_text() if text_file else None
    save_tiny_model(family, out, seed=seed, text=text, **config_overrides)
    print(f"wrote tiny {family} model to {out}")


if __name__ == "__main__":
    fire.Fire(main)
