"""Decode benchmark: tokens/s, time to first token, peak memory and % of the bandwidth limit, through `generate()`.

    rows = bench_model("meta-llama/Llama-3.2-1B", "fast", batch_sizes=[1, 8], prompt_lengths=[512])

Decode speed = batch x (N - 1) / (t(N new tokens) - t(1 new token)): the prefill and the call's fixed costs cancel.
Time to first token = t(1). Every generate call is forced to its length (`min_new_tokens`), greedy. The bandwidth
limit of a configuration is the device's copy bandwidth (bytes read + written, measured in the same process)
divided by the bytes a decode step must read: every weight once (the input embedding only if tied to the output)
plus the K/V of all rows at the mean length of the measured window.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (median of `repeats`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def graph_ms(fns, replays: int = 15) -> float:
    """Median ms of one replay of a CUDA graph that runs every fn once, after a warm-up on a side stream (CPU: median
    wall time of three eager passes). Benchmarks time many small kernels this way, free of launch gaps."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for f in fns:
                f()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def weight_bytes_per_step(model) -> int:
    """Bytes of parameters a decode step reads: all of them, except an input embedding not shared with the head."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    skip = set()
    if embed is not None and (head is None or head.weight.data_ptr() != embed.weight.data_ptr()):
        skip.add(embed.weight.data_ptr())
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or p.data_ptr() in skip:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(model.dtype).bits // 8


def random_prompts(batch: int, length: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).to(device)


def timed_generate(model, ids, new_tokens: int, **kwargs) -> float:
    sync(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, **kwargs)
    sync(ids.device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return elapsed


def measure(model, label: str, batch: int, prompt: int, new_tokens: int, *, repeats: int = 3, copy_bw: float | None = None,
            **generate_kwargs) -> dict[str, Any]:
    """One row: warm up (compiles, captures), then median times of N and of 1 new tokens."""
    device = next(model.parameters()).device
    ids = random_prompts(batch, prompt, model.get_output_embeddings().weight.shape[0], device)
    start = time.perf_counter()
    timed_generate(model, ids, new_tokens, **generate_kwargs)
    timed_generate(model, ids, 1, **generate_kwargs)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_n = statistics.median(timed_generate(model, ids, new_tokens, **generate_kwargs) for _ in range(repeats))
    t_1 = statistics.median(timed_generate(model, ids, 1, **generate_kwargs) for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    decode_tok_s = batch * (new_tokens - 1) / max(t_n - t_1, 1e-9)
    step_bytes = weight_bytes_per_step(model) + batch * (prompt + new_tokens / 2) * kv_bytes_per_token(model)
    row = {
        "mode": label, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
        "decode_tok_s": decode_tok_s, "ms_per_step": 1e3 * (t_n - t_1) / (new_tokens - 1),
        "ttft_s": t_1, "t_n_s": t_n, "warmup_s": warmup - (t_n + t_1), "peak_mem_gb": peak / 1e9,
        "bytes_per_step_gb": step_bytes / 1e9,
    }
    if copy_bw and copy_bw == copy_bw:
        row["limit_tok_s"] = batch * copy_bw / step_bytes
        row["pct_of_limit"] = 100 * decode_tok_s / row["limit_tok_s"]
    return row


def bench_model(model_or_id, spec: str | None = "fast", *, batch_sizes=(1,), prompt_lengths=(128,), new_tokens: int = 64,
                dtype: str | torch.dtype | None = None, device: str | None = None, repeats: int = 3, baseline: bool = True,
                progress: bool = True) -> list[dict[str, Any]]:
    """Rows for transformers' generate (`baseline`) and for the model with `spec` applied, per batch x prompt.

    `model_or_id`: a loaded model (benchmarked where it is) or a Hub id / local path, loaded in `dtype` on `device`
    (default: CUDA when available)."""
    import hf_accel
    from tqdm.auto import tqdm

    model = model_or_id
    if isinstance(model_or_id, str):
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_or_id, dtype=dtype or "auto").to(device).eval()
    device = next(model.parameters()).device
    copy_bw = copy_bandwidth(device)
    configs = [(b, p) for b in batch_sizes for p in prompt_lengths]
    modes = (["transformers"] if baseline else []) + ([spec] if spec else [])
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(configs) * len(modes), desc="hf-accel bench", disable=not progress)
    for mode in modes:
        if mode != "transformers":
            hf_accel.apply(model, mode)
        for batch, prompt in configs:
            bar.set_postfix_str(f"{mode} batch={batch} prompt={prompt}")
            rows.append(measure(model, mode, batch, prompt, new_tokens, repeats=repeats, copy_bw=copy_bw))
            bar.update()
    bar.close()
    base = {(r["batch"], r["prompt"]): r["decode_tok_s"] for r in rows if r["mode"] == "transformers"}
    for r in rows:
        if r["mode"] != "transformers" and (r["batch"], r["prompt"]) in base:
            r["speedup"] = r["decode_tok_s"] / base[(r["batch"], r["prompt"])]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("mode", "{}"), ("batch", "{}"), ("prompt", "{}"), ("decode_tok_s", "{:.1f}"), ("ms_per_step", "{:.2f}"),
            ("ttft_s", "{:.3f}"), ("peak_mem_gb", "{:.1f}"), ("pct_of_limit", "{:.0f}%"), ("speedup", "{:.2f}x")]
    cols = [(c, f) for c, f in cols if any(c in r for r in rows)]
    table = [[c for c, _ in cols]] + [[f.format(r[c]) if c in r else "" for c, f in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)
