"""Provider choice when onnxruntime has the CUDA provider: 'auto' falls back to the CPU with a one-line warning when
CUDA cannot start, 'cuda' stays strict, and CUDA's pip libraries are preloaded first (onnxruntime's preload_dlls).

No GPU is needed: onnxruntime is made to report a CUDA provider whose sessions fail, as on a machine whose driver or
CUDA libraries are missing.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

import gpt2onnx
from conftest import run_generate
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.runtime import session as session_module

ort = session_module.ort
CUDA, CPU = session_module.PROVIDERS["cuda"], session_module.PROVIDERS["cpu"]
CUDA_FAILURE = "CUDA failure 100: no CUDA-capable device is detected"


@pytest.fixture(scope="module")
def growing_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle that CUDA could run (growing cache), so that 'auto' tries CUDA first."""
    return export_bundle(output=tmp_path_factory.mktemp("providers") / "bundle", random_init="tiny", kv_cache="growing")


@pytest.fixture
def broken_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """onnxruntime lists the CUDA provider, its sessions fail to start, and pip's CUDA libraries are 'installed';
    returns the log of preload_dlls calls."""
    real_session, real_find_spec = ort.InferenceSession, importlib.util.find_spec
    preloaded: list[str] = []

    def session(path, sess_options=None, providers=()):
        if any(CUDA in (provider if isinstance(provider, str) else provider[0]) for provider in providers):
            raise RuntimeError(CUDA_FAILURE)
        return real_session(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloaded.append("called"), raising=False)
    monkeypatch.setattr(
        session_module.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "nvidia" else real_find_spec(name, *a),
    )
    session_module.preload_cuda_libraries.cache_clear()
    yield preloaded
    session_module.preload_cuda_libraries.cache_clear()


def test_auto_falls_back_to_the_cpu_with_one_warning(broken_cuda: list[str], growing_bundle: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = gpt2onnx.load(growing_bundle, provider="auto")
    assert model.provider == "cpu"
    assert [str(w.message) for w in caught] == [
        f"the CUDA provider failed to start ({CUDA_FAILURE}); running on the CPU"
    ]
    assert len(model.generate("Artificial intelligence", max_new_tokens=3).sequences[0].generated_token_ids) == 3
    assert broken_cuda == ["called"], "CUDA's pip libraries are preloaded before the CUDA provider is tried"


def test_cuda_stays_strict(broken_cuda: list[str], growing_bundle: Path) -> None:
    with pytest.raises(gpt2onnx.ProviderError, match=f"provider 'cuda' failed to start: {CUDA_FAILURE}"):
        gpt2onnx.load(growing_bundle, provider="cuda")


def test_the_command_line_prints_the_fallback_as_one_warning_line(broken_cuda: list[str], growing_bundle: Path) -> None:
    code, stdout, stderr = run_generate(
        ["Artificial intelligence", "--model", str(growing_bundle), "--max-new-tokens", "2"]
    )
    assert code == 0 and stdout.startswith("Artificial intelligence")
    assert stderr == f"gpt2-generate: warning: the CUDA provider failed to start ({CUDA_FAILURE}); running on the CPU\n"


def test_no_preload_without_the_cuda_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append("called"), raising=False)
    session_module.preload_cuda_libraries.cache_clear()
    assert session_module.resolve_providers("auto") == [CPU]
    assert calls == []
