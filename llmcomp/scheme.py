"""The one versioned scheme spec: what ``quantization_config`` in an llmcomp config.json says.

Every consumer reads a checkpoint through this module: the module registry (which class runs a
module), ``validate_checkpoint``, kernel dispatch (through the module's layout), the vLLM plugin
and the exporters. A module spec is a pydantic model whose ``kind`` field selects it (a
discriminated union): ``int_affine`` today; the sparse, codebook, factorized and
activation-sparse kinds register themselves with :func:`register_spec` when they land.

Versions: 2 (current) writes ``kind``; version 1 checkpoints (``"type": "quant_linear"``) are
upgraded on read, so they keep loading. Anything else (unknown version or kind, a bad field) is
one :class:`~llmcomp.errors.CheckpointError` naming the module and the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from llmcomp.errors import CheckpointError

QUANT_METHOD = "llmcomp"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SUPPORTED_BITS = (2, 3, 4, 8)
# Projections that inference engines (vLLM, our own runtime) fuse into one matmul, so they must
# share one layout: fused name -> the HF child names behind it.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_V1_TYPES = {"quant_linear": "int_affine"}


class ModuleSpec(BaseModel):
    """Fields every compressed linear module has. Subclasses add a ``kind`` literal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    bias: bool = False


class IntAffineSpec(ModuleSpec):
    """Weight-only integer quantization, ``W = (q - z) * s`` per group of input columns
    (FineQuant, RTN, the budgeted auto-recipe). Layout: docs/FORMAT.md and ``llmcomp.intquant``."""

    kind: Literal["int_affine"] = "int_affine"
    bits: Literal[2, 3, 4, 8]
    group_size: int = Field(gt=0, description="effective group length along K (in_features = per channel)")
    symmetric: bool

    @model_validator(mode="after")
    def _group_fits(self) -> IntAffineSpec:
        if self.group_size > self.in_features:
            raise ValueError(f"group_size {self.group_size} exceeds in_features {self.in_features}")
        return self


_SPECS: dict[str, type[ModuleSpec]] = {}
_ADAPTER: TypeAdapter | None = None


def register_spec(cls: type[ModuleSpec]) -> type[ModuleSpec]:
    """Add a module kind (class decorator); the ``kind`` literal's value is its name."""
    global _ADAPTER
    kind = cls.model_fields["kind"].default
    if not isinstance(kind, str) or kind in _SPECS:
        raise ValueError(f"module kind {kind!r} is invalid or already registered")
    _SPECS[kind] = cls
    _ADAPTER = None
    return cls


register_spec(IntAffineSpec)


def spec_kinds() -> list[str]:
    return sorted(_SPECS)


def _adapter() -> TypeAdapter:
    """A discriminated union over the registered kinds, rebuilt when a kind registers."""
    global _ADAPTER
    if _ADAPTER is None:
        members = tuple(_SPECS.values())
        annotation = members[0] if len(members) == 1 else Annotated[Union[members], Field(discriminator="kind")]  # noqa: UP007
        _ADAPTER = TypeAdapter(annotation)
    return _ADAPTER


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in _SPECS)
    if err["type"] == "extra_forbidden":
        return f"unknown field {loc!r}"
    if err["type"] == "missing":
        return f"missing field {loc!r}"
    return f"{loc + ': ' if loc else ''}{err['msg']} (got {err.get('input')!r})"


def upgrade_v1(spec: dict[str, Any]) -> dict[str, Any]:
    """A version-1 module spec (``type: quant_linear``) in version-2 form (``kind: int_affine``).

    Version 1 readers also took ``group_size`` -1 or >= in_features for per channel; version 2
    stores the effective group length.
    """
    out = {k: v for k, v in spec.items() if k != "type"}
    v1_type = spec.get("type")
    out["kind"] = _V1_TYPES.get(v1_type, v1_type) if isinstance(v1_type, str) else v1_type
    group, k = out.get("group_size"), out.get("in_features")
    if type(group) is int and type(k) is int and (group == -1 or group > k):
        out["group_size"] = k
    return out


def parse_module_spec(name: str, data: Any, version: int = FORMAT_VERSION) -> ModuleSpec:
    """Validate one entry of ``quantization_config.modules``; one-line error naming the module."""
    if not isinstance(data, dict):
        raise CheckpointError(f"config.json: module {name!r}: spec must be a mapping, got {type(data).__name__}")
    if version == 1:
        data = upgrade_v1(data)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in _SPECS:
        raise CheckpointError(
            f"config.json: module {name!r} has unknown kind {kind!r}; this llmcomp knows: {', '.join(spec_kinds())}"
        )
    try:
        return _adapter().validate_python(data)
    except ValidationError as exc:
        raise CheckpointError(f"config.json: module {name!r} ({kind}): {_describe(exc)}") from None


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class QuantizationConfig(BaseModel):
    """The whole ``quantization_config`` of a checkpoint, validated and upgraded to version 2."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    quant_method: Literal["llmcomp"] = QUANT_METHOD
    format_version: int = FORMAT_VERSION
    llmcomp_version: str | None = None
    recipe: str | None = None
    modules: dict[str, ModuleSpec] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True)
        data["modules"] = {n: s.model_dump(mode="json") for n, s in self.modules.items()}
        return data


def parse_quantization_config(data: Any, where: str = "config.json") -> QuantizationConfig:
    """Validate a ``quantization_config`` (version 1 or 2); one-line :class:`CheckpointError` otherwise."""
    if data is None:
        raise CheckpointError(f"{where}: quantization_config.quant_method is not {QUANT_METHOD!r} "
                              "(no quantization_config: not an llmcomp checkpoint)")
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: quantization_config must be a mapping")
    if data.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method is not {QUANT_METHOD!r}")
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: unsupported quantization_config.format_version {version!r} "
            f"(this llmcomp reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    modules = data.get("modules")
    if not isinstance(modules, dict):
        raise CheckpointError(f"{where}: quantization_config.modules is missing or not a mapping")
    parsed = {}
    for name, spec in modules.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}: module names must be non-empty strings, got {name!r}")
        parsed[name] = parse_module_spec(name, spec, version)
    files = data.get("files", {})
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: quantization_config.files must be a mapping")
    try:
        entries = {str(f): FileEntry.model_validate(meta) for f, meta in files.items()}
    except ValidationError as exc:
        raise CheckpointError(f"{where}: quantization_config.files: {_describe(exc)}") from None
    extra = {k: v for k, v in data.items() if k not in ("modules", "files", "format_version", "quant_method")}
    for key in ("llmcomp_version", "recipe"):
        if key in extra and extra[key] is not None and not isinstance(extra[key], str):
            raise CheckpointError(f"{where}: quantization_config.{key} must be a string")
    return QuantizationConfig(format_version=FORMAT_VERSION, modules=parsed, files=entries, **extra)


def fused_key(name: str) -> str:
    """The engine-fused layer a module belongs to (``...self_attn.qkv_proj`` for ``q_proj``), or itself."""
    parent, _, child = name.rpartition(".")
    for fused, members in FUSED_PROJECTIONS.items():
        if child in members:
            return f"{parent}.{fused}" if parent else fused
    return name
