"""One benchmark process: load one system, warm it up, time each decoding mode and a long prefill, write JSON.

Runs under the interpreter of the system it measures (the main venv, or a peer's venv under benchmarks/.venvs),
so it imports only the standard library at module level; each adapter imports its own system when loading.

    python benchmarks/worker.py SPEC.json      (the harness writes SPEC.json; the result goes to spec["result"])
"""

from __future__ import annotations

import importlib.metadata
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workload import EOS, decode_ms_per_token

BEAMS = 5
TOP_K = 50  # transformers' default top_k, used by every system when sampling


class Adapter:
    """A system behind one call: generate exactly `new_tokens` tokens after `ids` in a mode, return how many came."""

    packages: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("greedy", "beam", "sample")  # the decoding modes the system offers

    def __init__(self, spec: dict[str, Any]) -> None:
        self.model_path = spec["model"]
        self.threads: int = spec["threads"]
        self.options: dict[str, Any] = spec.get("options", {})
        self.seed = 0

    def load(self) -> None:
        raise NotImplementedError

    def generate(self, ids: list[int], new_tokens: int, mode: str) -> int:
        raise NotImplementedError

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def label(self) -> str:
        """The packages measured, with their versions, e.g. 'transformers 5.24.0 + torch 2.13.0'."""
        return " + ".join(f"{name} {importlib.metadata.version(name)}" for name in self.packages)


class GPT2Onnx(Adapter):
    packages = ("gpt2-onnx", "onnxruntime")

    def load(self) -> None:
        import gpt2onnx

        self.model = gpt2onnx.load(self.model_path, provider="cpu")

    def generate(self, ids: list[int], new_tokens: int, mode: str) -> int:
        options: dict[str, Any] = {"min_new_tokens": new_tokens}
        if mode == "beam":
            options["num_beams"] = BEAMS
        elif mode == "sample":
            options.update(do_sample=True, top_k=TOP_K, seed=self.next_seed())
        output = self.model.generate(input_ids=ids, max_new_tokens=new_tokens, **options)
        return len(output.results[0].sequences[0].generated_token_ids)


class Transformers(Adapter):
    packages = ("transformers", "torch")

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path).eval()

    def generate(self, ids: list[int], new_tokens: int, mode: str) -> int:
        torch = self.torch
        options: dict[str, Any] = {"do_sample": False, "num_beams": 1}
        if mode == "beam":
            options["num_beams"] = BEAMS
        elif mode == "sample":
            torch.manual_seed(self.next_seed())
            options.update(do_sample=True, top_k=TOP_K)
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=EOS,
                **options,
            )
        return output.shape[1] - len(ids)


class Optimum(Transformers):
    packages = ("optimum-onnx", "onnxruntime", "transformers", "torch")

    def load(self) -> None:
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        # torch only shuffles tensors here; on more threads its OpenMP spinning steals onnxruntime's cores.
        torch.set_num_threads(1)
        self.torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(self.model_path, provider="CPUExecutionProvider")


class CTranslate2(Adapter):
    packages = ("ctranslate2",)

    def load(self) -> None:
        import ctranslate2

        self.ct2 = ctranslate2
        self.generator = ctranslate2.Generator(
            self.model_path, device="cpu", compute_type=self.options["compute_type"], intra_threads=self.threads
        )
        self.vocabulary: list[str] = json.loads((Path(self.model_path) / "vocabulary.json").read_text("utf-8"))

    def generate(self, ids: list[int], new_tokens: int, mode: str) -> int:
        options: dict[str, Any] = {}
        if mode == "beam":
            options["beam_size"] = BEAMS
        elif mode == "sample":
            self.ct2.set_random_seed(self.next_seed())
            options["sampling_topk"] = TOP_K
        results = self.generator.generate_batch(
            [[self.vocabulary[token] for token in ids]],
            max_length=new_tokens,
            min_length=new_tokens,
            include_prompt_in_result=False,
            **options,
        )
        return len(results[0].sequences_ids[0])


class GenAI(Adapter):
    packages = ("onnxruntime-genai",)

    def load(self) -> None:
        import onnxruntime_genai

        self.og = onnxruntime_genai
        self.model = onnxruntime_genai.Model(self.model_path)

    def generate(self, ids: list[int], new_tokens: int, mode: str) -> int:
        options: dict[str, Any] = {"max_length": len(ids) + new_tokens, "min_length": len(ids) + new_tokens}
        if mode == "beam":
            options["num_beams"] = BEAMS
        elif mode == "sample":
            options.update(do_sample=True, top_k=TOP_K, random_seed=self.next_seed())
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return len(generator.get_sequence(0)) - len(ids)


def open_llama(model_path: str, threads: int, logits_all: bool = False) -> Any:
    """llama-cpp-python's Llama over a GGUF, as every llama.cpp row runs it (GPT-2's context, these threads)."""
    from llama_cpp import Llama

    return Llama(
        model_path=model_path,
        n_ctx=1024,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


class LlamaCpp(Adapter):
    """llama.cpp through llama-cpp-python's Llama.generate: its sampler chain, one token per llama_decode call.

    It has no beam search. Each call starts from an empty cache (reset), as the other systems do: Llama.generate
    would otherwise reuse the cache of a previous call's matching prompt."""

    packages = ("llama-cpp-python",)
    modes = ("greedy", "sample")

    def load(self) -> None:
        self.llm = open_llama(self.model_path, self.threads)

    def generate(self, ids: list[int], new_tokens: int, mode: str) -> int:
        options: dict[str, Any] = {"temp": 0.0}  # greedy
        if mode == "sample":
            self.llm.set_seed(self.next_seed())
            options = {"temp": 1.0, "top_k": TOP_K, "top_p": 1.0, "min_p": 0.0}
        self.llm.reset()
        count = 0
        for _token in self.llm.generate(ids, repeat_penalty=1.0, **options):  # endless: EOS does not stop it
            count += 1
            if count == new_tokens:
                break
        return count


ADAPTERS: dict[str, type[Adapter]] = {
    "gpt2onnx": GPT2Onnx,
    "transformers": Transformers,
    "optimum": Optimum,
    "ctranslate2": CTranslate2,
    "genai": GenAI,
    "llamacpp": LlamaCpp,
}


def timed(call: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    count = call()
    return time.perf_counter() - start, count


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, produce a first token, warm up every mode, then time 1 and N new tokens per mode and a long prefill."""
    adapter = ADAPTERS[spec["adapter"]](spec)
    adapter.load()
    ready_at = time.monotonic()
    prompt, long_prompt, new_tokens = spec["prompt"], spec["long_prompt"], spec["new_tokens"]
    adapter.generate(prompt, 1, "greedy")
    first_token_at = time.monotonic()
    modes = [mode for mode in spec["modes"] if mode in adapter.modes]
    for mode in modes:
        adapter.generate(prompt, spec["warmup_tokens"], mode)
    adapter.generate(long_prompt, 1, "greedy")
    decode = {}
    for mode in modes:
        one_s, _ = timed(lambda mode=mode: adapter.generate(prompt, 1, mode))
        all_s, count = timed(lambda mode=mode: adapter.generate(prompt, new_tokens, mode))
        decode[mode] = {
            "one_token_s": one_s,
            "all_tokens_s": all_s,
            "tokens": count,
            "ms_per_token": decode_ms_per_token(one_s, all_s, new_tokens),
        }
    long_s, _ = timed(lambda: adapter.generate(long_prompt, 1, "greedy"))
    return {
        "label": adapter.label(),
        "ready_at": ready_at,
        "first_token_at": first_token_at,
        "decode": decode,
        "long_prompt_first_token_ms": long_s * 1000,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text("utf-8"))
    result = measure(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
