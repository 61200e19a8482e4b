"""How far each quantised variant is from fp32 on the stress checkpoint, with the decode speed of the same variants.

    python benchmarks/quality.py                          # every variant: about 20 min on 2 cores (+ setup)
    python benchmarks/quality.py --systems gpt2onnx-int8 gpt2onnx-int4 llamacpp-q4_0
    python benchmarks/quality.py --update --systems gpt2onnx-int8-fast-prefill   # re-measure rows of the page
    python benchmarks/quality.py --speed benchmarks/results.json   # the speed columns' source (default)
    python benchmarks/quality.py --smoke --work /tmp/quality       # tiny model, this environment's variants

Every variant loads the same weights: run.py's checkpoint with trained GPT-2's outliers (`export-gpt2 --outliers`,
GPT-2-small shape), converted by run.py's Workspace (the same bundles, graphs and GGUFs as `run.py --outliers`).
Each one is teacher-forced over the export's sample text (gpt2onnx/export/data/sample_text.txt, GPT-2 tokenizer)
in pieces of 1024 tokens, each piece from an empty cache, and its next-token logits at every position are compared
with those of the gpt2-onnx fp32 bundle (which equals PyTorch within 1e-4): mean KL(fp32 || variant) per position,
top-1 agreement, max |logits difference|, and the perplexity of the text. The speed columns come from a run.py
results file of the same checkpoint (`run.py --outliers`). The page goes to benchmarks/quality_results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from report import cpu_kind, runs_by_cpu
from run import log, machine
from systems import (
    BENCHMARKS,
    SHAPES,
    SYSTEMS,
    Ready,
    System,
    Unavailable,
    Workspace,
    gpt2onnx_ready,
    in_this_env,
    physical_cores,
)
from workload import PROMPT

from gpt2onnx.export.calibrate import sample_ids
from gpt2onnx.export.validate import FLOORS
from gpt2onnx.runtime.processors import log_softmax
from gpt2onnx.runtime.scoring import Agreement
from gpt2onnx.runtime.tokenizer import GPT2_TOKENIZER

WORKER = BENCHMARKS / "quality_worker.py"
REFERENCE = "gpt2onnx-fp32"
PIECE = 1024  # GPT-2's context: each piece of the text is one teacher-forced pass
GREEDY_TOKENS = 32  # greedy tokens after run.py's prompt, compared with the reference's


@dataclass(frozen=True)
class Variant:
    """A row: a system (run.py's, or one measured here only) and the bits of its weights (for the floors)."""

    system: System
    bits: int | None


def _quality_only(key: str, title: str, flags: list[str]) -> System:
    name = key.removeprefix("gpt2onnx-")
    return System(key, title, lambda ws: gpt2onnx_ready(ws, name, flags))


_RUN_SYSTEMS = {system.key: system for system in SYSTEMS}
VARIANTS = (
    Variant(_RUN_SYSTEMS[REFERENCE], None),
    Variant(_RUN_SYSTEMS["gpt2onnx-int8"], 8),
    Variant(_RUN_SYSTEMS["gpt2onnx-int8-block32"], 8),
    Variant(_RUN_SYSTEMS["gpt2onnx-int8-block256"], 8),
    Variant(
        _quality_only(
            "gpt2onnx-int8-no-isolation",
            "gpt2-onnx int8, outlier channels not isolated",
            ["--quantize", "int8", "--no-outlier-channels"],
        ),
        8,
    ),
    Variant(_RUN_SYSTEMS["gpt2onnx-int8-fast-prefill"], 8),
    Variant(
        _quality_only(
            "gpt2onnx-int8-fast-prefill-no-isolation",
            "gpt2-onnx int8 + fast prefill, outlier channels not isolated",
            ["--quantize", "int8", "--fast-prefill", "--no-outlier-channels"],
        ),
        8,
    ),
    Variant(_RUN_SYSTEMS["gpt2onnx-int4"], 4),
    Variant(_RUN_SYSTEMS["gpt2onnx-int4-all4"], 4),
    Variant(_RUN_SYSTEMS["gpt2onnx-int4-head4"], 4),
    Variant(_RUN_SYSTEMS["gpt2onnx-int4-block32"], 4),
    Variant(_RUN_SYSTEMS["genai-int8"], 8),
    Variant(_RUN_SYSTEMS["genai-int4"], 4),
    Variant(_RUN_SYSTEMS["llamacpp-f16"], None),
    Variant(_RUN_SYSTEMS["llamacpp-q8_0"], 8),
    Variant(_RUN_SYSTEMS["llamacpp-q4_0"], 4),
)
SMOKE_VARIANTS = (REFERENCE, "gpt2onnx-int8", "gpt2onnx-int4")


def text_pieces(limit: int | None) -> list[list[int]]:
    """The sample text's ids (at most `limit`), in pieces of PIECE tokens (a last piece of one token predicts
    nothing and is dropped)."""
    ids = sample_ids(GPT2_TOKENIZER, 50257, 0).tolist()[:limit]
    return [ids[begin : begin + PIECE] for begin in range(0, len(ids), PIECE) if len(ids) - begin > 1]


def run_quality_worker(ready: Ready, pieces: list[list[int]], folder: Path, key: str) -> tuple[np.ndarray, list]:
    """The system's logits at every position of the pieces, and its greedy tokens after run.py's prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result = folder / f"{key}.spec.json", folder / f"{key}.npy"
    result.unlink(missing_ok=True)
    spec = {
        "adapter": ready.adapter,
        "model": ready.model,
        "threads": physical_cores(),
        "pieces": pieces,
        "greedy": {"prompt": PROMPT, "new_tokens": GREEDY_TOKENS},
        "result": str(result),
    }
    spec_path.write_text(json.dumps(spec) + "\n", encoding="utf-8")
    done = subprocess.run([ready.python, str(WORKER), str(spec_path)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not result.is_file():
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
        raise Unavailable(f"quality run failed: {lines[-1][:300]}")
    greedy = json.loads(result.with_suffix(".json").read_text("utf-8"))["greedy"]
    return np.load(result, mmap_mode="r"), greedy


def compare(logits: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """KL(reference || logits), top-1 agreement, max |diff| and the perplexity of targets, a few rows at a time."""
    agreement, nll = Agreement(), 0.0
    for start in range(0, len(targets), 256):
        rows = slice(start, start + 256)
        mine = np.asarray(logits[rows], np.float64)
        logprobs = log_softmax(mine)
        agreement.add(logprobs, mine, np.asarray(reference[rows], np.float64))
        nll -= float(logprobs[np.arange(len(mine)), targets[rows]].sum())
    return {
        "perplexity": math.exp(nll / len(targets)),
        "kl_divergence": agreement.kl_divergence,
        "top1_agreement": agreement.top1_agreement,
        "max_logits_diff": agreement.max_logits_diff,
    }


def updated_rows(previous: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a previous page with these in place of theirs, in VARIANTS' order (quality.py --update); rows
    of variants no longer measured are dropped."""
    if not previous.is_file():
        raise SystemExit(f"--update needs an earlier page's {previous}; run quality.py without it first")
    page = json.loads(previous.read_text("utf-8"))
    merged = {row["key"]: {"measured_at": page["meta"]["date"], **row} for row in page["rows"]}
    merged.update((row["key"], row) for row in rows)
    order = [variant.system.key for variant in VARIANTS]
    return sorted((row for row in merged.values() if row["key"] in order), key=lambda row: order.index(row["key"]))


def floors_cell(bits: int | None, figures: dict[str, float]) -> str:
    """Whether a quantised row meets the floors of its bit width (export/validate.py's FLOORS)."""
    floors = FLOORS.get(f"int{bits}") if bits else None
    if floors is None:
        return "–"
    missed = [
        *(["top-1"] if figures["top1_agreement"] < floors["top1_agreement"] else []),
        *(["KL"] if figures["kl_divergence"] > floors["kl_divergence"] else []),
    ]
    return "meets" if not missed else "misses " + " and ".join(missed)


def speed_rows(path: Path | None) -> tuple[dict[str, float], str]:
    """Greedy ms/token per system key from a run.py results file (its run on this machine's kind of CPU, else its
    first), and a line saying where they come from."""
    if path is None or not path.is_file():
        return {}, "No speed figures: no run.py results file was given or found."
    by_cpu = runs_by_cpu(json.loads(path.read_text("utf-8")))
    kind = cpu_kind(machine()["cpu"])
    results = by_cpu.get(kind) or next(iter(by_cpu.values()))
    meta = results["meta"]
    speeds = {
        system["key"]: system["summary"]["greedy_ms_per_token"]
        for system in results["systems"]
        if system.get("status") == "measured" and "greedy_ms_per_token" in system.get("summary", {})
    }
    weights = (
        "the same stress checkpoint" if meta["settings"].get("outliers") else "plain random weights (no --outliers)"
    )
    where = f"{meta['date']} on {meta['machine']['cpu']}"
    return speeds, f"Speed: greedy ms/token from `{meta['command']}` ({where}, {weights}), batch 1."


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], speed_note: str) -> str:
    """The results page: the table, how it was made, and what could not be measured."""
    header = [
        "variant",
        "weights",
        "perplexity ÷ fp32's",
        "KL(fp32 ‖ variant)",
        "top-1 agreement",
        "max \\|Δ logits\\|",
        "floors",
        "greedy ms/token",
        "÷ gpt2-onnx int8",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    int8_speed = next((row["speed"] for row in rows if row["key"] == "gpt2onnx-int8" and row.get("speed")), None)
    fp32_perplexity = next(row["figures"]["perplexity"] for row in rows if row["key"] == REFERENCE)
    for row in rows:
        if row["status"] != "measured":
            notes.append(f"{row['title']}: {row['reason']}")
            lines.append(f"| {row['title']} | not measured (note {len(notes)}) |" + " – |" * (len(header) - 2))
            continue
        f = row["figures"]
        speed = row.get("speed")
        cells = [
            row["title"],
            f"{row['bits']}-bit" if row["bits"] else ("fp16" if "f16" in row["key"] else "fp32"),
            f"{f['perplexity'] / fp32_perplexity:.3f}",
            f"{f['kl_divergence']:.4f}",
            f"{f['top1_agreement']:.1%}",
            f"{f['max_logits_diff']:.2f}",
            floors_cell(row["bits"], f),
            f"{speed:.2f}" if speed else "–",
            f"{speed / int8_speed:.2f}" if speed and int8_speed else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if row.get("greedy_equal") is not None:
            notes.append(
                f"{row['title']}: its {GREEDY_TOKENS} greedy tokens after run.py's prompt equal gpt2-onnx fp32's for "
                f"the first {row['greedy_equal']}"
            )
    floors = ", ".join(
        f"{kind}: top-1 ≥ {values['top1_agreement']:.0%} and KL ≤ {values['kl_divergence']:g}"
        for kind, values in FLOORS.items()
    )
    text = [
        "# Quantisation quality",
        "",
        f"Measured {meta['date']} with `{meta['command']}` on {meta['machine']['cpu']}.",
        "",
        f"The stress checkpoint (GPT-2 {meta['shape']} shape, seed 0, `export-gpt2 --outliers`: massive activations, "
        "outlier channels and peaked logits), teacher-forced over the export's sample text "
        f"({meta['positions']} positions in pieces of {PIECE} tokens), each variant against the gpt2-onnx fp32 "
        f"bundle at every position. The fp32 perplexity of the text is {fp32_perplexity:.4g} (random weights do not "
        "know English; the stress checkpoint's peaked logits make it large), so the table gives each variant's as a "
        "ratio to it. Floors (export/validate.py, the aims of issue 14): "
        f"{floors}; a row is held to those of its bit width. {speed_note}",
        "",
        *lines,
    ]
    earlier = sorted({row["measured_at"] for row in rows if row.get("measured_at", meta["date"]) != meta["date"]})
    if earlier:
        now = [row["title"] for row in rows if row.get("measured_at", meta["date"]) == meta["date"]]
        text += [
            "",
            f"Re-measured by this command (`--update`): {', '.join(now)}; the other rows are from "
            f"{', '.join(earlier)}, with the same checkpoint and text.",
        ]
    if notes:
        text += ["", "Notes:", "", *(f"{index}. {note}" for index, note in enumerate(notes, 1))]
    return "\n".join(text) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    keys = [variant.system.key for variant in VARIANTS]
    parser.add_argument("--systems", nargs="+", choices=keys, metavar="KEY", help=f"variants: {', '.join(keys)}")
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-measure only --systems and keep the other rows of the existing page (its .json), each with its date",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, 128 tokens, this environment's variants")
    parser.add_argument("--speed", type=Path, help="run.py results (default benchmarks/results.json; smoke: none)")
    parser.add_argument("--out", type=Path, help="the page (default benchmarks/quality_results.md; smoke: WORK/)")
    parser.add_argument("--work", type=Path, help="models and logits (default benchmarks/work)")
    parser.add_argument("--venvs", type=Path, default=BENCHMARKS / ".venvs", help="peer venvs (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or BENCHMARKS / "work"
    out = args.out or (work / "quality_results.md" if args.smoke else BENCHMARKS / "quality_results.md")
    speed_file = args.speed or (None if args.smoke else BENCHMARKS / "results.json")
    keys = args.systems or (list(SMOKE_VARIANTS) if args.smoke else [variant.system.key for variant in VARIANTS])
    keys = [REFERENCE, *(key for key in keys if key != REFERENCE)]
    shape = SHAPES["tiny" if args.smoke else "small"]
    workspace = Workspace(work, args.venvs, shape, 0, GPT2_TOKENIZER, log, outliers=True)
    in_this_env("gpt2onnx", "onnxruntime")
    pieces = text_pieces(128 if args.smoke else None)
    targets = np.concatenate([np.asarray(piece[1:]) for piece in pieces])
    speeds, speed_note = speed_rows(speed_file)
    rows, reference, reference_greedy = [], None, None
    for variant in (variant for key in keys for variant in VARIANTS if variant.system.key == key):
        system = variant.system
        row: dict[str, Any] = {"key": system.key, "title": system.title, "bits": variant.bits}
        try:
            ready = system.prepare(workspace)
            log(f"quality: {system.title}")
            logits, greedy = run_quality_worker(ready, pieces, work / "quality", system.key)
        except Unavailable as error:
            if system.key == REFERENCE:
                raise SystemExit(f"the reference {system.title} could not be measured: {error}") from None
            log(f"  not measured: {error}")
            rows.append({**row, "status": "unavailable", "reason": str(error)})
            continue
        if reference is None:
            reference, reference_greedy = logits, greedy
        row.update(status="measured", figures=compare(logits, reference, targets), speed=speeds.get(system.key))
        if greedy is not None and system.key.startswith("llamacpp") and variant.bits is None:
            row["greedy_equal"] = next(
                (i for i, (a, b) in enumerate(zip(greedy, reference_greedy, strict=True)) if a != b), len(greedy)
            )
        log("  " + ", ".join(f"{name} {value:.4g}" for name, value in row["figures"].items()))
        rows.append(row)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    for row in rows:
        row.update(measured_at=date, command=command)
    if args.update:
        rows = updated_rows(out.with_suffix(".json"), rows)
    meta = {
        "date": date,
        "command": command,
        "machine": machine(),
        "shape": shape.name,
        "positions": len(targets),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    page = markdown(meta, rows, speed_note)
    out.write_text(page, encoding="utf-8")
    print(page)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
