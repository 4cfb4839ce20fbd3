"""Report files for `gqa eval`: JSON, markdown tables and PNG plots.

Everything here takes the results dict that `gqa.train.evaluate.evaluate` returns, so the report can
be rebuilt from `eval.json` alone. Plots use matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from gqa.convert.diskspace import disk_full_is_an_error, remove  # noqa: E402
from gqa.convert.sizes import human_bytes  # noqa: E402
from gqa.convert.modeldir import apply_umask, public_record  # noqa: E402

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Keys of a metrics.jsonl record that are x-axes or bookkeeping, not curves to plot.
_NOT_CURVES = {"step", "tokens", "tokens_seen", "epoch", "time", "timestamp", "elapsed_s"}
# The original model's figure for a curve K is recorded as BASELINE + K (baseline_eval_perplexity, ...).
BASELINE = "baseline_"
# Recovery curves: held-out perplexity, and task scores keyed task/<name>/<metric>; plotted against `tokens`.
PERPLEXITY = "eval_perplexity"
TASK = "task/"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a trainer's metrics.jsonl (one JSON object per line); bad lines are skipped with a warning."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON; skipped", path, number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Quality and KV-cache table, task scores, then decode speed per context: what the card and the CLI show."""
    models = results["models"]
    kv_context = results["kv_context"]
    data = results.get("data")
    per_byte = bool(data) and any(m.get("bits_per_byte") is not None for m in models)
    lines = [
        f"| | KV / query heads | KV cache / token | KV cache @ {kv_context} tokens | perplexity |"
        + (" bits per byte |" if per_byte else "") + " top-1 agreement | KL(baseline‖model) |",
        "|---|---|---|---|---|" + ("---|" if per_byte else "") + "---|---|",
    ]
    agreement = results.get("agreement")
    for m in models:
        kv = m["kv_cache"]
        is_model = m["role"] == "model"
        top1 = _fmt(agreement["top1"], 4) if (agreement and is_model) else "-"
        kl = _fmt(agreement["kl_mean"], 4) if (agreement and is_model) else "-"
        lines.append(
            f"| {m['role']}: `{m['name']}` | {m['kv_heads']} / {m['num_attention_heads']} | "
            f"{human_bytes(kv['bytes_per_token'])} | {human_bytes(kv['bytes_at_context'])} | "
            f"{_fmt(m.get('perplexity'))} |" + (f" {_fmt(m.get('bits_per_byte'), 4)} |" if per_byte else "")
            + f" {top1} | {kl} |"
        )
    if data:
        lines += ["", perplexity_note(data) + f"; {results['dtype']} on {results['device']}."]
    if results.get("tasks"):
        lines += ["", *task_table(results["tasks"])]
    contexts = sorted({d["context"] for m in models for d in m["decode"]})
    if contexts:
        lines += [
            "",
            "| decode, greedy | " + " | ".join(f"{c} ctx: tok/s" for c in contexts) + " | peak memory @ longest |",
            "|---|" + "---|" * len(contexts) + "---|",
        ]
        for m in models:
            by_ctx = {d["context"]: d for d in m["decode"]}
            speeds = [_fmt(by_ctx[c]["decode_tokens_per_s"], 1) if c in by_ctx else "-" for c in contexts]
            longest = by_ctx[max(by_ctx)] if by_ctx else None
            peak = human_bytes(longest["peak_memory_bytes"]) if longest else "-"
            lines.append(f"| {m['role']}: `{m['name']}` | " + " | ".join(speeds) + f" | {peak} |")
        lines += ["", f"{results['decode_new_tokens']} new tokens after a prompt of the context length; "
                  f"peak memory is {results['peak_memory_kind']}."]
    return "\n".join(lines)


def perplexity_note(data: dict[str, Any]) -> str:
    """How the perplexity was obtained: the convention, the text and the windows."""
    if data.get("convention", "documents") == "stream":
        how = (f"stream convention: each document one token stream, every token predicted once, windows of up to "
               f"{data['seq_len']} inputs, as lm-eval's loglikelihood_rolling")
    else:
        how = (f"documents convention: EOS after each document, {data['chunks']} windows of {data['seq_len']} "
               "tokens, as gqa train scores held-out blocks")
    return f"Perplexity on {data['predicted_tokens']} predicted tokens of {', '.join(data['names'])} ({how})"


def task_table(tasks: dict[str, Any]) -> list[str]:
    """Task scores next to the baseline's, with lm-eval's stderr, and how they were obtained."""
    rows = tasks["rows"]
    with_base = any(r["baseline"] is not None for r in rows)
    lines = ["| task | metric | model |" + (" baseline | model / baseline |" if with_base else ""),
             "|---|---|---|" + ("---|---|" if with_base else "")]
    for r in rows:
        line = f"| `{r['task']}` | {r['metric']} | {_with_stderr(r['model'], r['model_stderr'])} |"
        if with_base:
            line += f" {_with_stderr(r['baseline'], r['baseline_stderr'])} | {_fmt(r['ratio'])} |"
        lines.append(line)
    settings = tasks["settings"]
    shots = "each task's default few-shot" if settings["num_fewshot"] is None else f"{settings['num_fewshot']}-shot"
    limit = f"the first {settings['limit']} items of each" if settings["limit"] is not None else "all items"
    counts = ", ".join(sorted({f"{r['task']}: {r['samples']}" for r in rows if r.get("samples") is not None}))
    lines += ["", f"Tasks scored by lm-evaluation-harness {tasks['lm_eval_version']}: {shots}, {limit} "
              f"({counts} items), seed {settings['seed']}, batch size {settings['batch_size']}; "
              "± is lm-eval's standard error."]
    return lines


def _with_stderr(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return _fmt(value, 4) + (f" ± {stderr:.4f}" if isinstance(stderr, float) and math.isfinite(stderr) else "")


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_quality_vs_kv(results: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in results["models"]:
        x = m["kv_cache"]["bytes_per_token"] / 1024
        ax.scatter([x], [m["perplexity"]], s=60, label=f"{m['role']}: {m['name']}")
        ax.annotate(f"{m['kv_heads']} KV heads", (x, m["perplexity"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("KV cache per token (KiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Quality against KV-cache size")
    return _save(fig, ax, path)


def plot_tasks(results: dict[str, Any], path: Path) -> Path | None:
    """Each task metric of the model next to the baseline's, with stderr bars."""
    rows = (results.get("tasks") or {}).get("rows") or []
    if not rows:
        return None
    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    has_base = any(r["baseline"] is not None for r in rows)
    width = 0.4 if has_base else 0.6
    ax.bar([i - (width / 2 if has_base else 0) for i in x], [r["model"] for r in rows], width,
           yerr=[r["model_stderr"] or 0 for r in rows], label="model", capsize=3)
    if has_base:
        ax.bar([i + width / 2 for i in x], [r["baseline"] or 0 for r in rows], width,
               yerr=[r["baseline_stderr"] or 0 for r in rows], label="baseline", capsize=3)
    ax.set_xticks(list(x), labels, fontsize="small")
    ax.set_ylabel("score (lm-eval)")
    ax.set_title("Downstream tasks")
    return _save(fig, ax, path)


def plot_decode_speed(results: dict[str, Any], path: Path) -> Path | None:
    if not any(m["decode"] for m in results["models"]):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in results["models"]:
        runs = sorted(m["decode"], key=lambda d: d["context"])
        ax.plot([d["context"] for d in runs], [d["decode_tokens_per_s"] for d in runs], marker="o",
                label=f"{m['role']}: {m['name']} ({m['kv_heads']} KV heads)")
    ax.set_xscale("log", base=2)
    contexts = sorted({d["context"] for m in results["models"] for d in m["decode"]})
    ax.set_xticks(contexts, [str(c) for c in contexts])  # plain numbers, not powers of two
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens / s (greedy, KV cache)")
    ax.set_title(f"Decode speed on {results['device']}")
    return _save(fig, ax, path)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _baseline_of(records: list[dict[str, Any]], key: str) -> float | None:
    """The original's figure for curve `key`: the last record holding BASELINE + key, or None."""
    values = [r[BASELINE + key] for r in records if _number(r.get(BASELINE + key))]
    return values[-1] if values else None


def training_figure(records: list[dict[str, Any]]):
    """One panel per numeric metric in the trainer's metrics.jsonl, against step; a baseline's figure is a
    dashed line in its metric's panel. None when the records hold no metric."""
    keys = sorted({k for r in records for k, v in r.items()
                   if k not in _NOT_CURVES and not k.startswith(BASELINE) and _number(v)})
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in records if _number(r.get(key))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        baseline = _baseline_of(records, key)
        if baseline is not None:
            ax.axhline(baseline, linestyle="--", color="gray", label="original")
            ax.legend(fontsize="small")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("Training curves (metrics.jsonl)")
    fig.tight_layout()
    return fig


def plot_training_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    return _write_figure(training_figure(records), path)


def recovery_curves(records: list[dict[str, Any]]) -> list[str]:
    """The recovery curves the records hold, one panel each: held-out perplexity first, then task scores."""
    keys = {k for r in records if _number(r.get("tokens")) for k, v in r.items() if _number(v)}
    return [k for k in (PERPLEXITY, *sorted(k for k in keys if k.startswith(TASK))) if k in keys]


def _recovery_points(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(tokens, value) of curve `key`, in token order; a point recorded twice (a run restarted from the same
    step) counts once, the later record winning."""
    by_tokens = {r["tokens"]: r[key] for r in records if _number(r.get("tokens")) and _number(r.get(key))}
    xs = sorted(by_tokens)
    return xs, [by_tokens[x] for x in xs]


def recovery_figure(records: list[dict[str, Any]]):
    """The recovery figure (matplotlib), or None when the records hold no curve with tokens: each curve
    against tokens trained, a point per evaluation, the original's figure as a dashed line."""
    curves = recovery_curves(records)
    if not curves:
        return None
    fig, axes = plt.subplots(len(curves), 1, figsize=(6, 3 * len(curves)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], curves):
        xs, ys = _recovery_points(records, key)
        ax.plot(xs, ys, marker="o", label="converted")
        baseline = _baseline_of(records, key)
        if baseline is not None:
            ax.axhline(baseline, linestyle="--", color="gray", label="original")
        values = ys + ([baseline] if baseline is not None else [])
        if min(values) > 0 and max(values) > 10 * min(values):  # a start far off the original stays readable
            ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity" if key == PERPLEXITY else key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("tokens trained")
    axes[-1, 0].xaxis.set_major_formatter(EngFormatter())  # 120 k, 2 M: token counts read at a glance
    axes[0, 0].set_title("Recovery (metrics.jsonl)")
    fig.tight_layout()
    return fig


def plot_recovery(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the recovery figure (see recovery_figure) to `path`; None when there is nothing to draw."""
    return _write_figure(recovery_figure(records), path)


def _write_figure(fig, path: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


REPORT_FILES = {"markdown": "eval.md", "quality_vs_kv": "quality_vs_kv.png", "tasks": "tasks.png",
                "decode_speed": "decode_speed.png", "training_curves": "training_curves.png", "recovery": "recovery.png",
                "json": "eval.json"}  # fmt: skip


def write_report(results: dict[str, Any], report_dir: str | Path, metrics: list[dict[str, Any]] | None) -> dict[str, str]:
    """Write eval.json, eval.md and the PNG plots into report_dir; return {kind: path}. On a full disk the files
    this report began are removed (a report cut short is no report) and GQAError names report_dir; its message
    carries the scores' table, so the evaluation's result is not lost with the report.

    A report is made to be shared: it names local paths (models, data) as provenance does, relative to
    report_dir where they lie inside it and by name elsewhere (gqa.convert.modeldir.public_record)."""
    report_dir = Path(report_dir)
    results = public_record(results, report_dir)
    created = not report_dir.exists()
    path = {kind: report_dir / name for kind, name in REPORT_FILES.items()}
    begun: list[Path] = []

    def cut_short() -> None:
        for file in begun:
            remove(file)
        if created:
            with contextlib.suppress(OSError):
                report_dir.rmdir()

    then = "nothing of the report was kept; the scores were:\n" + markdown_table(results)
    with disk_full_is_an_error(report_dir, f"the eval report {report_dir}", then, cleanup=cut_short):
        report_dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        begun.append(path["markdown"])
        path["markdown"].write_text(markdown_table(results) + "\n")
        files["markdown"] = str(path["markdown"])
        plots = {
            "quality_vs_kv": lambda p: plot_quality_vs_kv(results, p) if results.get("data") else None,
            "tasks": lambda p: plot_tasks(results, p),
            "decode_speed": lambda p: plot_decode_speed(results, p),
            "training_curves": lambda p: plot_training_curves(metrics, p) if metrics else None,
            "recovery": lambda p: plot_recovery(metrics, p) if metrics else None,
        }
        for kind, plot in plots.items():
            begun.append(path[kind])
            if plot(path[kind]) is None:  # nothing to draw: no file written
                begun.pop()
            else:
                files[kind] = str(path[kind])
        files["json"] = str(path["json"])
        # eval.json is written last so that it lists every file the report holds.
        begun.append(path["json"])
        listed = {kind: Path(file).name for kind, file in files.items()}
        path["json"].write_text(json.dumps({**results, "report_files": listed}, indent=2) + "\n")
    for file in files.values():
        apply_umask(file)
    return files
