"""Sequential, layer-by-layer compression of a Hugging Face causal LM.

Memory stays at about one decoder layer + calibration activations + the embeddings/head:

1. a *skeleton* model with a single decoder layer holds the embeddings, rotary tables, final
   norm and head (loaded from the checkpoint); its one layer is replaced by a catcher that
   records the inputs and keyword arguments the first real layer would receive;
2. each decoder layer is built on the meta device, materialised, filled from the safetensors
   shards, compressed by every pass of the recipe (passes that need calibration see statistics
   of this layer's inputs, which come from the already-compressed previous layers), its outputs
   computed for the next layer, its tensors streamed to the output shards, and freed.

Calibration forwards of bf16/fp16 models run on a float32 copy of the layer (CPU bf16 GEMMs are
slow without native bf16 units); the layer that is compressed and written keeps its dtype.
"""

from __future__ import annotations

import copy
import ctypes
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcomp.calibration import calibration_batches, collect_input_stats, offline_calibration_text
from llmcomp.errors import LlmcompError
from llmcomp.formats.checkpoint import (
    RECIPE_FILE,
    REPORT_FILE,
    CheckpointWriter,
    quantization_config,
)
from llmcomp.lazy_weights import LazyWeights
from llmcomp.loading import ModelSource, load_tokenizer, parse_dtype, resolve_source
from llmcomp.passes.base import CompressionPass, set_submodule
from llmcomp.recipes import Recipe

CALIBRATION_BATCH = 8
# Calibration forwards run in float32 on CPU: bf16/fp16 matmuls are several times slower there
# on CPUs without native bf16 units, and float32 statistics are at least as accurate.
CPU_CALIBRATION_DTYPE = torch.float32


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs, then stops the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        self.captured.append((hidden_states, kwargs))
        raise _StopForward


@dataclass
class LayerHandle:
    """Where the decoder layers live inside the model (e.g. ``model.layers``)."""

    prefix: str
    count: int


def find_decoder_layers(model: nn.Module, num_layers: int) -> LayerHandle:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return LayerHandle(name, num_layers)
    raise LlmcompError(f"cannot find the decoder layers ({num_layers}-element ModuleList) in {type(model).__name__}")


@dataclass
class CompressionResult:
    output_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def _layer_config_count(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def _one_layer_config(config: Any) -> Any:
    small = copy.deepcopy(config)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:1]
    return small


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after each layer (glibc keeps them otherwise, and the
    process would grow by a layer's worth of garbage per layer)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _rebuild_computed_buffers(model: nn.Module) -> None:
    """Re-create modules whose buffers are computed at init, not stored (e.g. rotary tables)."""
    for name, module in list(model.named_modules()):
        if not getattr(module, "_non_persistent_buffers_set", None):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise LlmcompError(f"module {name!r} has computed buffers and no config: unsupported architecture")
        with torch.device("cpu"):
            set_submodule(model, name, type(module)(config))


def _local_source(source: ModelSource) -> Path:
    if source.kind == "dir":
        return source.path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                         "*.txt", "*.jinja"]))
    except Exception as exc:  # network errors come in many types
        raise LlmcompError(f"cannot download {source.location!r} from the hub: {str(exc).splitlines()[0]}") from exc


class Pipeline:
    """Runs a recipe over one model; see the module docstring for the memory model."""

    def __init__(
        self,
        source: str,
        recipe: Recipe,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        progress: bool = True,
        calibration_text: str | None = None,
    ) -> None:
        from transformers import AutoConfig

        self.recipe = recipe
        self.passes: list[CompressionPass] = recipe.build_passes()
        self.source = resolve_source(source)
        self.model_dir = _local_source(self.source)
        self.weights = LazyWeights(self.model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        if getattr(self.config, "quantization_config", None):
            raise LlmcompError(f"{source} is already quantized; compress an unquantized checkpoint")
        requested = parse_dtype(dtype)
        if requested == "auto":
            requested = getattr(self.config, "dtype", None) or torch.float32
        self.dtype: torch.dtype = getattr(torch, requested) if isinstance(requested, str) else requested
        reduced = self.dtype in (torch.bfloat16, torch.float16)
        self.calibration_dtype: torch.dtype = CPU_CALIBRATION_DTYPE if reduced else self.dtype
        self.trust_remote_code = trust_remote_code
        self.progress = progress
        self.calibration_text = calibration_text
        self.needs_calibration = any(p.requires_calibration for p in self.passes)

    # -- model pieces --------------------------------------------------------------------------
    def _build_skeleton(self) -> tuple[nn.Module, LayerHandle]:
        """Embeddings, rotary tables, final norm and head, without a second copy of anything:
        built on the meta device, materialised empty, filled from the checkpoint."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                _one_layer_config(self.config), dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        handle = find_decoder_layers(skeleton, 1)
        skeleton.get_submodule(handle.prefix)[0] = nn.Identity()  # real layers are built one at a time
        skeleton.to_empty(device="cpu")
        own = list(skeleton.state_dict())
        present = [n for n in own if n in self.weights]
        skeleton.load_state_dict(self.weights.get(present), strict=False)
        missing = set(own) - set(present)
        if getattr(self.config, "tie_word_embeddings", False):
            skeleton.tie_weights()
            missing = {n for n in missing if "lm_head" not in n}
        if missing:
            raise LlmcompError(f"{self.model_dir}: checkpoint lacks {sorted(missing)[0]!r}")
        _rebuild_computed_buffers(skeleton)
        skeleton.eval()
        return skeleton, handle

    def _build_layer(self, meta_layers: nn.ModuleList, prefix: str, index: int) -> nn.Module:
        layer = meta_layers[index]
        for name, module in layer.named_modules():
            if getattr(module, "_non_persistent_buffers_set", None):
                raise LlmcompError(
                    f"decoder layer module {name!r} has non-persistent buffers: unsupported architecture"
                )
        layer = layer.to_empty(device="cpu")
        layer_prefix = f"{prefix}.{index}."
        names = [layer_prefix + n for n in layer.state_dict()]
        tensors = self.weights.get(names)
        layer.load_state_dict({n[len(layer_prefix):]: t for n, t in tensors.items()}, strict=True)
        meta_layers[index] = nn.Identity()  # drop our reference to the meta module
        return layer.eval()

    def _meta_layers(self, handle_prefix: str) -> nn.ModuleList:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(
                self.config, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        layers = full.get_submodule(handle_prefix)
        assert isinstance(layers, nn.ModuleList)
        return layers

    # -- calibration ---------------------------------------------------------------------------
    def _capture_first_layer_inputs(self, skeleton: nn.Module, handle: LayerHandle):
        tokenizer = load_tokenizer(ModelSource("dir", str(self.model_dir)), self.trust_remote_code)
        cal = self.recipe.calibration
        if self.calibration_text is not None:
            text, where = self.calibration_text, "caller-provided text"
        elif cal.data_file:
            path = Path(cal.data_file)
            if not path.is_file():
                raise LlmcompError(f"calibration data_file {path} does not exist")
            text, where = path.read_text(encoding="utf-8", errors="replace"), str(path)
        else:
            text, where = offline_calibration_text(), "offline license texts (llmcomp.calibration)"
        ids = calibration_batches(tokenizer, text, cal.num_samples, cal.seq_len, cal.seed)
        catcher = _Catcher()
        layers = skeleton.get_submodule(handle.prefix)
        original = layers[0]
        layers[0] = catcher
        try:
            with torch.inference_mode():
                for start in range(0, ids.shape[0], CALIBRATION_BATCH):
                    try:
                        skeleton(input_ids=ids[start : start + CALIBRATION_BATCH], use_cache=False)
                    except _StopForward:
                        pass
        finally:
            layers[0] = original
        inputs = self._calibration_inputs(catcher.captured)
        return inputs, {"source": where, "samples": cal.num_samples, "seq_len": cal.seq_len,
                        "dtype": str(inputs[0][0].dtype).removeprefix("torch.")}

    def _calibration_layer(self, layer: nn.Module) -> nn.Module:
        """The layer as calibration runs it: itself, or a float32 copy when it is a reduced float."""
        if self.calibration_dtype == self.dtype:
            return layer
        return copy.deepcopy(layer).to(self.calibration_dtype)

    def _calibration_inputs(self, captured: list[tuple[torch.Tensor, dict[str, Any]]]):
        return [(_float_tensors_to(h, self.calibration_dtype), _float_tensors_to(kw, self.calibration_dtype))
                for h, kw in captured]

    @staticmethod
    def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[torch.Tensor]:
        outs = []
        with torch.inference_mode():
            for hidden, kwargs in inputs:
                out = layer(hidden, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    # -- main loop -----------------------------------------------------------------------------
    def run(self, output_dir: str | Path, overwrite: bool = False, shard_bytes: int | None = None,
            on_layer: Callable[[int, int], None] | None = None) -> CompressionResult:
        t_start = time.perf_counter()
        writer_kwargs = {"shard_bytes": shard_bytes} if shard_bytes else {}
        skeleton, handle = self._build_skeleton()
        handle = LayerHandle(handle.prefix, _layer_config_count(self.config))
        meta_layers = self._meta_layers(handle.prefix)
        calib_info: dict[str, Any] | None = None
        inputs: list[tuple[torch.Tensor, dict[str, Any]]] = []
        if self.needs_calibration:
            inputs, calib_info = self._capture_first_layer_inputs(skeleton, handle)
        module_specs: dict[str, dict[str, Any]] = {}
        module_reports: dict[str, dict[str, Any]] = {}
        layer_times: list[float] = []
        original_bytes = 0
        with CheckpointWriter(output_dir, overwrite=overwrite, **writer_kwargs) as writer, self._progress() as bar:
            task = bar.add_task("compressing", total=handle.count) if bar else None
            for i in range(handle.count):
                t0 = time.perf_counter()
                layer = self._build_layer(meta_layers, handle.prefix, i)
                original_bytes += sum(t.numel() * t.element_size() for t in layer.state_dict().values())
                prefix = f"{handle.prefix}.{i}"
                for p in self.passes:
                    stats = None
                    if p.requires_calibration:
                        calib_layer = self._calibration_layer(layer)
                        targets = p.target_linears(calib_layer, prefix)
                        with collect_input_stats(targets, with_hessian=p.needs_hessian) as stats:
                            self._run_layer(calib_layer, inputs)
                        del calib_layer
                    module_reports.update(p.process_layer(layer, prefix, stats))
                if self.needs_calibration and i + 1 < handle.count:
                    outs = self._run_layer(self._calibration_layer(layer), inputs)
                    inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs, strict=True)]
                for sub, module in layer.named_modules():
                    if hasattr(module, "spec") and callable(module.spec):
                        module_specs[f"{prefix}.{sub}"] = module.spec()
                writer.add({f"{prefix}.{n}": t for n, t in layer.state_dict().items()})
                del layer
                _release_freed_memory()
                layer_times.append(time.perf_counter() - t0)
                if bar is not None:
                    bar.advance(task)
                if on_layer is not None:
                    on_layer(i, handle.count)
            compressed_head = self._compress_head(skeleton)
            head = self._head_tensors(skeleton, handle, None if compressed_head is None else compressed_head.name)
            original_bytes += sum(t.numel() * t.element_size() for t in head.values())
            writer.add(head)
            config = self.config.to_dict()
            if compressed_head is not None:
                if not getattr(self.config, "tie_word_embeddings", False):  # a tied head was counted as the embedding
                    head_weight = skeleton.get_submodule(compressed_head.name).weight
                    original_bytes += head_weight.numel() * head_weight.element_size()
                writer.add(compressed_head.tensors)
                module_specs.update(compressed_head.specs)
                module_reports.update(compressed_head.reports)
                _untie_word_embeddings(config)
            report = self._report(module_reports, layer_times, original_bytes, calib_info, t_start)
            config["quantization_config"] = quantization_config(module_specs, recipe=self.recipe.name)
            config.setdefault("dtype", str(self.dtype).removeprefix("torch."))
            out = writer.commit(
                config,
                side_files={RECIPE_FILE: self.recipe.to_yaml(), REPORT_FILE: _json(report)},
                copy_from=self.model_dir,
            )
        report["compressed_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        report["compression_ratio"] = report["original_bytes"] / max(report["compressed_bytes"], 1)
        (out / REPORT_FILE).write_text(_json(report))
        return CompressionResult(out, report)

    def _head_tensors(self, skeleton: nn.Module, handle: LayerHandle, compressed_head: str | None
                      ) -> dict[str, torch.Tensor]:
        """Dense tensors outside the decoder layers; a tied or separately compressed head is left out."""
        state = skeleton.state_dict()
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        return {
            n: t for n, t in state.items()
            if not n.startswith(handle.prefix + ".") and not (tied and n.startswith("lm_head."))
            and not (compressed_head and n.startswith(compressed_head + "."))
        }

    def _compress_head(self, skeleton: nn.Module) -> _CompressedHead | None:
        """Run the passes configured with ``lm_head: true`` on the output head.

        The head gets no calibration statistics (it would need the final norm's outputs), so only
        passes that work without them may compress it. A head tied to the input embedding is
        compressed from a copy: the embedding stays dense and the checkpoint is saved untied.
        """
        passes = [p for p in self.passes if p.config.lm_head]
        if not passes:
            return None
        head = skeleton.get_output_embeddings()
        name = next((n for n, m in skeleton.named_modules() if m is head), None)
        if name is None or type(head) is not nn.Linear:
            raise LlmcompError(f"lm_head: true, but the output head is a {type(head).__name__}, not a linear layer")
        holder = nn.Module()
        copy_ = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                          dtype=head.weight.dtype)
        with torch.no_grad():
            copy_.weight.copy_(head.weight)
            if head.bias is not None:
                copy_.bias.copy_(head.bias)
        _set_nested(holder, name, copy_)
        reports: dict[str, dict[str, Any]] = {}
        for p in passes:
            if p.requires_calibration and not p.calibration_optional:
                raise LlmcompError(
                    f"pass {p.name!r} needs calibration statistics, which the output head does not get; "
                    "remove lm_head: true from it"
                )
            reports.update(p.process_layer(holder, "", None))
        if not reports:
            raise LlmcompError(f"lm_head: true, but no pass targets select {name!r} (check targets/ignore)")
        module = holder.get_submodule(name)
        specs = {name: module.spec()} if callable(getattr(module, "spec", None)) else {}
        tensors = {f"{name}.{k}": v for k, v in module.state_dict().items()}
        return _CompressedHead(name, tensors, specs, reports)

    def _progress(self):
        from contextlib import nullcontext

        if not self.progress:
            return nullcontext(None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("layers"), TimeElapsedColumn(), transient=False)

    def _report(self, modules: dict[str, dict[str, Any]], layer_times: list[float], original_bytes: int,
                calib: dict[str, Any] | None, t_start: float) -> dict[str, Any]:
        bpw = [(m["bits_per_weight"], m.get("numel", 0)) for m in modules.values() if "bits_per_weight" in m]
        weighted = sum(b * n for b, n in bpw)
        total_n = sum(n for _, n in bpw)
        return {
            "recipe": self.recipe.name,
            "source": self.source.location,
            "dtype": str(self.dtype).removeprefix("torch."),
            "calibration": calib,
            "modules": modules,
            "average_bits_per_weight": (weighted / total_n) if total_n else None,
            "layer_seconds": [round(t, 4) for t in layer_times],
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "original_bytes": original_bytes,
        }


@dataclass
class _CompressedHead:
    name: str
    tensors: dict[str, torch.Tensor]
    specs: dict[str, dict[str, Any]]
    reports: dict[str, dict[str, Any]]


def _set_nested(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """``root.<dotted> = module``, creating empty parent modules on the way."""
    *parents, child = dotted.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(child, module)


def _untie_word_embeddings(config: dict[str, Any]) -> None:
    """The head is stored on its own now; keep transformers from tying it back to the embedding."""
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False


def _float_tensors_to(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float_tensors_to(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _float_tensors_to(v, dtype) for k, v in obj.items()}
    return obj


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def compress(source: str, recipe: Recipe, output_dir: str | Path, overwrite: bool = False, dtype: str = "auto",
             progress: bool = True, shard_bytes: int | None = None, trust_remote_code: bool = False,
             calibration_text: str | None = None) -> CompressionResult:
    """Compress ``source`` with ``recipe`` into an llmcomp checkpoint at ``output_dir``."""
    pipe = Pipeline(source, recipe, dtype=dtype, trust_remote_code=trust_remote_code, progress=progress,
                    calibration_text=calibration_text)
    return pipe.run(output_dir, overwrite=overwrite, shard_bytes=shard_bytes)
