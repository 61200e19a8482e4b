"""The onnxruntime session of a bundle's decoder graph: provider choice, threads, IO binding, and one forward step.

A bundle's cache is growing or preallocated (bundle.json graph.kv_cache). Growing, on CPU a step is one run() call:
numpy inputs are wrapped, not copied, and the outputs come back as numpy views of onnxruntime's buffers; the graph
appends the new positions to the past it is given. Preallocated (CPU only), the cache is one numpy buffer per key and
value, [batch, n_head, capacity, head_dim], bound through an IO binding as both the past input and the present output
of every step: the graph writes the new positions into it in place, and no step copies the cache. With device_cache
(growing caches on CUDA) the step runs through an IO binding too: new tokens, mask and positions are bound from host
memory, the logits come back to host memory, and the present key/values stay on the device as OrtValues that are bound
as the next step's past as they are, and reordered for beams on the device.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import bundle
from ._ort import ort
from ._proto import gather_rows_model
from .bundle import Manifest
from .errors import BundleError, ProviderError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
# TF32 would round fp32 matrix products to 10-bit mantissas; keep fp32 bundles exact on CUDA.
CUDA_OPTIONS = {"use_tf32": "0"}


class RowGather:
    """Reorders the batch rows of device-resident cache tensors on their device (one small Gather graph)."""

    def __init__(self, count: int, dtype: type, providers: list[Any], device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.device = device
        self.session = ort.InferenceSession(gather_rows_model(count, dtype), options, providers=providers)
        self._inputs = [node.name for node in self.session.get_inputs()][1:]
        self._outputs = [node.name for node in self.session.get_outputs()]

    def __call__(self, tensors: list[Any], rows: np.ndarray) -> list[Any]:
        binding = self.session.io_binding()
        binding.bind_cpu_input("rows", np.ascontiguousarray(rows, dtype=np.int64))
        for name, tensor in zip(self._inputs, tensors, strict=True):
            binding.bind_ortvalue_input(name, tensor)
        for name in self._outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


@dataclass
class KVCache:
    """The past key/values of every layer, [batch, n_head, length, head_dim] each: numpy arrays, or OrtValues that
    live on the provider's device (CUDA) when the session keeps the cache there. A preallocated cache holds numpy
    buffers [batch, n_head, capacity, head_dim] of which the first `filled` positions are written."""

    keys: list[Any]
    values: list[Any]
    gather: RowGather | None = field(default=None, repr=False, compare=False)
    filled: int | None = None  # preallocated: positions written so far; None: a growing cache, all positions are
    binding: Any = field(default=None, repr=False, compare=False)  # preallocated: the buffers bound as past/present

    def select(self, rows: np.ndarray) -> KVCache:
        """A new cache of the given batch rows, in that order (each prompt's cache copied to its beams)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.filled is not None:
            return KVCache(
                [_rows_of_buffer(k, rows, self.filled) for k in self.keys],
                [_rows_of_buffer(v, rows, self.filled) for v in self.values],
                filled=self.filled,
            )
        if self.gather is None or all(isinstance(k, np.ndarray) for k in self.keys + self.values):
            return KVCache(
                [np.take(k, rows, axis=0) for k in self.keys], [np.take(v, rows, axis=0) for v in self.values]
            )
        gathered = self.gather(self.keys + self.values, rows)
        count = len(self.keys)
        return KVCache(gathered[:count], gathered[count:], self.gather)

    def reorder(self, rows: np.ndarray) -> KVCache:
        """The cache of rows [batch] of this same batch (beams following their parents), consuming this one: on the
        host only the rows of beams that moved are overwritten, in place; nothing happens when no beam moved."""
        rows = np.asarray(rows, dtype=np.int64)
        moved = np.flatnonzero(rows != np.arange(len(rows)))
        if not moved.size:
            return self
        if self.gather is not None:  # OrtValues on the device
            return self.select(rows)
        sources, end = rows[moved], self.filled  # a preallocated buffer: only its written positions
        for tensor in self.keys + self.values:
            tensor[moved, :, :end] = tensor[sources, :, :end]  # the right side is gathered first: overlaps are safe
        return self


def _rows_of_buffer(buffer: np.ndarray, rows: np.ndarray, filled: int) -> np.ndarray:
    """A new buffer of the same capacity holding the given rows' first `filled` positions (the rest zero)."""
    picked = np.zeros((len(rows), *buffer.shape[1:]), buffer.dtype)
    picked[:, :, :filled] = buffer[rows, :, :filled]
    return picked


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


def session_options(intra_op_threads: int | None = None) -> Any:
    """The onnxruntime SessionOptions of a decoder session: every graph optimisation, one thread per physical core
    (or intra_op_threads), operators run in sequence, warnings and errors only."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Worker threads spin between the operators of a run (a step has ~60 parallel operators; waking sleeping
    # threads for each cost ~0.9 ms of a 6.5 ms int8 GPT-2-small step on 2 cores) and stop spinning as soon as
    # the run returns, so an idle model takes no CPU from other processes.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    return options


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the pip packages that gpt2-onnx[gpu] installs (nvidia-*), which the dynamic loader
    does not search: without this, the CUDA provider needs LD_LIBRARY_PATH (onnxruntime >= 1.21 has preload_dlls)."""
    if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def resolve_providers(provider: str) -> list[str]:
    """The onnxruntime provider list for 'auto', 'cpu' or 'cuda'; ProviderError if it cannot work here."""
    if provider not in PROVIDER_CHOICES:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    if PROVIDERS["cuda"] in available:
        preload_cuda_libraries()
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    if provider == "cuda":
        raise ProviderError(
            "provider 'cuda' is not available in this onnxruntime "
            f"(available: {', '.join(available)}); install gpt2-onnx[gpu] in place of onnxruntime"
        )
    return [PROVIDERS["cpu"]]


class DecoderSession:
    """Runs the decoder graph: one call takes new tokens plus the past and returns logits and the new past.

    device_cache: keep the key/values as OrtValues on the provider's device between steps (default: on CUDA
    only; on CPU numpy arrays share onnxruntime's buffers already, and tests pass True to run the CUDA code path).
    Bundles with a preallocated cache run on CPU only: provider 'auto' picks CPU for them, 'cuda' is an error.
    """

    def __init__(
        self,
        manifest: Manifest,
        provider: str = "auto",
        intra_op_threads: int | None = None,
        device_cache: bool | None = None,
    ) -> None:
        self.manifest = manifest
        self.architecture = manifest.architecture
        self.preallocated = manifest.kv_cache == "preallocated"
        providers: list[Any] = list(resolve_providers(provider))
        if self.preallocated:
            if provider == "cuda" or device_cache:
                raise ProviderError(
                    f"bundle {manifest.folder} keeps a preallocated key/value cache (GroupQueryAttention), which runs "
                    "on the CPU provider only; export it with --kv-cache growing to run on CUDA"
                )
            providers = [PROVIDERS["cpu"]]  # for 'auto' as for 'cpu'
        if providers[0] == PROVIDERS["cuda"]:
            providers[0] = (PROVIDERS["cuda"], CUDA_OPTIONS)
        self.session = self._create_session(provider, providers, session_options(intra_op_threads))
        self.provider = "cuda" if PROVIDERS["cuda"] in self.session.get_providers() else "cpu"
        self._check_io_names()
        self.kv_dtype = np.float16 if manifest.dtype == "float16" else np.float32
        self.device_cache = self.provider == "cuda" if device_cache is None else device_cache
        self._gather = (
            RowGather(2 * self.architecture.n_layer, self.kv_dtype, providers, self.provider)
            if self.device_cache
            else None
        )

    def _create_session(self, provider: str, providers: list[Any], options: Any) -> Any:
        """The onnxruntime session; with provider 'auto', a CUDA provider that cannot run falls back to the CPU with
        a one-line warning ('cuda' stays strict: ProviderError)."""
        manifest = self.manifest
        try:
            session = ort.InferenceSession(str(manifest.model_path), sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own untyped errors
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if provider == "cuda" and "CUDA" in message:
                raise ProviderError(f"provider 'cuda' failed to start: {message}") from None
            if provider == "auto" and len(providers) > 1:
                warnings.warn(f"the CUDA provider failed to start ({message}); running on the CPU", stacklevel=3)
                return self._create_session("cpu", [PROVIDERS["cpu"]], options)
            raise BundleError(
                f"bundle {manifest.folder}: onnxruntime cannot load {manifest.model_path.name}: {message}"
            ) from None
        if len(providers) > 1 and PROVIDERS["cuda"] not in session.get_providers():
            if provider == "cuda":
                raise ProviderError("provider 'cuda' could not be initialised (check the CUDA and cuDNN libraries)")
            warnings.warn("the CUDA provider could not be initialised; running on the CPU", stacklevel=3)
        return session

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
        self._input_names, self._output_names = expected_inputs, expected_outputs
        self._past_names, self._present_names = expected_inputs[4:], expected_outputs[1:]

    def empty_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """The cache before the first step; a preallocated one holds `capacity` positions (default: the context)."""
        arch = self.architecture
        if self.preallocated:
            shape = (batch_size, arch.n_head, capacity or arch.n_positions, arch.head_dim)
            buffers = [np.zeros(shape, self.kv_dtype) for _ in range(2 * arch.n_layer)]
            return KVCache(buffers[0::2], buffers[1::2], filled=0)
        empty = np.zeros((batch_size, arch.n_head, 0, arch.head_dim), self.kv_dtype)
        return KVCache([empty] * arch.n_layer, [empty] * arch.n_layer, self._gather)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        logits_to_keep: int = 1,
    ) -> tuple[np.ndarray, KVCache]:
        """One step: logits [batch, kept, vocab] of the last `logits_to_keep` positions (0 = all), and the new past
        (a preallocated cache is updated in place and returned)."""
        inputs = [
            np.ascontiguousarray(input_ids, dtype=np.int64),
            np.ascontiguousarray(attention_mask, dtype=np.int64),
            np.ascontiguousarray(position_ids, dtype=np.int64),
            np.array(logits_to_keep, dtype=np.int64),
        ]
        if self.preallocated:
            return self._forward_in_place(inputs, logits_to_keep, past)
        if not self.device_cache:
            # On CPU, run() wraps the numpy inputs and returns numpy views of onnxruntime's outputs: no copies, and
            # fewer Python calls per step than binding 4 + 2 * n_layer inputs and outputs one by one.
            logits, *present = self.session.run(
                self._output_names, dict(zip(self._input_names, inputs + _interleave(past), strict=True))
            )
            return logits, KVCache(present[0::2], present[1::2])
        binding = self.session.io_binding()
        for name, array in zip(self._input_names[:4], inputs, strict=True):
            binding.bind_cpu_input(name, array)
        for name, tensor in zip(self._past_names, _interleave(past), strict=True):
            if isinstance(tensor, np.ndarray):
                binding.bind_cpu_input(name, tensor)
            else:
                binding.bind_ortvalue_input(name, tensor)
        binding.bind_output(bundle.LOGITS, "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.provider)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), KVCache(present[0::2], present[1::2], self._gather)

    def _forward_in_place(
        self, inputs: list[np.ndarray], logits_to_keep: int, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        if past.filled is None:
            raise ValueError("this session keeps a preallocated cache: start from its empty_cache()")
        total, capacity = inputs[1].shape[1], past.keys[0].shape[2]
        if total > capacity:
            raise ValueError(f"this step needs a preallocated cache of {total} positions, got {capacity}")
        binding = past.binding
        if binding is None:  # first step: bind every buffer as its layer's past and present, once for all steps
            binding = past.binding = self.session.io_binding()
            for past_name, present_name, buffer in zip(
                self._past_names, self._present_names, _interleave(past), strict=True
            ):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(past_name, value)
                binding.bind_ortvalue_output(present_name, value)
        for name, array in zip(self._input_names[:4], inputs, strict=True):
            binding.bind_cpu_input(name, array)
        # The logits go straight into a new array of this step's shape (reading them back through get_outputs()
        # would wrap all 2 * n_layer + 1 outputs, ~23 us a step).
        new_tokens = inputs[0].shape[1]
        shape = [len(inputs[0]), min(logits_to_keep, new_tokens) or new_tokens, self.architecture.vocab_size]
        logits = np.empty(shape, np.float32)
        binding.bind_output(bundle.LOGITS, "cpu", 0, np.float32, shape, logits.__array_interface__["data"][0])
        self.session.run_with_iobinding(binding)
        past.filled = total
        return logits, past


def _interleave(cache: KVCache) -> list[Any]:
    """key 0, value 0, key 1, value 1, ...: the order of the graph's past inputs."""
    return [tensor for pair in zip(cache.keys, cache.values, strict=True) for tensor in pair]
