"""The benchmark harness in smoke mode (tiny model, this environment's systems) runs and writes a well-formed table.

No timing thresholds: the numbers depend on the machine; this only keeps benchmarks/ from rotting.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEASURED = ("transformers", "gpt2onnx-fp32", "gpt2onnx-int8", "gpt2onnx-int8-fast-prefill")


def test_no_benchmark_script_shadows_an_installed_module() -> None:
    """The workers run with benchmarks/ first on sys.path, so a script named like a package that a measured library
    imports would replace it (benchmarks/kernels.py once broke transformers, which imports the `kernels` package)."""
    folder = (REPO / "benchmarks").resolve()
    elsewhere = [entry for entry in sys.path if entry and Path(entry).resolve() not in (folder, REPO)]
    scripts = sorted(path.stem for path in folder.glob("*.py"))
    shadowing = [name for name in scripts if importlib.machinery.PathFinder.find_spec(name, elsewhere) is not None]
    assert len(scripts) > 10 and not shadowing


def test_smoke_benchmark_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    # Runs of other kinds of CPU already in the results file stay there, beside this machine's new one.
    committed = json.loads((REPO / "benchmarks" / "results.json").read_text("utf-8"))["by_cpu"]
    others = {f"Other CPU {index}": run for index, run in enumerate(committed.values())}
    out.with_suffix(".json").write_text(json.dumps({"by_cpu": others}), encoding="utf-8")
    run = REPO / "benchmarks" / "run.py"
    command = [sys.executable, str(run), "--smoke", "--work", str(tmp_path), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    saved = json.loads(out.with_suffix(".json").read_text("utf-8"))["by_cpu"]
    assert {kind: saved[kind] for kind in others} == others
    ((kind, results),) = ((kind, run) for kind, run in saved.items() if kind not in others)
    sections = [line for line in out.read_text("utf-8").splitlines() if line.startswith("## ")]
    assert sections == [f"## {name}" for name in sorted(saved)]
    rows = {row["key"]: row for row in results["systems"]}
    assert set(rows) == set(MEASURED)
    for key in MEASURED:
        row = rows[key]
        assert row["status"] == "measured", row.get("reason")
        assert len(row["runs"]) == 2 and not row["errors"]
        # Values, not speeds: a ms/token is a difference of two wall times, which noise can push to zero or below.
        assert math.isfinite(row["summary"]["greedy_ms_per_token"])
        assert row["summary"]["peak_rss_mib"] > 0 and row["summary"]["load_s"] > 0
        assert all(decode["tokens"] == 8 for run in row["runs"] for decode in run["decode"].values())
    assert set(rows["transformers"]["runs"][0]["decode"]) == {"greedy", "beam", "sample"}

    section = out.read_text("utf-8").split(f"## {kind}\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in table}
    assert len(widths) == 1, "every table row has the header's number of cells"
    assert table[0].startswith("| system |") and set(table[1]) <= {"|", "-"}
    titles = [line.split("|")[1].strip() for line in table[2:]]
    assert len(titles) == len(results["systems"])
    assert all(title.startswith(row["title"]) for title, row in zip(titles, results["systems"], strict=True))
    assert "1.00×" in next(line for line in table if line.startswith("| transformers"))

    # The per-operator profile of the bundle just measured (the tool for finding where decode time goes).
    profile = [
        sys.executable,
        str(REPO / "benchmarks" / "profile_ops.py"),
        str(tmp_path / "bundles" / "tiny-seed0-int8"),
    ]
    profiled = subprocess.run([*profile, "--prompt", "16", "--runs", "10"], capture_output=True, text=True, timeout=300)
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    assert "decode step, batch 1, past 40" in profiled.stdout and "prefill of 16 tokens" in profiled.stdout
    assert "MatMulNBits" in profiled.stdout and "GroupQueryAttention" in profiled.stdout

    # The decode profile (wall time, Python overhead, stubbed loop), greedy and beam search.
    decode = [
        sys.executable,
        str(REPO / "benchmarks" / "profile_decode.py"),
        str(tmp_path / "bundles" / "tiny-seed0-int8"),
    ]
    for beams in (1, 3):
        done = subprocess.run(
            [*decode, "--runs", "2", "--new-tokens", "8", "--long-prompt", "16", "--num-beams", str(beams)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["num_beams"] == beams and report["first_token_after_16_ms"] > 0
        assert math.isfinite(report["decode_ms_per_token"]) and math.isfinite(report["python_overhead_ms_per_step"])
        assert report["idle_cpu_ms_after_generate"] >= 0
        assert (report["python_ms_per_step_session_stubbed"] is None) == (beams > 1)


def test_smoke_quality_writes_a_table(tmp_path: Path) -> None:
    """benchmarks/quality.py on the tiny stress checkpoint: the fp32 reference agrees with itself exactly, the
    quantised variants are compared and held to their floors, and the page has one row per variant."""
    out = tmp_path / "quality_results.md"
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--work", str(tmp_path)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    rows = {row["key"]: row for row in json.loads(out.with_suffix(".json").read_text("utf-8"))["rows"]}
    assert list(rows) == ["gpt2onnx-fp32", "gpt2onnx-int8", "gpt2onnx-int4"]
    assert all(row["status"] == "measured" for row in rows.values())
    reference = rows["gpt2onnx-fp32"]["figures"]
    assert (reference["kl_divergence"], reference["top1_agreement"], reference["max_logits_diff"]) == (0.0, 1.0, 0.0)
    for key in ("gpt2onnx-int8", "gpt2onnx-int4"):
        figures = rows[key]["figures"]
        assert figures["max_logits_diff"] > 0.0 and 0.0 <= figures["kl_divergence"] < 0.1
        assert math.isclose(figures["perplexity"], reference["perplexity"], rel_tol=0.05)
    table = [line for line in out.read_text("utf-8").splitlines() if line.startswith("|")]
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1, "every row has the header's cells"
    assert [line.split("|")[1].strip() for line in table[2:]] == [row["title"] for row in rows.values()]
    assert table[3].split("|")[7].strip() in ("meets", "misses top-1", "misses KL", "misses top-1 and KL")

    # --update re-measures the rows asked for and keeps the others, saying which run each comes from.
    update = [*command, "--out", str(out), "--update", "--systems", "gpt2onnx-int4"]
    done = subprocess.run(update, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    updated = json.loads(out.with_suffix(".json").read_text("utf-8"))["rows"]
    assert [row["key"] for row in updated] == list(rows)
    assert updated[1]["measured_at"] == rows["gpt2onnx-int8"]["measured_at"] != updated[2]["measured_at"]
    assert "Re-measured by this command (`--update`): gpt2-onnx fp32, gpt2-onnx int4;" in out.read_text("utf-8")


def test_smoke_serve_load_writes_its_section(tmp_path: Path, tiny_gpt2) -> None:
    """serve_load.py against a real gpt2-serve (its lean streaming client, loopback), bounded: 1 and 2 clients of one
    4-token request each; the page keeps another CPU kind's section beside this machine's."""
    out = tmp_path / "serve_results.md"
    other = "## Other CPU\n\nan earlier run on another kind of CPU\n"
    out.write_text(f"# gpt2-serve under load\n\n{other}", encoding="utf-8")
    command = [
        *(sys.executable, str(REPO / "benchmarks" / "serve_load.py"), str(tiny_gpt2.bundle)),
        *("--clients", "1", "2", "--requests", "1", "--max-tokens", "4", "--batch", "2", "--threads", "1"),
        *("--baseline", "", "--work", str(tmp_path), "--out", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [row["clients"] for row in rows] == [1, 2]
    assert all(row["dropped"] == 0 and row["tokens_per_s"] > 0 for row in rows)
    assert all(math.isfinite(row["ttft_p50_ms"]) and math.isfinite(row["itl_p99_ms"]) for row in rows)
    page = out.read_text("utf-8")
    sections = [line for line in page.splitlines() if line.startswith("## ")]
    assert "## Other CPU" in sections and len(sections) == 2
    assert other.strip() in page
    this = next(heading for heading in sections if heading != "## Other CPU")
    section = page.split(this + "\n", 1)[1].split("\n## ", 1)[0]
    assert sum(line.startswith("| gpt2-serve (continuous batching") for line in section.splitlines()) == 2
