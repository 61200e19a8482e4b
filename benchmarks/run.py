"""Benchmark gpt2-onnx against transformers, optimum, CTranslate2 and onnxruntime-genai on this machine.

    python benchmarks/run.py                       # every system, 5 rounds: benchmarks/results.md + results.json
                                                   # (this CPU kind's section replaced, the others kept)
    python benchmarks/run.py --quick               # 2 rounds
    python benchmarks/run.py --systems transformers gpt2onnx-fp32
    python benchmarks/run.py --smoke --work DIR    # tiny model, this environment's systems only (the test suite)
    python benchmarks/run.py --setup-only          # make peer venvs and model conversions ready, measure nothing

Each round runs every ready system once, each in a fresh process of its own interpreter (worker.py), in rotating
order; a run disturbed by other processes is run again; the table gives medians over the quiet runs. Peer venvs and
model conversions are made on first use and cached. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from report import MODES, cpu_kind, page, runs_by_cpu, summarize
from systems import (
    BENCHMARKS,
    SHAPES,
    SMOKE_SYSTEMS,
    SYSTEMS,
    Ready,
    Shape,
    Unavailable,
    Workspace,
    physical_cores,
)
from workload import PROMPT, long_prompt

from gpt2onnx.runtime.tokenizer import GPT2_TOKENIZER

WORKER = BENCHMARKS / "worker.py"


@dataclass(frozen=True)
class Settings:
    shape: Shape
    seed: int
    rounds: int
    new_tokens: int
    long_prompt_tokens: int
    warmup_tokens: int
    idle_wait_s: float  # before a run, wait at most this long for other processes to use <= noise_share of the CPUs
    noise_share: float  # a run during which other processes took more of the CPUs than this is noisy ...
    retries: int  # ... and is run again, at most this many times per system and round
    worker_timeout_s: float
    outliers: bool = False  # the stress checkpoint (export-gpt2 --outliers) instead of plain random weights

    @property
    def long_prompt(self) -> list[int]:
        return long_prompt(self.long_prompt_tokens)


class RunFailed(Exception):
    """One worker process failed; the message is its last error line."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (zeros where there is none)."""
    try:
        first = Path("/proc/stat").read_text("ascii").split("\n", 1)[0].split()
    except OSError:
        return 0.0, 0.0
    ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
    per_second = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / per_second, sum(ticks) / per_second


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


class OthersShare:
    """The share of the machine's CPU time that other processes used between start() and share()."""

    def start(self) -> None:
        self.busy, self.total = cpu_seconds()
        self.own = own_cpu_seconds()

    def share(self) -> float:
        busy, total = cpu_seconds()
        if total <= self.total:
            return 0.0
        return max(0.0, (busy - self.busy) - (own_cpu_seconds() - self.own)) / (total - self.total)


def wait_until_quiet(limit_s: float, quiet_share: float) -> None:
    """Wait, at most limit_s, until other processes use at most quiet_share of the CPUs (a 1 s sample)."""
    deadline = time.monotonic() + limit_s
    meter = OthersShare()
    while limit_s > 0:
        meter.start()
        time.sleep(1.0)
        share = meter.share()
        if share <= quiet_share:
            return
        if time.monotonic() > deadline:
            log(f"  other processes still use {share:.0%} of the CPUs; measuring anyway")
            return
        log(f"  waiting: other processes use {share:.0%} of the CPUs")
        time.sleep(4.0)


def run_worker(ready: Ready, settings: Settings, threads: int, folder: Path, name: str) -> dict[str, Any]:
    """Run worker.py once for a system; the run's numbers, with load times counted from the process spawn."""
    spec_path, result_path = folder / f"{name}.spec.json", folder / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    spec = {
        "adapter": ready.adapter,
        "model": ready.model,
        "options": ready.options,
        "threads": threads,
        "prompt": PROMPT,
        "long_prompt": settings.long_prompt,
        "new_tokens": settings.new_tokens,
        "warmup_tokens": settings.warmup_tokens,
        "modes": list(MODES),
        "result": str(result_path),
    }
    spec_path.write_text(json.dumps(spec) + "\n", encoding="utf-8")
    meter = OthersShare()
    meter.start()
    spawned = time.monotonic()
    try:
        command = [ready.python, str(WORKER), str(spec_path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=settings.worker_timeout_s)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"timed out after {settings.worker_timeout_s:.0f} s") from None
    share = meter.share()
    (folder / f"{name}.stderr.txt").write_text(done.stderr, encoding="utf-8")
    if done.returncode != 0 or not result_path.is_file():
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
        raise RunFailed(lines[-1][:300])
    result = json.loads(result_path.read_text("utf-8"))
    return {
        "load_s": result["ready_at"] - spawned,
        "first_token_s": result["first_token_at"] - spawned,
        "long_ms": result["long_prompt_first_token_ms"],
        "peak_rss_mib": result["peak_rss_mib"],
        "decode": result["decode"],
        "label": result["label"],
        "others_cpu_share": share,
    }


def measure(
    ready: dict[str, Ready], rows: dict[str, dict[str, Any]], settings: Settings, threads: int, folder: Path
) -> None:
    """The rounds: every ready system once per round, in rotating order; a noisy run is retried."""
    folder.mkdir(parents=True, exist_ok=True)
    order = list(ready)
    for round_index in range(settings.rounds):
        shift = round_index % len(order) if order else 0
        for key in order[shift:] + order[:shift]:
            row = rows[key]
            for attempt in range(settings.retries + 1):
                log(f"round {round_index + 1}/{settings.rounds}: {row['title']}" + (" (again)" if attempt else ""))
                wait_until_quiet(settings.idle_wait_s, settings.noise_share)
                try:
                    run = run_worker(ready[key], settings, threads, folder, f"{key}-{round_index + 1}-{attempt}")
                except RunFailed as error:
                    log(f"  failed: {error}")
                    row["errors"].append(str(error))
                    break
                noisy = run["others_cpu_share"] > settings.noise_share
                row["runs"].append({"round": round_index + 1, "noisy": noisy, **run})
                decode = ", ".join(f"{mode} {d['ms_per_token']:.1f}" for mode, d in run["decode"].items())
                log(f"  ms/token: {decode}; first token after long prompt {run['long_ms']:.0f} ms")
                if not noisy:
                    break
                log(f"  noisy: other processes took {run['others_cpu_share']:.0%} of the CPUs during the run")


def finish_row(row: dict[str, Any], settings: Settings) -> bool:
    """Summarise a system's runs (medians over its quiet runs, or over all if none was quiet); False if none ran."""
    if not row["runs"]:
        row.update(status="failed", reason=f"every run failed: {row['errors'][-1]}")
        return False
    quiet = [run for run in row["runs"] if not run["noisy"]]
    counts = {
        f"{mode}: {decode['tokens']} tokens instead of {settings.new_tokens}"
        for run in row["runs"]
        for mode, decode in run["decode"].items()
        if decode["tokens"] != settings.new_tokens
    }
    row.update(
        status="measured",
        reason=None,
        label=row["runs"][0]["label"],
        summary=summarize(quiet or row["runs"]),
        quiet_runs=len(quiet),
        warnings=sorted(counts),
    )
    return True


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    memory_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text("utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text("utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    size.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds, 8 tokens, this env's systems only")
    keys = [system.key for system in SYSTEMS]
    parser.add_argument("--systems", nargs="+", choices=keys, metavar="KEY", help=f"systems to run: {', '.join(keys)}")
    parser.add_argument("--rounds", type=int, help="rounds (each runs every system once)")
    parser.add_argument(
        "--out", type=Path, help="markdown table (default benchmarks/results.md; smoke: WORK/results.md)"
    )
    parser.add_argument("--json", type=Path, help="raw results (default: --out with .json)")
    parser.add_argument("--work", type=Path, help="models, logs and runs (default benchmarks/work)")
    parser.add_argument("--venvs", type=Path, default=BENCHMARKS / ".venvs", help="peer venvs (default %(default)s)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=GPT2_TOKENIZER,
        help="the tokenizer.json given to every system (default: the GPT-2 tokenizer shipped with gpt2onnx)",
    )
    parser.add_argument("--setup-only", action="store_true", help="make the venvs and models ready, measure nothing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument(
        "--outliers",
        action="store_true",
        help="every system loads the stress checkpoint (export-gpt2 --outliers: random weights with trained "
        "GPT-2's outliers, which quantised graphs isolate) instead of plain random weights",
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        help="seconds to wait for other processes to quiet down before each run (default 30; smoke: 0)",
    )
    parser.add_argument(
        "--noise-share",
        type=float,
        default=0.1,
        help="a run during which other processes took more than this share of the CPUs is noisy (default 0.1)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="reruns of a noisy run, per system and round (default 2)"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.smoke:
        idle_wait = args.idle_wait or 0.0
        return Settings(SHAPES["tiny"], args.seed, args.rounds or 2, 8, 64, 2, idle_wait, 1.0, 0, 300, args.outliers)
    rounds = args.rounds or (2 if args.quick else 5)
    idle_wait = 30.0 if args.idle_wait is None else args.idle_wait
    return Settings(
        SHAPES["small"], args.seed, rounds, 50, 512, 8, idle_wait, args.noise_share, args.retries, 1800, args.outliers
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    work = args.work or BENCHMARKS / "work"
    out = args.out or (work / "results.md" if args.smoke else BENCHMARKS / "results.md")
    json_out = args.json or out.with_suffix(".json")
    keys = args.systems or (list(SMOKE_SYSTEMS) if args.smoke else [system.key for system in SYSTEMS])
    chosen = [system for system in SYSTEMS if system.key in keys]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local; never wait on the hub
    workspace = Workspace(work, args.venvs, settings.shape, settings.seed, args.tokenizer, log, settings.outliers)
    threads = physical_cores()

    rows: dict[str, dict[str, Any]] = {}
    ready: dict[str, Ready] = {}
    for system in chosen:
        rows[system.key] = {"key": system.key, "title": system.title, "runs": [], "errors": []}
        try:
            ready[system.key] = system.prepare(workspace)
        except Unavailable as error:
            log(f"{system.title}: not available: {error}")
            rows[system.key].update(status="unavailable", reason=str(error))

    if args.setup_only:
        log(f"ready: {', '.join(ready) or 'none'}")
        return 0
    measure(ready, rows, settings, threads, work / "runs")
    failed = [key for key in ready if not finish_row(rows[key], settings)]
    shares = [run["others_cpu_share"] for row in rows.values() for run in row["runs"]] or [0.0]
    results = {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
            "machine": machine(),
            "settings": {
                **{key: value for key, value in asdict(settings).items() if key != "shape"},
                "shape": asdict(settings.shape),
                "prompt": PROMPT,
                "threads": threads,
            },
            "background_cpu_share": {"median": statistics.median(shares), "max": max(shares)},
        },
        "systems": list(rows.values()),
    }
    by_cpu = runs_by_cpu(json.loads(json_out.read_text("utf-8"))) if json_out.is_file() else {}
    by_cpu[cpu_kind(results["meta"]["machine"]["cpu"])] = results
    out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({"by_cpu": by_cpu}, indent=1) + "\n", encoding="utf-8")
    table = page(by_cpu)
    out.write_text(table, encoding="utf-8")
    print(table)
    log(f"wrote {out} and {json_out}")
    if failed:
        log(f"every run failed for: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
