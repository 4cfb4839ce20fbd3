"""What a model costs to serve: the KV cache `generate` really allocates, and greedy decode speed with a KV cache
(prefill time, decode tokens/s, peak memory) after a given prompt."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from gqa.convert.kvcache import kv_cache_bytes_at_context, kv_cache_bytes_per_token


def cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers Cache (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class _TokenClock(BaseStreamer):
    """Timestamps each step of `generate`: the first put() is the prompt, the rest are new tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class PeakMemory:
    """Peak tensor memory allocated above the level at entry.

    CUDA: the caching allocator's own counter. CPU: torch's CPU allocator reports every allocation
    and free to the profiler when memory profiling is on; the peak of their running sum is exact
    for tensors, unlike process RSS, which glibc's reuse of freed pages keeps flat. The profiler
    slows each op down, so on CPU time is measured in a separate run (see measure_decode).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            with _quiet_stderr():
                self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        with _quiet_stderr():
            self.profiler.__exit__(*exc)
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in self.profiler.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        self.peak = peak_of_running_sum(nbytes for _, nbytes in events)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side prints a line at every start and stop."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_of_running_sum(deltas) -> int:
    """The highest level a counter reaches from 0 under signed increments (allocations and frees)."""
    level = peak = 0
    for delta in deltas:
        level += delta
        peak = max(peak, level)
    return peak


def greedy(model, prompt: torch.Tensor, new_tokens: int, pad_id: int, streamer=None):
    # A fresh GenerationConfig: the checkpoint's own sampling defaults must not leak into a greedy run.
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
        pad_token_id=pad_id, eos_token_id=None, return_dict_in_generate=True,
    )
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config, streamer=streamer)


@torch.inference_mode()
def measure_kv_cache(model, prompt: torch.Tensor, pad_id: int, context: int) -> dict[str, Any]:
    """Bytes per token from the config, and what `generate`'s cache really holds for a short prompt, checked
    against what the config says it should hold at that length; the bytes held at `context` tokens."""
    expected = kv_cache_bytes_per_token(model.config, dtype=model.dtype)
    out = greedy(model, prompt, 2, pad_id)
    cached, held = out.past_key_values.get_seq_length(), cache_bytes(out.past_key_values)
    return {
        "bytes_per_token": expected,
        "measured_bytes_per_token": held / cached,
        "matches_config": held == kv_cache_bytes_at_context(model.config, cached, dtype=model.dtype),
        "context": context,
        "bytes_at_context": kv_cache_bytes_at_context(model.config, context, dtype=model.dtype),
    }


@torch.inference_mode()
def measure_decode(model, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> dict[str, Any]:
    """Greedy decode with a KV cache after `prompt`: prefill time, decode tokens/s, peak memory."""
    clock = _TokenClock()
    on_cuda = prompt.device.type == "cuda"
    with PeakMemory(prompt.device) if on_cuda else contextlib.nullcontext() as memory:
        start = time.perf_counter()
        out = greedy(model, prompt, new_tokens, pad_id, streamer=clock)
    if not on_cuda:  # the CPU measure profiles every op: a second, identical run, so timing stays clean
        with PeakMemory(prompt.device) as memory:
            greedy(model, prompt, new_tokens, pad_id)
    # Decode speed counts the steps after the first new token, so prefill is not in it.
    decode_s = clock.times[-1] - clock.times[0]
    return {
        "context": prompt.shape[1],
        "new_tokens": len(clock.times),
        "prefill_s": clock.times[0] - start,
        "decode_s": decode_s,
        "decode_tokens_per_s": (len(clock.times) - 1) / decode_s if decode_s > 0 else float("inf"),
        "kv_cache_bytes": cache_bytes(out.past_key_values),
        "cached_tokens": out.past_key_values.get_seq_length(),
        "peak_memory_bytes": memory.peak,
        "generated": out.sequences[0, prompt.shape[1]:].tolist(),
    }


def prompt_of(stream: Sequence[int], length: int, device: torch.device) -> torch.Tensor:
    """The first `length` tokens of the eval text (repeated when it is shorter): same prompt for both models."""
    tokens = list(stream) * (length // max(len(stream), 1) + 1)
    return torch.tensor([tokens[:length]], device=device)
