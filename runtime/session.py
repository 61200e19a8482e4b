"""The onnxruntime session of a bundle's decoder graph: provider choice, threads, and one forward step."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import bundle
from ._ort import ort
from .bundle import Manifest
from .errors import BundleError, ProviderError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda")


@dataclass
class KVCache:
    """The past key/values of every layer: two arrays [batch, n_head, length, head_dim] each."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: np.ndarray) -> KVCache:
        """The cache of the given batch rows, in that order (beam reordering, dropping finished rows)."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values])


def physical_cores() -> int:
    """Cores to run on: the CPUs this process may use, halved when they are hyper-threads of the same cores."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list", encoding="ascii") as handle:
            siblings = handle.read().replace("-", ",").count(",") + 1
    except OSError:
        siblings = 1
    return max(1, available // max(1, siblings))


def resolve_providers(provider: str) -> list[str]:
    """The onnxruntime provider list for 'auto', 'cpu' or 'cuda'; ProviderError if it cannot work here."""
    if provider not in PROVIDER_CHOICES:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    if PROVIDERS["cuda"] in available:
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    if provider == "cuda":
        raise ProviderError(
            "provider 'cuda' is not available in this onnxruntime "
            f"(available: {', '.join(available)}); install gpt2-onnx[gpu] in place of onnxruntime"
        )
    return [PROVIDERS["cpu"]]


class DecoderSession:
    """Runs the decoder graph: one call takes new tokens plus the past and returns logits and the new past."""

    def __init__(self, manifest: Manifest, provider: str = "auto", intra_op_threads: int | None = None) -> None:
        self.manifest = manifest
        self.architecture = manifest.architecture
        providers = resolve_providers(provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads steal cores from the rest of the process between steps; the decode loop is serial.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(manifest.model_path), sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own untyped errors
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if provider == "cuda" and "CUDA" in message:
                raise ProviderError(f"provider 'cuda' failed to start: {message}") from None
            raise BundleError(
                f"bundle {manifest.folder}: onnxruntime cannot load {manifest.model_path.name}: {message}"
            ) from None
        if provider == "cuda" and PROVIDERS["cuda"] not in self.session.get_providers():
            raise ProviderError("provider 'cuda' could not be initialised (check the CUDA and cuDNN libraries)")
        self.provider = "cuda" if PROVIDERS["cuda"] in self.session.get_providers() else "cpu"
        self._check_io_names()
        self.kv_dtype = np.float16 if manifest.dtype == "float16" else np.float32

    def _check_io_names(self) -> None:
        expected_inputs, expected_outputs = bundle.io_names(self.architecture.n_layer)
        inputs = {node.name for node in self.session.get_inputs()}
        outputs = {node.name for node in self.session.get_outputs()}
        missing = [name for name in expected_inputs if name not in inputs] + [
            name for name in expected_outputs if name not in outputs
        ]
        if missing:
            raise BundleError(
                f"bundle {self.manifest.folder}: {self.manifest.model_path.name} "
                f"lacks the graph input/output {missing[0]}"
            )
        self._output_names = expected_outputs

    def empty_cache(self, batch_size: int) -> KVCache:
        arch = self.architecture
        shape = (batch_size, arch.n_head, 0, arch.head_dim)
        return KVCache(
            [np.zeros(shape, self.kv_dtype) for _ in range(arch.n_layer)],
            [np.zeros(shape, self.kv_dtype) for _ in range(arch.n_layer)],
        )

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        logits_to_keep: int = 1,
    ) -> tuple[np.ndarray, KVCache]:
        """One step: logits [batch, kept, vocab] of the last `logits_to_keep` positions (0 = all), and the new past."""
        feed = {
            bundle.INPUT_IDS: input_ids,
            bundle.ATTENTION_MASK: attention_mask,
            bundle.POSITION_IDS: position_ids,
            bundle.LOGITS_TO_KEEP: np.array(logits_to_keep, dtype=np.int64),
        }
        for layer in range(self.architecture.n_layer):
            feed[bundle.past_key_name(layer)] = past.keys[layer]
            feed[bundle.past_value_name(layer)] = past.values[layer]
        logits, *present = self.session.run(self._output_names, feed)
        return logits, KVCache(present[0::2], present[1::2])
