"""Converter benchmark: `gqa convert` against `cp -r` of the same checkpoint, side by side.

The targets: converting a 7B-shaped Llama (bf16, ~13.5 GB, sharded) to 8 KV heads takes
at most 1.2 times as long as copying the checkpoint directory, and the converter's peak resident
memory stays at or below 1.5 GiB. Memory-mapped pages count toward RSS, so a converter that maps
whole shards and touches them all fails the memory bar even though it allocates little itself.

What one run does:
  1. writes (or reuses) a random-weight Llama checkpoint of the requested shape, one shard at a time;
  2. times `cp -r SOURCE OUT` and `gqa convert SOURCE OUT --kv-heads G` (and any --variant, e.g. a
     branch's converter), rotating which goes first, each started from the same page-cache state
     (dropped, then the program alone warmed on a 1-layer model) and each timed up to the `sync`
     that makes its output durable (so neither is credited for writes the kernel had not done yet);
  3. samples the resident memory of each command's process tree every 50 ms with psutil, and reads
     its exact high-water mark (ru_maxrss, read by a small launcher process; see LAUNCHER);
  4. checks the converted output from its safetensors headers (names, shapes, dtypes, config) and
     the values of one layer's pooled K/V heads, without loading the checkpoint;
  5. prints a table with the ratio and pass/fail against both targets (optionally writes JSON);
     exits 0 only when `convert` meets both targets and its output checks out.

Smoke version (seconds):
    .venv/bin/python bench/bench_convert.py --layers 2 --hidden 512 --heads 8 --kv-heads 2 \
        --intermediate 1376 --vocab 1000 --source-shard-size 5MB --checkpoint-dir /tmp/gqa-bench/smoke
Full version (the targets above; generating the checkpoint takes a few minutes the first time):
    .venv/bin/python bench/bench_convert.py --repeats 2 --json /tmp/gqa-bench/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

GIB = 1024**3
MANIFEST = "bench_checkpoint.json"  # marks a finished, reusable generated checkpoint
DTYPE = torch.bfloat16


# --------------------------------------------------------------------------- source checkpoint


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,  # the source is MHA
        max_position_embeddings=4096,
        tie_word_embeddings=False,  # as in Llama-2-7b: lm_head is its own 262 MB tensor
        dtype="bfloat16",
    )


def checkpoint_spec(args: argparse.Namespace) -> dict:
    """Everything that determines the generated files; a cached checkpoint is reused only if it matches."""
    return {
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": args.heads,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "dtype": "bfloat16",
        "shard_size": args.source_shard_size,
        "seed": args.seed,
        "generator": 1,  # bump when the way tensors are written changes
    }


def cached_checkpoint_ok(path: Path, spec: dict) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("spec") != spec:
        return False
    # A truncated or edited file invalidates the cache; sizes are a cheap, sufficient check here.
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in manifest["files"].items())


def write_checkpoint(path: Path, args: argparse.Namespace) -> None:
    """Write a random-weight Llama checkpoint, holding at most one shard's tensors in memory.

    Tensor names and shapes come from transformers' own LlamaForCausalLM built on the meta device
    (no memory), and the shard plan from huggingface_hub's splitter, so the result is laid out like
    a `save_pretrained` checkpoint and loads with `from_pretrained`.
    """
    config = llama_config(args)
    with torch.device("meta"):
        layout = LlamaForCausalLM(config).to(DTYPE).state_dict()
    split = split_torch_state_dict_into_shards(layout, max_shard_size=args.source_shard_size)

    partial = path.with_name(path.name + ".partial")  # renamed into place only when complete
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.manual_seed(args.seed)
    bar = tqdm(total=sum(t.numel() * t.element_size() for t in layout.values()), unit="B", unit_scale=True, desc="writing source")
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            meta = layout[name]
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(meta.shape, dtype=DTYPE)  # RMSNorm gains start at 1 in real models
            else:
                # normal_ straight into bf16 is the cheapest random fill torch has (~200 M values/s on 2 cores).
                shard[name] = torch.empty(meta.shape, dtype=DTYPE).normal_(0.0, 0.02)
        save_file(shard, partial / filename, metadata={"format": "pt"})
        bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
        del shard  # free this shard before generating the next
    bar.close()
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(partial)

    files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
    (partial / MANIFEST).write_text(json.dumps({"spec": checkpoint_spec(args), "files": files}, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


# --------------------------------------------------------------------------- running and measuring


def process_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, anonymous RSS) of one process, in bytes; (0, 0) once it has exited.

    psutil's `shared` is the file-backed plus shmem part of RSS on Linux, so rss - shared is the
    memory the process allocated itself; the difference is mapped file pages (mmap'd shards).
    """
    try:
        info = proc.memory_info()
    except psutil.Error:
        return 0, 0
    return info.rss, info.rss - info.shared


# Runs the measured command and reports its exact high-water RSS. It has to be a separate, small
# process: Linux carries a process's RSS high-water mark across exec, so a command spawned straight
# from this (torch-importing, ~350 MB) process would report at least this process's RSS as its
# ru_maxrss. Spawned from this ~8 MB launcher, ru_maxrss is the command's own (floor: ~8 MB).
LAUNCHER = """
import os, resource, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status = os.waitpid(pid, 0)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
"""


def timed_run(argv: list[str], log_path: Path, interval: float) -> dict:
    """Run argv to completion, then sync; return wall times, peak memory and CPU time."""
    peak = {"rss": 0, "anon": 0}
    done = threading.Event()
    report = log_path.with_suffix(".rusage")
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *argv]

    with open(log_path, "wb") as log:
        start = time.perf_counter()
        child = subprocess.Popen(launcher, stdout=log, stderr=subprocess.STDOUT)
        ps_launcher = psutil.Process(child.pid)

        def sample() -> None:
            # Sum over the launcher's descendants only: the command and anything it starts.
            while not done.is_set():
                rss = anon = 0
                try:
                    procs = ps_launcher.children(recursive=True)
                except psutil.Error:
                    procs = []
                for p in procs:
                    rss_p, anon_p = process_memory(p)
                    rss, anon = rss + rss_p, anon + anon_p
                peak["rss"] = max(peak["rss"], rss)
                peak["anon"] = max(peak["anon"], anon)
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        child.wait()
        exited = time.perf_counter()
        done.set()
        sampler.join()
    os.sync()  # both commands pay for their writes reaching the disk
    synced = time.perf_counter()
    try:
        code, maxrss_kib, cpu = report.read_text().split()
        report.unlink()
    except (OSError, ValueError):  # the launcher itself failed (e.g. command not found)
        code, maxrss_kib, cpu = child.returncode or 1, 0, 0
    return {
        "argv": argv,
        "returncode": int(code),
        "seconds_exit": exited - start,
        "seconds": synced - start,
        "peak_rss_sampled": peak["rss"],
        "peak_anon_rss_sampled": peak["anon"],
        "ru_maxrss": int(maxrss_kib) * 1024,  # Linux reports KiB
        "cpu_seconds": float(cpu),
        "log": str(log_path),
    }


def can_drop_caches() -> bool:
    try:
        drop_caches()
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_through(path: Path) -> None:
    """Read every file once so the page cache holds the source (the fallback when caches can't be dropped)."""
    for f in sorted(path.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass


def tiny_args(args: argparse.Namespace) -> argparse.Namespace:
    """A one-layer model with the same heads and KV heads: just enough to exercise a command's code."""
    return argparse.Namespace(**{**vars(args), "layers": 1, "hidden": 8 * args.heads, "intermediate": 64, "vocab": 64, "source_shard_size": "5GB"})


def warm_programs(argvs: dict[str, list[str]], outs: dict[str, Path]) -> None:
    """Run each command once on the tiny checkpoint, so the program's own files (Python, torch,
    transformers: hundreds of MB of libraries) are in the page cache while the benchmark's data is
    not. Without this, a cold-cache run charges the converter several seconds of library loading
    that a copy never pays and that has nothing to do with how it handles 13 GB."""
    for name, argv in argvs.items():
        shutil.rmtree(outs[name], ignore_errors=True)
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(outs[name], ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- checking the output


def tensor_headers(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, shape, shard file), read from safetensors headers only (no tensor data)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        weight_map, shards = None, ["model.safetensors"]
    headers = {}
    for shard in shards:
        with safe_open(path / shard, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                headers[name] = (sl.get_dtype(), tuple(sl.get_shape()), shard)
    if weight_map is not None and {n: h[2] for n, h in headers.items()} != weight_map:
        raise ValueError("index weight_map does not match the tensors found in the shards")
    return headers


def load_one(path: Path, headers: dict, name: str) -> torch.Tensor:
    with safe_open(path / headers[name][2], framework="pt") as f:
        return f.get_tensor(name)


def verify_output(source: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """Problems found in the converted checkpoint (empty list = fine)."""
    problems = []
    try:
        config = json.loads((out / "config.json").read_text())
        src_h, out_h = tensor_headers(source), tensor_headers(out)
    except (OSError, ValueError) as err:
        return [f"cannot read output: {err}"]
    if config.get("num_key_value_heads") != args.kv_heads:
        problems.append(f"config num_key_value_heads={config.get('num_key_value_heads')}, expected {args.kv_heads}")
    if config.get("num_attention_heads") != args.heads:
        problems.append(f"config num_attention_heads={config.get('num_attention_heads')}, expected {args.heads}")
    if set(src_h) != set(out_h):
        problems.append(f"tensor names differ: missing {sorted(set(src_h) - set(out_h))[:3]}, extra {sorted(set(out_h) - set(src_h))[:3]}")
    head_dim = args.hidden // args.heads  # the generated config's head_dim is this by construction
    for name in sorted(set(src_h) & set(out_h)):
        dtype, shape, _ = src_h[name]
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            shape = (args.kv_heads * head_dim, shape[1])
        if out_h[name][:2] != (dtype, shape):
            problems.append(f"{name}: {out_h[name][:2]}, expected {(dtype, shape)}")
    # Values of one layer: mean of contiguous head groups (the converter's default method), computed
    # in float32. 2 x (hidden x hidden) tensors, so cheap even at 7B shape.
    group = args.heads // args.kv_heads
    for proj in ("k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        if name not in out_h or problems:
            break
        w = load_one(source, src_h, name).float()
        expected = w.view(args.kv_heads, group, head_dim, -1).mean(1).reshape(args.kv_heads * head_dim, -1)
        got = load_one(out, out_h, name).float()
        try:
            torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-5)  # bf16 rounding of the mean
        except AssertionError as err:
            problems.append(f"{name} is not the mean of contiguous head groups: {str(err).splitlines()[-1]}")
    return problems


# --------------------------------------------------------------------------- report


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def print_report(result: dict) -> None:
    print()
    m = result["machine"]
    print(f"machine: {m['cpus']} CPUs, {m['ram_gib']:.0f} GiB RAM, {m['platform']}")
    print(f"source:  {result['source']} ({result['source_bytes']:,} bytes in {result['source_shards']} shards)")
    print(f"cache:   {result['cache_mode']}")
    for name, argv in result["argv"].items():
        print(f"{name + ':':<9}{shlex.join(argv)}")
    print()
    head = (
        f"{'run':>3} {'command':<10} {'s (exit)':>9} {'s (+sync)':>10} {'peak RSS GiB':>13} {'ru_maxrss GiB':>14} "
        f"{'anon GiB':>9} {'CPU s':>7} {'bytes out':>15} {'load1':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in result["runs"]:
        print(
            f"{r['repeat']:>3} {r['name']:<10} {r['seconds_exit']:>9.1f} {r['seconds']:>10.1f} "
            f"{fmt_gib(r['peak_rss_sampled']):>13} {fmt_gib(r['ru_maxrss']):>14} {fmt_gib(r['peak_anon_rss_sampled']):>9} "
            f"{r['cpu_seconds']:>7.1f} {r['bytes_out']:>15,} {r['load_before'][0]:>6.2f}"
        )
    print()
    print(f"medians over {result['repeats']} rounds, times include the final sync; targets: ratio <= "
          f"{result['max_ratio']}, peak RSS <= {result['max_rss_gib']} GiB (peak = max of ru_maxrss and the samples)")
    for name, s in result["summary"].items():
        line = f"{name:<10} {s['seconds']:7.1f} s   peak RSS {fmt_gib(s['peak_rss'])} GiB"
        if name != "copy":
            line += (
                f"   ratio {s['ratio']:.2f} {'PASS' if s['time_ok'] else 'FAIL'}"
                f"   RSS {'PASS' if s['rss_ok'] else 'FAIL'}"
                f"   output {'verified' if s['verified'] else 'not verified' + (': ' + '; '.join(s['problems'][:5]) if s['problems'] else '')}"
            )
        print(line)


# --------------------------------------------------------------------------- main


def default_convert_template() -> str:
    gqa = Path(sys.executable).parent / "gqa"
    exe = shlex.quote(str(gqa)) if gqa.exists() else f"{shlex.quote(sys.executable)} -m gqa.train.cli"
    return exe + " convert {source} {out} --kv-heads {kv_heads}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shape = p.add_argument_group("model shape (defaults: Llama-2-7B)")
    shape.add_argument("--layers", type=int, default=32)
    shape.add_argument("--hidden", type=int, default=4096)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--intermediate", type=int, default=11008)
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument("--kv-heads", type=int, default=8, help="KV heads to convert to")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/gqa-bench/llama7b"), help="where the generated source checkpoint is cached")
    p.add_argument("--work-dir", type=Path, default=None, help="where outputs are written (default: beside --checkpoint-dir, same filesystem)")
    p.add_argument("--source-shard-size", default="5GB", help="shard size of the generated source, in bytes ('5GB' = 5e9); also the generator's peak memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regenerate", action="store_true", help="rewrite the source checkpoint even if a matching one is cached")
    p.add_argument("--repeats", type=int, default=2, help="rounds of all commands; the order rotates between rounds")
    p.add_argument("--cache", choices=["auto", "cold", "warm"], default="auto", help="cold: drop the page cache before each timed command (needs root); warm: read the source through before each; auto: cold if allowed")
    p.add_argument("--convert-cmd", default=None, help="command template with {source} {out} {kv_heads} (default: the gqa console script beside this Python)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=TEMPLATE", help="another converter command to time in the same rounds (e.g. a branch), reported beside `convert`")
    p.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, seconds")
    p.add_argument("--max-ratio", type=float, default=1.2)
    p.add_argument("--max-rss-gib", type=float, default=1.5)
    p.add_argument("--no-verify", action="store_true", help="skip checking the converted output")
    p.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads or args.hidden % args.heads:
        p.error("--heads must divide --hidden and --kv-heads must divide --heads")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    for v in args.variant:
        name, sep, _ = v.partition("=")
        if not sep or not name.isidentifier() or name in ("copy", "convert"):
            p.error(f"--variant {v!r}: write NAME=TEMPLATE with a NAME other than copy/convert")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.checkpoint_dir.resolve()
    work = (args.work_dir or source.parent / "runs").resolve()

    if not args.regenerate and cached_checkpoint_ok(source, checkpoint_spec(args)):
        print(f"reusing generated checkpoint {source}")
    else:
        t = time.perf_counter()
        write_checkpoint(source, args)
        print(f"generated {source} in {time.perf_counter() - t:.0f} s")

    work.mkdir(parents=True, exist_ok=True)
    if os.stat(work).st_dev != os.stat(source).st_dev:
        print(f"warning: {work} is not on the same filesystem as {source}; copy and convert may not compare fairly")
    cache_mode = args.cache
    if cache_mode in ("auto", "cold"):
        if can_drop_caches():
            cache_mode = "cold"
        elif cache_mode == "cold":
            print("cannot drop the page cache (needs root); use --cache warm", file=sys.stderr)
            return 2
        else:
            cache_mode = "warm"

    templates = {"convert": args.convert_cmd or default_convert_template()}
    templates.update(v.split("=", 1) for v in args.variant)

    def commands(src: Path, out: Path) -> tuple[dict[str, list[str]], dict[str, Path]]:
        outs = {name: out / f"{name}-out" for name in ["copy", *templates]}
        argvs = {"copy": ["cp", "-r", str(src), str(outs["copy"])]}
        for name, template in templates.items():
            argvs[name] = [tok.format(source=src, out=outs[name], kv_heads=args.kv_heads) for tok in shlex.split(template)]
        return argvs, outs

    argvs, outs = commands(source, work)
    tiny = work / "warmup-source"
    if not cached_checkpoint_ok(tiny, checkpoint_spec(tiny_args(args))):
        write_checkpoint(tiny, tiny_args(args))
    (work / "warmup").mkdir(exist_ok=True)
    warm_argvs, warm_outs = commands(tiny, work / "warmup")

    def prepare() -> None:
        if cache_mode == "cold":
            drop_caches()
        else:
            read_through(source)
        warm_programs(warm_argvs, warm_outs)

    names = list(argvs)
    runs, problems = [], {name: None for name in templates}  # None: not checked yet
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate: each goes first in turn
        for name in order:
            shutil.rmtree(outs[name], ignore_errors=True)
            prepare()
            load_before = os.getloadavg()
            print(f"[{repeat}] {name}: {shlex.join(argvs[name])}", flush=True)
            run = timed_run(argvs[name], work / f"{name}.log", args.interval)
            run.update(name=name, repeat=repeat, load_before=load_before, load_after=os.getloadavg())
            run["bytes_out"] = dir_bytes(outs[name]) if outs[name].exists() else 0
            runs.append(run)
            if run["returncode"] != 0:
                print(Path(run["log"]).read_text(errors="replace")[-3000:], file=sys.stderr)
                print(f"{name} exited with {run['returncode']}; log: {run['log']}", file=sys.stderr)
                return 1
            if name != "copy" and not args.no_verify and problems[name] is None:
                problems[name] = verify_output(source, outs[name], args)
            shutil.rmtree(outs[name], ignore_errors=True)

    summary = {}
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        summary[name] = {
            "seconds": statistics.median(r["seconds"] for r in mine),
            "peak_rss": max(max(r["ru_maxrss"], r["peak_rss_sampled"]) for r in mine),
            "bytes_out": mine[0]["bytes_out"],
        }
    for name in templates:
        s = summary[name]
        s["ratio"] = s["seconds"] / summary["copy"]["seconds"]
        s["time_ok"] = s["ratio"] <= args.max_ratio
        s["rss_ok"] = s["peak_rss"] <= args.max_rss_gib * GIB
        s["verified"] = problems[name] == []
        s["problems"] = problems[name] or []
    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": argvs,
        "source": str(source),
        "source_bytes": dir_bytes(source) - (source / MANIFEST).stat().st_size,
        "source_shards": len(list(source.glob("*.safetensors"))),
        "spec": checkpoint_spec(args) | {"kv_heads": args.kv_heads},
        "cache_mode": cache_mode
        + (" (page cache dropped before each command" if cache_mode == "cold" else " (source read through before each command")
        + "; then every program runs once on a 1-layer model so its code, not its data, is cached)",
        "repeats": args.repeats,
        "max_ratio": args.max_ratio,
        "max_rss_gib": args.max_rss_gib,
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": psutil.virtual_memory().total / GIB,
            "platform": platform.platform(),
            "load_at_end": os.getloadavg(),
        },
        "runs": runs,
        "summary": summary,
    }
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    main_ok = summary["convert"]
    return 0 if main_ok["time_ok"] and main_ok["rss_ok"] and (main_ok["verified"] or args.no_verify) else 1


if __name__ == "__main__":
    sys.exit(main())
