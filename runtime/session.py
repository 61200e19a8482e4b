"""The onnxruntime session of a bundle's decoder graph: provider choice, threads, IO binding, and one forward step.

The session picks its cache kind once (runtime/cache.py) and the step function that goes with it:
- preallocated (bundle.json graph.kv_cache, CPU only): one numpy buffer per key and value, [batch, n_head, capacity,
  head_dim], bound through an IO binding as both the past input and the present output of every step; the graph
  writes the new positions into it in place, and no step copies the cache.
- host (a growing cache on CPU): a step is one run() call; numpy inputs are wrapped, not copied, and the outputs come
  back as numpy views of onnxruntime's buffers; the graph appends the new positions to the past it is given.
- device (a growing cache on CUDA): the step runs through an IO binding: new tokens, mask and positions are bound
  from host memory, the logits come back to host memory, and the present key/values stay on the device as OrtValues
  that are bound as the next step's past as they are, and reordered for beams on the device.
The inputs fed are those the graph takes (runtime/interface.py): graphs made elsewhere may lack position_ids and
logits_to_keep, or add a merged decoder's use_cache_branch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Any

import numpy as np

from . import bundle
from ._ort import ort
from .bundle import Manifest
from .cache import DeviceCache, DeviceGather, HostCache, KVCache, PreallocatedCache
from .errors import BundleError, InvalidInputError, ProviderError
from .interface import inspect_graph

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
# TF32 would round fp32 matrix products to 10-bit mantissas; keep fp32 bundles exact on CUDA.
CUDA_OPTIONS = {"use_tf32": "0"}


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
        made_here = bool(manifest.data.get("files"))  # a bundle, not a folder made elsewhere (runtime/onnx_folder.py)
        where = f"bundle {manifest.folder}: {manifest.model_path.name}" if made_here else str(manifest.model_path)
        self.interface = inspect_graph(self.session.get_inputs(), self.session.get_outputs(), self.architecture, where)
        names, self._output_names = bundle.io_names(self.architecture.n_layer)
        self._past_names, self._present_names = names[4:], self._output_names[1:]
        self._feed_names = self.interface.input_names()  # the inputs before the past
        self._input_names = self._feed_names + self._past_names
        self.kv_dtype = np.float16 if self.interface.past_dtype == "float16" else np.float32
        device_cache = self.provider == "cuda" if device_cache is None else device_cache
        self.cache_kind = "preallocated" if self.preallocated else "device" if device_cache else "host"
        # Rows of one step may hold different numbers of positions (each row's keys end at its mask's last 1).
        self.ragged_rows = self.preallocated and manifest.ragged_rows
        self.gather = (  # reorders (beams) and cuts (rewind) device-resident caches on the device
            DeviceGather(2 * self.architecture.n_layer, self.kv_dtype, providers, self.provider)
            if self.cache_kind == "device"
            else None
        )
        self._step = {"preallocated": self._step_in_place, "host": self._step_host, "device": self._step_device}[
            self.cache_kind
        ]

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

    def empty_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """The cache before the first step, of this session's kind; a preallocated one holds `capacity` positions
        (default: the context) and grows when a step needs more."""
        arch = self.architecture
        if self.cache_kind == "preallocated":
            shape = (batch_size, arch.n_head, capacity or arch.n_positions, arch.head_dim)
            buffers = [np.zeros(shape, self.kv_dtype) for _ in range(2 * arch.n_layer)]
            return PreallocatedCache(buffers[0::2], buffers[1::2])
        empty = np.zeros((batch_size, arch.n_head, 0, arch.head_dim), self.kv_dtype)
        if self.cache_kind == "device":
            return DeviceCache([empty] * arch.n_layer, [empty] * arch.n_layer, self.gather)
        return HostCache([empty] * arch.n_layer, [empty] * arch.n_layer)

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
        interface = self.interface
        inputs = [np.ascontiguousarray(input_ids, dtype=np.int64), np.ascontiguousarray(attention_mask, dtype=np.int64)]
        past_length = inputs[1].shape[1] - inputs[0].shape[1]
        if interface.position_ids:
            inputs.append(np.ascontiguousarray(position_ids, dtype=np.int64))
        else:
            self._check_column_positions(inputs[1], position_ids, past_length)
        if interface.logits_to_keep:
            inputs.append(np.array(logits_to_keep, dtype=np.int64))
        if interface.use_cache_branch:
            inputs.append(np.array([past_length > 0]))
        logits, present = self._step(inputs, logits_to_keep, past)
        if not interface.logits_to_keep and 0 < logits_to_keep < logits.shape[1]:
            logits = logits[:, -logits_to_keep:]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return logits, present

    def _check_column_positions(self, mask: np.ndarray, positions: np.ndarray, past_length: int) -> None:
        """A graph without position_ids numbers each new token by its column (past + j, as transformers does without
        position_ids): refuse positions that differ from that (left-padded rows) rather than compute wrong ones."""
        columns = past_length + np.arange(positions.shape[1])
        attended = mask[:, past_length:] == 1
        if np.any(attended & (positions != columns)):
            raise InvalidInputError(
                f"{self.manifest.model_path.name} takes no position_ids, so rows of different lengths cannot share a "
                "step (prompts of different lengths, or rows that ended at different steps before more input): give "
                "prompts of one length, one at a time, or use generate(), which groups them"
            )

    def _step_host(
        self, inputs: list[np.ndarray], logits_to_keep: int, past: HostCache
    ) -> tuple[np.ndarray, HostCache]:
        # On CPU, run() wraps the numpy inputs and returns numpy views of onnxruntime's outputs: no copies, and
        # fewer Python calls per step than binding 4 + 2 * n_layer inputs and outputs one by one.
        logits, *present = self.session.run(
            self._output_names, dict(zip(self._input_names, inputs + past.tensors, strict=True))
        )
        return logits, HostCache(present[0::2], present[1::2])

    def _step_device(
        self, inputs: list[np.ndarray], logits_to_keep: int, past: DeviceCache
    ) -> tuple[np.ndarray, DeviceCache]:
        binding = self.session.io_binding()
        for name, array in zip(self._feed_names, inputs, strict=True):
            binding.bind_cpu_input(name, array)
        for name, tensor in zip(self._past_names, past.tensors, strict=True):
            if isinstance(tensor, np.ndarray):
                binding.bind_cpu_input(name, tensor)
            else:
                binding.bind_ortvalue_input(name, tensor)
        binding.bind_output(bundle.LOGITS, "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.provider)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), DeviceCache(present[0::2], present[1::2], self.gather)

    def _step_in_place(
        self, inputs: list[np.ndarray], logits_to_keep: int, past: PreallocatedCache
    ) -> tuple[np.ndarray, PreallocatedCache]:
        if not isinstance(past, PreallocatedCache):
            raise ValueError("this session keeps a preallocated cache: start from its empty_cache()")
        total = inputs[1].shape[1]
        past.ensure_capacity(total, self.architecture.n_positions)
        binding = past.binding
        if binding is None:  # first step: bind every buffer as its layer's past and present, once for all steps
            binding = past.binding = self.session.io_binding()
            for past_name, present_name, buffer in zip(
                self._past_names, self._present_names, past.tensors, strict=True
            ):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(past_name, value)
                binding.bind_ortvalue_output(present_name, value)
        for name, array in zip(self._feed_names, inputs, strict=True):
            binding.bind_cpu_input(name, array)
        # The logits go straight into a new array of this step's shape (reading them back through get_outputs()
        # would wrap all 2 * n_layer + 1 outputs, ~23 us a step).
        new_tokens = inputs[0].shape[1]
        shape = [len(inputs[0]), min(logits_to_keep, new_tokens) or new_tokens, self.architecture.vocab_size]
        logits = np.empty(shape, np.float32)
        binding.bind_output(bundle.LOGITS, "cpu", 0, np.float32, shape, logits.__array_interface__["data"][0])
        self.session.run_with_iobinding(binding)
        past.length = total
        return logits, past
