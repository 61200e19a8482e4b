"""Medians and ratios of the raw runs, and the markdown table the README shows."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BASELINE = "transformers"
MODES = {"greedy": "greedy", "beam": "beam-5", "sample": "sampling"}


@dataclass(frozen=True)
class Metric:
    """One table column: a value per run, in a unit where smaller is better."""

    key: str
    header: str
    digits: int
    value: Callable[[dict[str, Any]], float | None]


def _decode(mode: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda run: run["decode"][mode]["ms_per_token"] if mode in run["decode"] else None


METRICS = (
    *(Metric(f"{mode}_ms_per_token", f"{title} ms/token", 1, _decode(mode)) for mode, title in MODES.items()),
    Metric("long_prompt_first_token_ms", "first token after long prompt (ms)", 0, lambda run: run["long_ms"]),
    Metric("load_s", "load (s)", 2, lambda run: run["load_s"]),
    Metric("start_to_first_token_s", "process start to first token (s)", 2, lambda run: run["first_token_s"]),
    Metric("peak_rss_mib", "peak RSS (MiB)", 0, lambda run: run["peak_rss_mib"]),
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each metric over the runs that produced it."""
    summary = {}
    for metric in METRICS:
        values = [value for value in map(metric.value, runs) if value is not None]
        if values:
            summary[metric.key] = statistics.median(values)
    return summary


def _cell(summary: dict[str, float], baseline: dict[str, float], metric: Metric) -> str:
    value = summary[metric.key]
    text = f"{value:.{metric.digits}f}"
    if metric.key in baseline and value > 0:
        text += f" ({baseline[metric.key] / value:.2f}×)"
    return text


SERVING = (
    "Serving under load (gpt2-serve with continuous batching, the thread-per-request server it replaced, llama.cpp's "
    "llama-server): [serve_results.md](serve_results.md), written by `python benchmarks/serve_load.py`."
)


def cpu_kind(cpu: str) -> str:
    """The kind of CPU a run's numbers belong to ("Intel Xeon", "AMD EPYC"), or the CPU's own name for others."""
    name = cpu.lower()
    for family, kind in (("xeon", "Intel Xeon"), ("epyc", "AMD EPYC")):
        if family in name:
            return kind
    return cpu


def runs_by_cpu(saved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results file's runs, one per kind of CPU (a file of one run, as written before kinds, counts as its)."""
    if "by_cpu" in saved:
        return saved["by_cpu"]
    return {cpu_kind(saved["meta"]["machine"]["cpu"]): saved}


def page(by_cpu: dict[str, dict[str, Any]]) -> str:
    """The results page: one section per kind of CPU, each the newest run on such a machine."""
    text = [
        "# Benchmark results",
        "",
        "One row set per kind of CPU (the machines here are AMD EPYC or Intel Xeon, at random): `run.py` replaces "
        "the section of the kind it runs on and keeps the others. Compare rows within a section only.",
    ]
    for kind in sorted(by_cpu):
        text += ["", f"## {kind}", "", markdown(by_cpu[kind])]
    text += ["", SERVING]
    return "\n".join(text) + "\n"


def markdown(results: dict[str, Any]) -> str:
    """One run's section: what was measured and how, the table, and what could not be measured and why."""
    meta, systems = results["meta"], results["systems"]
    settings, machine = meta["settings"], meta["machine"]
    baseline = next((s["summary"] for s in systems if s["key"] == BASELINE and s["status"] == "measured"), {})
    notes: list[str] = []
    header = ["system", *(metric.header for metric in METRICS), "versions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system in systems:
        cells = [system["title"]]
        if system["status"] != "measured":
            notes.append(f"{system['title']}: {system['reason']}")
            cells += [f"not measured (note {len(notes)})"] + ["–"] * (len(METRICS) - 1) + [""]
        else:
            if not system["quiet_runs"]:
                notes.append(f"{system['title']}: no quiet run; its numbers are medians over noisy runs")
                cells[0] += f" (noisy, note {len(notes)})"
            missing = [metric for metric in METRICS if metric.key not in system["summary"]]
            if missing:
                headers = ", ".join(metric.header for metric in missing)
                notes.append(f"{system['title']}: {headers} not measured (a mode the system does not offer)")
            for metric in METRICS:
                cells.append(
                    _cell(system["summary"], baseline, metric) if metric not in missing else f"– (note {len(notes)})"
                )
            cells.append(system["label"])
        lines.append("| " + " | ".join(cells) + " |")
    for system in systems:
        for error in system.get("errors", []):
            notes.append(f"{system['title']}: a run failed: {error}")
        for warning in system.get("warnings", []):
            notes.append(f"{system['title']}: {warning}")
    shape, new = settings["shape"], settings["new_tokens"]
    background = meta["background_cpu_share"]
    text = [
        f"Measured {meta['date']} with `{meta['command']}` on {machine['cpu']} ({machine['cores']} cores used, "
        f"{machine['memory_gib']:.0f} GiB, {machine['platform']}, Python {machine['python']}).",
        "",
        f"GPT-2 {shape['name']} shape ({shape['n_layer']} layers, {shape['n_head']} heads, n_embd {shape['n_embd']}, "
        f"vocab 50257) with seeded random weights (seed {settings['seed']}"
        + (", with trained GPT-2's outliers: `export-gpt2 --outliers`" if settings.get("outliers") else "")
        + "), batch 1, "
        f"a {len(settings['prompt'])}-token prompt. Decode ms/token = (time for {new} new tokens - time for 1) / "
        f"{new - 1}; beam-5 is beam search with 5 beams, sampling uses top_k 50. The long prompt has "
        f"{settings['long_prompt_tokens']} tokens. Load and first token are counted from the process spawn. "
        f"{settings['rounds']} round(s); each round runs every system once, each in a fresh process, in "
        "rotating order, after a warm-up. In brackets: transformers ÷ system (above 1 = faster or smaller than "
        "transformers + PyTorch).",
        "",
        *lines,
        "",
        f"Noise: other processes' share of the CPUs during the runs, median {background['median']:.0%}, max "
        f"{background['max']:.0%}. A run during which they took over {settings['noise_share']:.0%} is noisy and is "
        f"run again (at most {settings['retries']} times); medians are over the quiet runs, or over all runs for a "
        "system that had none. Quiet runs / runs: "
        + ", ".join(f"{s['title']} {s['quiet_runs']}/{len(s['runs'])}" for s in systems if s["status"] == "measured")
        + ".",
    ]
    if notes:
        text += ["", "Notes:", "", *(f"{index}. {note}" for index, note in enumerate(notes, 1))]
    return "\n".join(text)
