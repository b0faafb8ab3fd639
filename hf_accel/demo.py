"""`hf-accel demo`: accelerate a small local model and show what changed — memory, speed, output.

The default model is the project's `tiny` reference (a Llama trained on the Python standard library, shipped with
the package); without it, a small random Llama is built from a config. Nothing is downloaded."""

from __future__ import annotations

import copy
import time

import torch

from . import apply, get_config
from .measure import decode_tokens_per_s, weight_bytes

PROMPTS = ["def main(", "import os\n\n\nclass ", "    for i in range(", "# Copyright", "    def __init__(self"]


def _load_default():
    try:
        from .quality import load_reference

        model, tokenizer = load_reference("tiny")
        return model, tokenizer, "hf_accel tiny reference (Llama trained on the Python stdlib)"
    except Exception:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4)
        return LlamaForCausalLM(config), None, "random-weight Llama built from a config (no reference model found)"


def _generate(model, tokenizer, prompt: str, device, new_tokens: int) -> tuple[str, torch.Tensor]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device) if tokenizer else torch.tensor([[1, 2, 3]], device=device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    text = tokenizer.decode(out[0], skip_special_tokens=True) if tokenizer else str(out[0].tolist())
    return text, out


def run(spec: str = "int8", device: str | None = None, new_tokens: int = 24) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, tokenizer, origin = _load_default()
    base = base.to(device).eval()
    accel = apply(copy.deepcopy(base), spec)
    print(f"model: {origin}; {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters on {device}")
    print(f"accel: {get_config(accel)}\n")

    prompt_ids = (tokenizer("def main(", return_tensors="pt").input_ids if tokenizer else torch.tensor([[1, 5, 9]])).to(device)
    rows = []
    for name, model in (("baseline", base), ("accelerated", accel)):
        rows.append((name, weight_bytes(model), decode_tokens_per_s(model, prompt_ids, new_tokens=new_tokens)))
    print(f"{'':<12} {'weights':>10} {'decode tok/s':>13}")
    for name, nbytes, tps in rows:
        print(f"{name:<12} {nbytes / 2**20:>8.2f}MB {tps:>13.1f}")
    memory_ratio = rows[0][1] / rows[1][1]
    speed_ratio = rows[1][2] / rows[0][2]
    print(f"{'ratio':<12} {memory_ratio:>9.2f}x {speed_ratio:>12.2f}x   (memory smaller, speed faster)")
    if device.type == "cpu":
        print("note: on CPU the plugins run their plain-torch reference paths; speed comes from the Triton kernels on GPU")

    same = 0
    print()
    for prompt in PROMPTS:
        a_text, a_ids = _generate(base, tokenizer, prompt, device, new_tokens)
        b_text, b_ids = _generate(accel, tokenizer, prompt, device, new_tokens)
        same += torch.equal(a_ids, b_ids)
        if prompt is PROMPTS[0]:
            print(f"before: {a_text!r}\nafter:  {b_text!r}\n")
    print(f"greedy continuations identical for {same}/{len(PROMPTS)} prompts")
    return {"weight_ratio": memory_ratio, "speed_ratio": speed_ratio, "identical": same / len(PROMPTS)}


def main() -> None:
    t0 = time.perf_counter()
    run()
    print(f"(demo took {time.perf_counter() - t0:.1f}s)")
