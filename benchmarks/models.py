"""Models and prompts for the benchmarks: the tiny test models, or randomly initialised real shapes.

There is no hub here, so a "real" shape is a transformers config with a published model's dimensions
(Qwen2-0.5B for the policy, a Llama-3.2-1B-shaped reward model), random weights, and the tiny byte-level
BPE tokenizer. Compute per token is what the shape dictates (the vocab is the real one, so the embedding and
LM head cost what they cost); the tokenizer only emits ids below 1536, which changes nothing about speed.

    python -m benchmarks.models OUT_DIR [--shape qwen2-0.5b]
"""

from __future__ import annotations

import gzip
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO

PROMPTS_FILE = REPO / "pipelines" / "data" / "arena_hard_prompts_200.jsonl.gz"

# Policy / reward-model shapes. `tiny` is pipelines.tools.tiny_models (hidden 128, 2 layers).
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2-0.5b": {
        # Qwen2-0.5B's config.json: 24 layers, hidden 896, 14 heads (head_dim 64), 2 KV heads.
        "policy": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True),
        # Llama-3.2-1B's dimensions as a 1-output sequence classifier (~1.2B parameters).
        "reward": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=131072, rope_theta=500_000.0, tie_word_embeddings=True),
    },
}


def prepare_models(shape: str, out_dir: str | Path) -> dict[str, str]:
    """name -> model folder: `policy` (causal LM) and `reward` (1-output classifier), plus, for `tiny`,
    everything `build_tiny_models` makes."""
    from pipelines.tools.tiny_models import build_tiny_models

    out = Path(out_dir)
    tiny = build_tiny_models(out / "tiny")
    if shape == "tiny":
        return tiny
    if shape not in SHAPES:
        raise ValueError(f"--model-shape {shape!r} is unknown; choose tiny or one of {sorted(SHAPES)}")
    paths = {"policy": str(out / shape / "policy"), "reward": str(out / shape / "reward")}
    marker = out / shape / ".complete"
    if marker.is_file():
        return paths
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["policy"])
    _save_shaped(Path(paths["policy"]), tok, SHAPES[shape]["policy"], causal=True)
    _save_shaped(Path(paths["reward"]), tok, SHAPES[shape]["reward"], causal=False)
    marker.write_text(shape + "\n")
    return paths


def _save_shaped(path: Path, tokenizer: Any, spec: dict[str, Any], causal: bool) -> None:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    spec = dict(spec)
    arch = spec.pop("arch")
    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    model_cls = {("qwen2", True): Qwen2ForCausalLM, ("qwen2", False): Qwen2ForSequenceClassification,
                 ("llama", True): LlamaForCausalLM, ("llama", False): LlamaForSequenceClassification}[(arch, causal)]
    config = config_cls(
        **spec, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="bfloat16", **({} if causal else {"num_labels": 1}),
    )
    torch.manual_seed(0)
    # Initialise on the GPU when there is one: a 1B model's random init takes minutes on a few CPU cores.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model


def load_prompts(n: int) -> list[dict[str, str]]:
    """n prompts: the 200 shipped Arena-Hard prompts, repeated as needed, each with a unique prompt_id."""
    with gzip.open(PROMPTS_FILE, "rt", encoding="utf-8") as f:
        base = [json.loads(line) for line in f]
    rows = []
    for i, row in enumerate(itertools.islice(itertools.cycle(base), n)):
        rows.append({"prompt_id": f"{row['prompt_id']}-{i // len(base)}", "prompt": row["prompt"],
                     "source": row.get("source", "arena-hard")})
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the benchmark models.")
    ap.add_argument("out_dir")
    ap.add_argument("--shape", default="tiny")
    args = ap.parse_args(argv)
    for name, path in prepare_models(args.shape, args.out_dir).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
