"""Sequential, layer-by-layer compression of a Hugging Face causal LM, resumable.

Memory stays at about one decoder layer + calibration activations + the embeddings/head:

1. the model is built once on the meta device; its decoder layers (found through the
   architecture) are set aside and the rest (embeddings, rotary tables, final norm, head) is
   materialised as the *skeleton*, whose first layer slot is a catcher that records the inputs
   the first real layer would receive;
2. the passes' model-level hooks run (a global budget is planned here);
3. each decoder layer is materialised from the safetensors shards and handed to every pass in
   recipe order. A pass sees only what it declared (:class:`~llmcomp.passes.base.Needs`): input
   statistics per input group, recomputed per group for sequential passes, all from the inputs
   that the already-compressed previous layers produce. Each module's
   :class:`~llmcomp.passes.base.ModuleState` (mask, reports) travels from pass to pass. The
   layer's tensors and the next layer's inputs are recorded in ``OUT.partial``;
4. the head is compressed if a pass asks for it, the model-level end hooks run, and the
   checkpoint is assembled atomically from ``OUT.partial``.

An interrupted run (crash, ``kill -9``, Ctrl-C) resumes at the first unrecorded layer with
``resume=True`` and gives bit-identical tensors. Calibration forwards of bf16/fp16 models run on
a float32 copy of the layer (CPU bf16 GEMMs are slow without native bf16 units); the layer that
is compressed and written keeps its dtype.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcomp.calibration import (
    InputObserver,
    StopForward,
    calibration_batches,
    calibration_text,
    context_length,
)
from llmcomp.errors import CheckpointError, LlmcompError, RecipeError
from llmcomp.formats.atomic import AtomicDirectory
from llmcomp.formats.checkpoint import DEFAULT_SHARD_BYTES, RECIPE_FILE, REPORT_FILE, write_checkpoint
from llmcomp.formats.partial import PartialRun
from llmcomp.lazy_weights import LazyWeights
from llmcomp.loading import ModelSource, load_tokenizer, parse_dtype, resolve_source
from llmcomp.passes.base import (
    CompressionPass,
    LayerWork,
    ModuleState,
    Needs,
    child_name,
    compressible_modules,
    set_submodule,
)
from llmcomp.recipes import Recipe
from llmcomp.scheme import parse_module_spec

CALIBRATION_BATCH = 8
# Calibration forwards run in float32 on CPU: bf16/fp16 matmuls are several times slower there
# on CPUs without native bf16 units, and float32 statistics are at least as accurate.
CPU_CALIBRATION_DTYPE = torch.float32
Inputs = list[tuple[torch.Tensor, dict[str, Any]]]


class _Catcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs, then stops the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: Inputs = []

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        self.captured.append((hidden_states, kwargs))
        raise StopForward


@dataclass
class LayerHandle:
    """Where the decoder layers live inside the model (e.g. ``model.layers``)."""

    prefix: str
    count: int


def find_decoder_layers(model: nn.Module, num_layers: int) -> LayerHandle:
    """The decoder layers, found through the architecture: the ``ModuleList`` of ``num_layers``
    modules whose class transformers names as the unit it never splits (``_no_split_modules``,
    e.g. ``LlamaDecoderLayer``)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    if not layer_classes:
        raise LlmcompError(f"{type(model).__name__} does not name its decoder layer class (_no_split_modules)")
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) == num_layers
                and all(type(m).__name__ in layer_classes for m in module)):
            return LayerHandle(name, num_layers)
    raise LlmcompError(
        f"cannot find the {num_layers} decoder layers ({'/'.join(sorted(layer_classes))}) in {type(model).__name__}"
    )


@dataclass
class ModelInfo:
    """What model-level pass hooks (``begin_model``, ``end_model``) see."""

    source: ModelSource
    model_dir: Path
    config: Any
    dtype: torch.dtype
    layer_prefix: str
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # every compressible module of the decoder layers
    weights: LazyWeights
    trust_remote_code: bool = False
    _calibration: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    def calibration_ids(self) -> torch.Tensor:
        """``[samples, seq_len]`` calibration token ids (the same windows the layers are calibrated on)."""
        if self._calibration is None:
            raise LlmcompError("this run has no calibration data")
        return self._calibration()

    def load_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The whole uncompressed model in memory (for passes that need end-to-end signals)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype,
                                                     trust_remote_code=self.trust_remote_code)
        return model.eval()


@dataclass
class CompressionResult:
    output_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def _layer_count(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


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


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Pipeline:
    """Runs a recipe over one model; see the module docstring."""

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
        self.calibration_override = calibration_text
        self.needs = Needs()
        for p in self.passes:
            self.needs = self.needs.union(p.needs())
        self._calibration_ids: torch.Tensor | None = None
        self._calibration_info: dict[str, Any] | None = None

    # -- the run, step by step -------------------------------------------------------------------
    def run(self, output_dir: str | Path, overwrite: bool = False, shard_bytes: int | None = None,
            resume: bool = False, on_layer: Callable[[int, int], None] | None = None,
            resume_hint: str = "llmcomp compress ... --resume") -> CompressionResult:
        t_start = time.perf_counter()
        output = Path(output_dir)
        if output.exists() and not overwrite:
            raise CheckpointError(f"{output} already exists; pass --overwrite to replace it")
        meta, handle = self._build_meta_model()
        meta_layers = self._detach_layers(meta, handle)
        info = self._model_info(meta_layers, handle)
        self._check_targets(info)
        partial = PartialRun(output, self._fingerprint(), resume, resume_hint)
        try:
            progress = self._begin(partial, info)
            skeleton = self._materialize_skeleton(meta)
            inputs = self._first_layer_inputs(skeleton, handle, partial)
            with self._progress_bar() as bar:
                task = bar.add_task("compressing", total=handle.count, completed=partial.layers_done) if bar else None
                for i in range(partial.layers_done, handle.count):
                    inputs = self._compress_layer(i, meta_layers, handle, inputs, partial, progress)
                    if bar is not None:
                        bar.advance(task)
                    if on_layer is not None:
                        on_layer(i, handle.count)
            head_specs = self._compress_head(skeleton, handle, partial, progress)
            summaries = {p.name: s for p in self.passes if (s := p.end_model(info)) is not None}
            result = self._write(output, overwrite, shard_bytes, partial, progress, head_specs, summaries, t_start)
        except BaseException:
            partial.close()
            raise
        partial.remove()
        return result

    def _build_meta_model(self) -> tuple[nn.Module, LayerHandle]:
        """The whole model on the meta device, built once: no memory, every shape known."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                     trust_remote_code=self.trust_remote_code)
        return model, find_decoder_layers(model, _layer_count(self.config))

    @staticmethod
    def _detach_layers(meta: nn.Module, handle: LayerHandle) -> list[nn.Module]:
        """Take the decoder layers out of the model (they are materialised one at a time later)."""
        layers = meta.get_submodule(handle.prefix)
        detached = list(layers)
        for i in range(len(layers)):
            layers[i] = nn.Identity()
        return detached

    def _model_info(self, meta_layers: list[nn.Module], handle: LayerHandle) -> ModelInfo:
        shapes = {}
        for i, layer in enumerate(meta_layers):
            for name, module in compressible_modules(layer, f"{handle.prefix}.{i}").items():
                shapes[name] = (module.out_features, module.in_features)
        return ModelInfo(self.source, self.model_dir, self.config, self.dtype, handle.prefix, handle.count, shapes,
                         self.weights, self.trust_remote_code, self._calibration_batches)

    def _check_targets(self, info: ModelInfo) -> None:
        """A pass whose targets select no module at all is a recipe error, reported before any work."""
        example = next(iter(info.module_shapes), "model.layers.0.mlp.up_proj")
        for i, p in enumerate(self.passes):
            names = list(info.module_shapes) + (["lm_head"] if p.config.lm_head else [])
            if not any(p.selects(n) for n in names):
                raise RecipeError(
                    f"recipe passes[{i}] ({p.name}): targets {p.config.targets} (ignore {p.config.ignore}) select no "
                    f"module; names look like {example!r}"
                )

    def _fingerprint(self) -> dict[str, Any]:
        """What must match for ``--resume`` to continue a run."""
        from llmcomp import __version__

        override = self.calibration_override
        return {
            "source": self.source.location,
            "recipe": self.recipe.to_yaml(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "calibration_text_sha256": None if override is None else hashlib.sha256(override.encode()).hexdigest(),
            "llmcomp_version": __version__,
        }

    def _begin(self, partial: PartialRun, info: ModelInfo) -> dict[str, Any]:
        """Model-level start hooks, or, on resume, the passes' saved state and the progress so far."""
        if partial.resumed:
            progress = partial.progress
            for p, state in zip(self.passes, progress["pass_states"], strict=True):
                p.load_state_dict(state)
            self._calibration_info = progress.get("calibration")
            return progress
        for p in self.passes:
            p.begin_model(info)
        return {"module_specs": {}, "module_reports": {}, "layer_seconds": [], "original_bytes": 0,
                "pass_states": [p.state_dict() for p in self.passes], "calibration": None}

    def _materialize_skeleton(self, meta: nn.Module) -> nn.Module:
        """Embeddings, rotary tables, final norm and head, filled from the checkpoint."""
        skeleton = meta.to_empty(device="cpu")
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
        return skeleton.eval()

    # -- calibration ---------------------------------------------------------------------------
    def _calibration_batches(self) -> torch.Tensor:
        """Token windows for calibration, tokenized once (first-layer capture and model-level hooks)."""
        if self._calibration_ids is None:
            cal = self.recipe.calibration
            text, where = calibration_text(cal.data_file, self.calibration_override, cal.dataset)
            tokenizer = load_tokenizer(ModelSource("dir", str(self.model_dir)), self.trust_remote_code)
            context = context_length(self.config)
            seq_len = min(cal.seq_len, context) if context else cal.seq_len  # windows the model can attend over
            self._calibration_ids = calibration_batches(tokenizer, text, cal.num_samples, seq_len, cal.seed)
            self._calibration_info = {"source": where, "samples": cal.num_samples, "seq_len": seq_len,
                                      "dtype": str(self.calibration_dtype).removeprefix("torch.")}
            if seq_len < cal.seq_len:
                self._calibration_info["seq_len_capped_from"] = cal.seq_len
        return self._calibration_ids

    def _first_layer_inputs(self, skeleton: nn.Module, handle: LayerHandle, partial: PartialRun) -> Inputs | None:
        if not self.needs.calibration:
            return None
        if partial.resumed:
            return partial.load_inputs()
        ids = self._calibration_batches()
        catcher = _Catcher()
        layers = skeleton.get_submodule(handle.prefix)
        original = layers[0]
        layers[0] = catcher
        try:
            with torch.inference_mode():
                for start in range(0, ids.shape[0], CALIBRATION_BATCH):
                    try:
                        skeleton(input_ids=ids[start : start + CALIBRATION_BATCH], use_cache=False)
                    except StopForward:
                        pass
        finally:
            layers[0] = original
        return [(_float_tensors_to(h, self.calibration_dtype), _float_tensors_to(kw, self.calibration_dtype))
                for h, kw in catcher.captured]

    def _calibration_layer(self, layer: nn.Module) -> nn.Module:
        """The layer as calibration runs it: itself, or a float32 copy when it is a reduced float."""
        if self.calibration_dtype == self.dtype:
            return layer
        return copy.deepcopy(layer).to(self.calibration_dtype)

    @staticmethod
    def _run_layer(layer: nn.Module, inputs: Inputs, before_batch: Callable[[], None] | None = None
                   ) -> list[torch.Tensor]:
        outs = []
        with torch.inference_mode():
            for hidden, kwargs in inputs:
                if before_batch is not None:
                    before_batch()
                try:
                    out = layer(hidden, **kwargs)
                except StopForward:
                    continue
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def _observe(self, layer: nn.Module, prefix: str, names: list[str], inputs: Inputs, needs: Needs,
                 one_group: bool = False) -> InputObserver:
        """Input statistics of ``names`` from a calibration forward of the layer as it is now."""
        calib = self._calibration_layer(layer)
        modules = {n: calib.get_submodule(child_name(n, prefix)) for n in names}
        observer = InputObserver(modules, hessian=needs.hessian, quantiles=needs.quantiles, one_group=one_group)
        with observer:
            self._run_layer(calib, inputs, before_batch=observer.new_batch)
        return observer

    # -- one layer -----------------------------------------------------------------------------
    def _build_layer(self, meta_layers: list[nn.Module], prefix: str, index: int) -> nn.Module:
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

    def _apply_pass(self, p: CompressionPass, layer: nn.Module, prefix: str, states: dict[str, ModuleState],
                    inputs: Inputs | None) -> None:
        targets = p.select_targets(compressible_modules(layer, prefix), states)
        if not targets:
            return
        needs = p.needs()
        if not needs.calibration:
            p.process_layer(LayerWork(layer, prefix, targets, states, None))
            return
        assert inputs is not None
        observer = self._observe(layer, prefix, list(targets), inputs, needs)
        if not needs.sequential:
            p.process_layer(LayerWork(layer, prefix, targets, states, observer.stats()))
            return
        for k, group in enumerate(observer.groups):  # forward order: q/k/v, o, gate/up, down
            names = list(group.modules)
            if k > 0:  # earlier groups are compressed now: their outputs changed this group's input
                group = self._observe(layer, prefix, names, inputs, needs, one_group=True).groups[0]
            current = {n: layer.get_submodule(child_name(n, prefix)) for n in names}
            p.process_layer(LayerWork(layer, prefix, current, states, dict.fromkeys(names, group)))

    def _compress_layer(self, index: int, meta_layers: list[nn.Module], handle: LayerHandle, inputs: Inputs | None,
                        partial: PartialRun, progress: dict[str, Any]) -> Inputs | None:
        t0 = time.perf_counter()
        prefix = f"{handle.prefix}.{index}"
        layer = self._build_layer(meta_layers, handle.prefix, index)
        original_bytes = _bytes(layer.state_dict().values())
        states = {n: ModuleState(n, (m.out_features, m.in_features))
                  for n, m in compressible_modules(layer, prefix).items()}
        for p in self.passes:
            self._apply_pass(p, layer, prefix, states, inputs)
        next_inputs = None
        if inputs is not None and index + 1 < handle.count:
            outs = self._run_layer(self._calibration_layer(layer), inputs)
            next_inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs, strict=True)]
        for name, module in compressible_modules(layer, prefix).items():
            if callable(getattr(module, "spec", None)):
                progress["module_specs"][name] = module.spec().model_dump(mode="json")
            if states[name].passes:
                progress["module_reports"][name] = states[name].summary()
        tensors = {f"{prefix}.{n}": t for n, t in layer.state_dict().items()}
        del layer
        _release_freed_memory()
        progress["original_bytes"] += original_bytes
        progress["layer_seconds"].append(round(time.perf_counter() - t0, 4))
        progress["pass_states"] = [p.state_dict() for p in self.passes]
        progress["calibration"] = self._calibration_info
        partial.record_layer(index, handle.count, tensors, next_inputs, progress)
        return next_inputs

    # -- the head and the rest -----------------------------------------------------------------
    def _compress_head(self, skeleton: nn.Module, handle: LayerHandle, partial: PartialRun,
                       progress: dict[str, Any]) -> dict[str, Any]:
        """Dense tensors outside the decoder layers, and the output head compressed by the passes
        configured with ``lm_head: true``.

        The head gets no calibration statistics (it would need the final norm's outputs), so only
        passes that work without them may compress it. A head tied to the input embedding is
        compressed from a copy: the embedding stays dense and the checkpoint is saved untied.
        """
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        dense = {n: t for n, t in skeleton.state_dict().items()
                 if not n.startswith(handle.prefix + ".") and not (tied and n.startswith("lm_head."))}
        progress["original_bytes"] += _bytes(dense.values())  # a tied head counts once, as the embedding
        passes = [p for p in self.passes if p.config.lm_head]
        specs: dict[str, Any] = {}
        if passes:
            name, holder = self._head_copy(skeleton)
            dense = {n: t for n, t in dense.items() if not n.startswith(name + ".")}
            states = {name: ModuleState(name, tuple(holder.get_submodule(name).weight.shape))}
            for p in passes:
                if p.needs().calibration and not p.calibration_optional:
                    raise LlmcompError(
                        f"pass {p.name!r} needs calibration statistics, which the output head does not get; "
                        "remove lm_head: true from it"
                    )
                targets = p.select_targets(compressible_modules(holder, ""), states)
                if targets:
                    p.process_layer(LayerWork(holder, "", targets, states, None))
            if not states[name].passes:
                raise LlmcompError(f"lm_head: true, but no pass targets select {name!r} (check targets/ignore)")
            module = holder.get_submodule(name)
            if callable(getattr(module, "spec", None)):
                specs[name] = module.spec().model_dump(mode="json")
            progress["module_reports"][name] = states[name].summary()
            dense.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        partial.record_head(dense)
        return specs

    @staticmethod
    def _head_copy(skeleton: nn.Module) -> tuple[str, nn.Module]:
        head = skeleton.get_output_embeddings()
        name = next((n for n, m in skeleton.named_modules() if m is head), None)
        if name is None or type(head) is not nn.Linear:
            raise LlmcompError(f"lm_head: true, but the output head is a {type(head).__name__}, not a linear layer")
        holder = nn.Module()
        copy_ = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=head.weight.dtype)
        with torch.no_grad():
            copy_.weight.copy_(head.weight)
            if head.bias is not None:
                copy_.bias.copy_(head.bias)
        _set_nested(holder, name, copy_)
        return name, holder

    def _write(self, output: Path, overwrite: bool, shard_bytes: int | None, partial: PartialRun,
               progress: dict[str, Any], head_specs: dict[str, Any], summaries: dict[str, Any], t_start: float
               ) -> CompressionResult:
        specs = {n: parse_module_spec(n, s) for n, s in {**progress["module_specs"], **head_specs}.items()}
        config = self.config.to_dict()
        if head_specs:
            _untie_word_embeddings(config)
        config.setdefault("dtype", str(self.dtype).removeprefix("torch."))
        report = self._report(progress, summaries, partial.resumed, t_start)

        def side_files(tensor_bytes: int) -> dict[str, str]:
            report["compressed_bytes"] = tensor_bytes
            report["compression_ratio"] = report["original_bytes"] / max(tensor_bytes, 1)
            report["total_seconds"] = round(time.perf_counter() - t_start, 3)
            return {RECIPE_FILE: self.recipe.to_yaml(), REPORT_FILE: _json(report)}

        with AtomicDirectory(output, overwrite) as stage:
            write_checkpoint(stage.path, partial.tensor_files(), config, specs, side_files,
                             shard_bytes or DEFAULT_SHARD_BYTES, copy_from=self.model_dir, recipe=self.recipe.name)
            stage.commit()
        return CompressionResult(output, report)

    def _report(self, progress: dict[str, Any], summaries: dict[str, Any], resumed: bool, t_start: float
                ) -> dict[str, Any]:
        modules = progress["module_reports"]
        bpw = [(m["bits_per_weight"], m.get("numel", 0)) for m in modules.values() if "bits_per_weight" in m]
        total_n = sum(n for _, n in bpw)
        return {
            "recipe": self.recipe.name,
            "source": self.source.location,
            "dtype": str(self.dtype).removeprefix("torch."),
            "calibration": progress.get("calibration"),
            "modules": modules,
            "passes": summaries,
            "average_bits_per_weight": (sum(b * n for b, n in bpw) / total_n) if total_n else None,
            "layer_seconds": progress["layer_seconds"],
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "resumed": resumed,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "original_bytes": progress["original_bytes"],
        }

    def _progress_bar(self):
        from contextlib import nullcontext

        if not self.progress:
            return nullcontext(None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("layers"), TimeElapsedColumn(), transient=False)


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
             calibration_text: str | None = None, resume: bool = False,
             resume_hint: str = "llmcomp compress ... --resume") -> CompressionResult:
    """Compress ``source`` with ``recipe`` into an llmcomp checkpoint at ``output_dir``."""
    pipe = Pipeline(source, recipe, dtype=dtype, trust_remote_code=trust_remote_code, progress=progress,
                    calibration_text=calibration_text)
    return pipe.run(output_dir, overwrite=overwrite, shard_bytes=shard_bytes, resume=resume, resume_hint=resume_hint)
