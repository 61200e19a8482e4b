"""The systems the benchmark compares, and how each is made ready: peer venvs and model conversions.

Every artifact (venv, checkpoint, bundle, converted model) is built once and reused while its recipe is unchanged:
a stamp file beside it holds the recipe it was built from. A system whose setup fails raises Unavailable; the
harness reports it in the table instead of stopping.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2onnx.export.checkpoint import RANDOM_SHAPES

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
PREPARE = BENCHMARKS / "prepare.py"
SETUP_TIMEOUT_S = 1800


class Unavailable(Exception):
    """A system that cannot be measured here; the message says why and goes into the table."""


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int


SHAPES = {name: Shape(name, **sizes) for name, sizes in RANDOM_SHAPES.items()}  # export-gpt2 --random-init's


@dataclass(frozen=True)
class VenvRecipe:
    """A peer's own venv: pip install stages run in order (torch first, so pip takes the CPU-only wheel)."""

    name: str
    stages: tuple[tuple[str, ...], ...]
    env: tuple[tuple[str, str], ...] = ()  # for pip: build settings of packages compiled from source


OPTIMUM_VENV = VenvRecipe(
    "optimum",
    (("torch==2.13.0",), ("optimum-onnx==0.1.0", "transformers<4.58", "onnxruntime", "onnx-ir", "accelerate")),
)
CT2_VENV = VenvRecipe("ctranslate2", (("torch==2.13.0",), ("ctranslate2==4.8.5", "transformers")))
GENAI_VENV = VenvRecipe("genai", (("onnxruntime-genai==0.18.0",),))
LLAMA_CPP_VERSION = "0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # the native build's AMX code dies with SIGILL on these Xeons
LLAMA_CPP_VENV = VenvRecipe(
    "llamacpp",
    ((f"llama-cpp-python=={LLAMA_CPP_VERSION}", "numpy"),),
    (("CMAKE_ARGS", "-DGGML_NATIVE=ON"), ("CFLAGS", NO_AMX), ("CXXFLAGS", NO_AMX), ("CMAKE_BUILD_PARALLEL_LEVEL", "2")),
)
GGUF_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class Ready:
    """A system ready to measure: the interpreter that runs worker.py, its adapter, and the model it loads."""

    python: str
    adapter: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)


class Workspace:
    """Builds and caches what the systems need under work/ (models) and venvs/ (peer environments)."""

    def __init__(
        self,
        work: Path,
        venvs: Path,
        shape: Shape,
        seed: int,
        tokenizer: Path,
        log: Callable[[str], None],
        outliers: bool = False,
    ):
        self.work = work
        self.venvs = venvs
        self.shape = shape
        self.seed = seed
        self.tokenizer = tokenizer
        self.log = log
        self.outliers = outliers  # the stress checkpoint (export-gpt2 --outliers) instead of plain random weights
        self._results: dict[str, Path | Unavailable] = {}

    def run(self, what: str, command: list[str], env: dict[str, str] | None = None) -> None:
        """Run one setup command, its output kept in work/logs/; Unavailable naming the last error line on failure."""
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / ("".join(c if c.isalnum() else "-" for c in what).strip("-") + ".log")
        with log_file.open("w", encoding="utf-8") as handle:
            handle.write(" ".join(command) + "\n\n")
            handle.flush()
            try:
                done = subprocess.run(
                    command,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=SETUP_TIMEOUT_S,
                    env={**os.environ, **env} if env else None,
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                raise Unavailable(f"{what} failed: {error}") from None
        if done.returncode != 0:
            lines = [line.strip() for line in log_file.read_text("utf-8", errors="replace").splitlines()]
            errors = [line for line in lines if line and not line.startswith("WARNING")] or ["no output"]
            raise Unavailable(f"{what} failed (exit {done.returncode}; log {log_file}): {errors[-1][:200]}")

    def cached(
        self,
        path: Path,
        recipe: str,
        what: str,
        build: Callable[[Path], None],
        depends: tuple[Path, ...] = (),
        in_place: bool = False,
    ) -> Path:
        """`path` as built by build() from this recipe (and the artifacts it depends on): reused when its stamp
        matches, else rebuilt.

        A build goes into a hidden sibling renamed into place when complete (in_place: straight into path, for
        venvs, whose scripts hold their own absolute path); the stamp is written last, so a failed or interrupted
        build is redone next time. A failure is remembered for the rest of the run.
        """
        stamp = _stamp(path)
        recipe = "\n".join([recipe, *(_stamp(dependency).read_text("utf-8") for dependency in depends)])
        key = f"{path}\n{recipe}"
        if key in self._results:
            result = self._results[key]
            if isinstance(result, Unavailable):
                raise result
            return result
        if path.exists() and stamp.is_file() and stamp.read_text("utf-8") == recipe:
            self._results[key] = path
            return path
        self.log(f"setup: {what} (cached for later runs) ...")
        target = path if in_place else path.with_name(f".{path.name}.partial")
        for stale in (stamp, path, target):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        target.mkdir(parents=True)
        try:
            build(target)
        except Unavailable as error:
            shutil.rmtree(target, ignore_errors=True)
            self._results[key] = error
            raise
        if not in_place:
            target.rename(path)
        stamp.write_text(recipe, encoding="utf-8")
        self._results[key] = path
        return path

    def venv(self, recipe: VenvRecipe) -> str:
        """The python of a peer's venv, created and installed on first use."""

        def build(path: Path) -> None:
            self.run(f"venv {recipe.name}", [sys.executable, "-m", "venv", str(path)])
            for stage in recipe.stages:
                pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
                self.run(f"venv {recipe.name}: pip install {' '.join(stage)}", [*pip, *stage], dict(recipe.env))

        stages = json.dumps([recipe.stages, recipe.env])
        path = self.cached(self.venvs / recipe.name, stages, f"venv {recipe.name}", build, in_place=True)
        return str(path / "bin" / "python")

    def checkpoint(self) -> Path:
        """The seeded random GPT-2 every system loads (or converts), with the GPT-2 tokenizer files beside it."""
        shape = self.shape
        if not self.tokenizer.is_file():
            raise Unavailable(f"tokenizer file {self.tokenizer} not found (pass --tokenizer FILE)")
        arguments = ["--shape", shape.name, "--seed", str(self.seed), "--tokenizer", str(self.tokenizer)]
        arguments += ["--outliers"] if self.outliers else []

        def build(path: Path) -> None:
            command = [sys.executable, str(PREPARE), "checkpoint", "--out", str(path), *arguments]
            self.run(f"checkpoint {shape.name}", command)

        path = self.work / "checkpoints" / f"{shape.name}-seed{self.seed}{'-outliers' if self.outliers else ''}"
        return self.cached(path, json.dumps(arguments), "random checkpoint", build)

    def bundle(self, name: str, flags: list[str]) -> Path:
        """A gpt2-onnx bundle exported by this checkout's export-gpt2 with these flags (re-made when it changes)."""
        export = [sys.executable, "-m", "gpt2onnx.cli.export_command"]
        checkpoint = self.checkpoint()
        recipe = json.dumps({"flags": flags, "exporter": exporter_fingerprint()})

        def build(path: Path) -> None:
            command = [*export, "--model", str(checkpoint), "--output", str(path)]  # with the checkpoint's tokenizer
            self.run(f"export-gpt2 {name}", [*command, "--force", "--quiet", *flags])

        path = self.work / "bundles" / f"{self.checkpoint().name}-{name}"
        return self.cached(path, recipe, f"export-gpt2 {name}", build, depends=(checkpoint,))

    def optimum_export(self) -> Path:
        """optimum-cli's ONNX export (text-generation-with-past) of the checkpoint."""
        python = self.venv(OPTIMUM_VENV)
        checkpoint = self.checkpoint()
        command = [str(Path(python).parent / "optimum-cli"), "export", "onnx", "--model", str(checkpoint)]
        command += ["--task", "text-generation-with-past"]

        def build(path: Path) -> None:
            self.run("optimum export", [*command, str(path)])

        path = self.work / "optimum" / checkpoint.name
        return self.cached(path, json.dumps(command), "optimum export", build, depends=(checkpoint,))

    def ct2_model(self, quantization: str) -> Path:
        """ct2-transformers-converter's model of the checkpoint, stored in this quantisation."""
        python = self.venv(CT2_VENV)
        checkpoint = self.checkpoint()
        command = [str(Path(python).parent / "ct2-transformers-converter"), "--model", str(checkpoint)]
        command += ["--quantization", quantization, "--force", "--output_dir"]

        def build(path: Path) -> None:
            self.run(f"ct2 convert {quantization}", [*command, str(path)])

        path = self.work / "ct2" / f"{checkpoint.name}-{quantization}"
        return self.cached(path, json.dumps(command), f"CTranslate2 conversion ({quantization})", build, (checkpoint,))

    def genai_model(self, quantization: str | None) -> Path:
        """optimum's export (int8, int4: ORT-optimised and quantised) with a genai_config.json that names its io.

        onnxruntime-genai's builder refuses GPT2LMHeadModel and its own "gpt2" type expects an older past layout;
        its "llama" type runs this graph when told the io names (genai_config below).
        """
        export = self.optimum_export()
        source = export / "model.onnx"
        shape = self.shape
        quantize = [self.venv(OPTIMUM_VENV), str(PREPARE), f"ort-{quantization}", "--source", str(source)]
        quantize += ["--n-head", str(shape.n_head), "--n-embd", str(shape.n_embd)]
        config = genai_config(shape, threads=physical_cores())

        def build(path: Path) -> None:
            if quantization:
                self.run(f"ORT optimise + {quantization}", [*quantize, "--out", str(path / "model.onnx")])
            else:
                os.link(source, path / "model.onnx")  # same filesystem; a hard link costs no space
            (path / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

        recipe = json.dumps({"quantize": quantize if quantization else None, "config": config})
        name = f"{export.name}-{quantization or 'fp32'}"
        return self.cached(self.work / "genai" / name, recipe, f"onnxruntime-genai model ({name})", build, (export,))

    def llama_cpp_sources(self) -> Path:
        """llama.cpp's GGUF converter (convert_hf_to_gguf.py, its conversion package and gguf-py), from the
        llama.cpp sources that llama-cpp-python's sdist vendors."""
        sdist = f"llama_cpp_python-{LLAMA_CPP_VERSION}"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

        def build(path: Path) -> None:
            download = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(path)]
            self.run("llama-cpp-python sdist", [*download, f"llama-cpp-python=={LLAMA_CPP_VERSION}"])
            archive = path / f"{sdist}.tar.gz"
            prefix = f"{sdist}/vendor/llama.cpp/"
            with tarfile.open(archive) as tar:
                members = [
                    m
                    for m in tar.getmembers()
                    if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
                ]
                for member in members:
                    member.name = member.name[len(prefix) :]
                tar.extractall(path, members=members, filter="data")
            archive.unlink()

        return self.cached(self.work / "llama-cpp-sources", sdist, "llama.cpp's GGUF converter", build)

    def gguf(self, kind: str) -> Path:
        """A GGUF of the checkpoint: f16 and f32 from the vendored convert_hf_to_gguf.py (in this environment, which
        has torch and transformers), q8_0 and q4_0 quantised from the f32 one by llama.cpp's own quantiser."""
        checkpoint = self.checkpoint()
        folder = self.work / "gguf"
        if kind in ("f16", "f32"):
            sources = self.llama_cpp_sources()
            command = [sys.executable, str(sources / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", kind]

            def build(path: Path) -> None:  # the converter puts the gguf-py beside it on its path
                self.run(f"GGUF {kind}", [*command, "--outfile", str(path / "model.gguf")])

            depends: tuple[Path, ...] = (checkpoint, sources)
        else:
            source = self.gguf("f32") / "model.gguf"
            command = [self.venv(LLAMA_CPP_VENV), str(PREPARE), "gguf-quantize", "--source", str(source)]
            command += ["--type", kind]

            def build(path: Path) -> None:
                self.run(f"GGUF {kind}", [*command, "--out", str(path / "model.gguf")])

            depends = (source.parent,)
        path = folder / f"{checkpoint.name}-{kind}"
        return self.cached(path, json.dumps(command), f"GGUF ({kind})", build, depends)


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def genai_config(shape: Shape, threads: int) -> dict[str, Any]:
    """genai_config.json for an optimum GPT-2 export, run as onnxruntime-genai's "llama" decoder type."""
    return {
        "model": {
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "pad_token_id": 50256,
            "context_length": 1024,
            "vocab_size": 50257,
            "type": "llama",
            "decoder": {
                "session_options": {"provider_options": [], "intra_op_num_threads": threads},
                "filename": "model.onnx",
                "head_size": shape.n_embd // shape.n_head,
                "hidden_size": shape.n_embd,
                "num_attention_heads": shape.n_head,
                "num_key_value_heads": shape.n_head,
                "num_hidden_layers": shape.n_layer,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        # The optimum graph concatenates past and new keys, so the past and present buffers cannot be shared.
        "search": {"max_length": 1024, "past_present_share_buffer": False},
    }


@functools.cache
def exporter_fingerprint() -> str:
    """sha256 of the installed exporter's sources and the bundle format, so a changed exporter re-exports."""
    digest = hashlib.sha256()
    for module in ("gpt2onnx.export", "gpt2onnx.runtime.bundle"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise Unavailable(f"{module} is not installed in this environment (pip install -e .)")
        root = Path(spec.origin)
        for path in sorted(root.parent.glob("*.py")) if root.name == "__init__.py" else [root]:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def physical_cores() -> int:
    """The runtime's own choice of thread count, given to every system so that all use the same cores."""
    from gpt2onnx.runtime.session import physical_cores as cores

    return cores()


def in_this_env(*modules: str) -> str:
    """This interpreter, if it can import the modules; else Unavailable."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed in this environment")
    return sys.executable


def gpt2onnx_ready(ws: Workspace, name: str, flags: list[str]) -> Ready:
    """A gpt2-onnx row: this environment, over a bundle exported with these export-gpt2 flags."""
    return Ready(in_this_env("gpt2onnx", "onnxruntime"), "gpt2onnx", str(ws.bundle(name, flags)))


@dataclass(frozen=True)
class System:
    """One row of the table: its --systems key, its row title, and how to make it ready."""

    key: str
    title: str
    prepare: Callable[[Workspace], Ready]


SYSTEMS = (
    System(
        "transformers",
        "transformers + PyTorch",
        lambda ws: Ready(in_this_env("torch", "transformers"), "transformers", str(ws.checkpoint())),
    ),
    System("gpt2onnx-fp32", "gpt2-onnx fp32", lambda ws: gpt2onnx_ready(ws, "fp32", [])),
    System("gpt2onnx-int8", "gpt2-onnx int8", lambda ws: gpt2onnx_ready(ws, "int8", ["--quantize", "int8"])),
    System("gpt2onnx-int4", "gpt2-onnx int4", lambda ws: gpt2onnx_ready(ws, "int4", ["--quantize", "int4"])),
    System(
        "gpt2onnx-int4-all4",
        "gpt2-onnx int4, every block at 4 bits",
        lambda ws: gpt2onnx_ready(ws, "int4-all4", ["--quantize", "int4", "--int8-layers", "none"]),
    ),
    System(
        "gpt2onnx-int4-block32",
        "gpt2-onnx int4, blocks of 32",
        lambda ws: gpt2onnx_ready(ws, "int4-block32", ["--quantize", "int4", "--block-size", "32"]),
    ),
    System(
        "gpt2onnx-int4-head4",
        "gpt2-onnx int4, 4-bit lm_head",
        lambda ws: gpt2onnx_ready(ws, "int4-head4", ["--quantize", "int4", "--head-bits", "4"]),
    ),
    System(
        "gpt2onnx-int8-fast-prefill",
        "gpt2-onnx int8 + fast prefill",
        lambda ws: gpt2onnx_ready(ws, "int8-fast-prefill", ["--quantize", "int8", "--fast-prefill"]),
    ),
    System(
        "gpt2onnx-int8-block32",
        "gpt2-onnx int8, blocks of 32",
        lambda ws: gpt2onnx_ready(ws, "int8-block32", ["--quantize", "int8", "--block-size", "32"]),
    ),
    System(
        "gpt2onnx-int8-block256",
        "gpt2-onnx int8, blocks of 256",
        lambda ws: gpt2onnx_ready(ws, "int8-block256", ["--quantize", "int8", "--block-size", "256"]),
    ),
    System(
        "gpt2onnx-int8-growing",
        "gpt2-onnx int8, growing cache",
        lambda ws: gpt2onnx_ready(ws, "int8-growing", ["--quantize", "int8", "--kv-cache", "growing"]),
    ),
    System(
        "optimum",
        "optimum ORTModelForCausalLM fp32",
        lambda ws: Ready(ws.venv(OPTIMUM_VENV), "optimum", str(ws.optimum_export())),
    ),
    System(
        "gpt2onnx-optimum-graph",
        "gpt2-onnx runtime on optimum's fp32 graph",
        lambda ws: Ready(in_this_env("gpt2onnx", "onnxruntime"), "gpt2onnx", str(ws.optimum_export())),
    ),
    System(
        "ct2-fp32",
        "CTranslate2 float32",
        lambda ws: Ready(ws.venv(CT2_VENV), "ctranslate2", str(ws.ct2_model("float32")), {"compute_type": "float32"}),
    ),
    System(
        "ct2-int8",
        "CTranslate2 int8",
        lambda ws: Ready(ws.venv(CT2_VENV), "ctranslate2", str(ws.ct2_model("int8")), {"compute_type": "int8"}),
    ),
    System(
        "genai-fp32",
        "onnxruntime-genai fp32",
        lambda ws: Ready(ws.venv(GENAI_VENV), "genai", str(ws.genai_model(None))),
    ),
    System(
        "genai-int8",
        "onnxruntime-genai int8 (ORT-optimised)",
        lambda ws: Ready(ws.venv(GENAI_VENV), "genai", str(ws.genai_model("int8"))),
    ),
    System(
        "genai-int4",
        "onnxruntime-genai int4 (ORT-optimised)",
        lambda ws: Ready(ws.venv(GENAI_VENV), "genai", str(ws.genai_model("int4"))),
    ),
    *(
        System(
            f"llamacpp-{kind}",
            f"llama.cpp {kind} (llama-cpp-python)",
            lambda ws, kind=kind: Ready(ws.venv(LLAMA_CPP_VENV), "llamacpp", str(ws.gguf(kind) / "model.gguf")),
        )
        for kind in GGUF_TYPES
    ),
)
SMOKE_SYSTEMS = ("transformers", "gpt2onnx-fp32", "gpt2onnx-int8", "gpt2onnx-int8-fast-prefill")
