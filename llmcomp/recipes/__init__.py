"""Recipes: an ordered list of passes plus calibration settings, written in YAML.

A recipe is selected by built-in name (``finequant-w4``) or by path to a YAML file. Validation is
strict: unknown keys, unknown pass types and bad values fail with one line naming the key and the
allowed values.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from llmcomp.errors import RecipeError
from llmcomp.passes.base import CompressionPass, PassConfig, pass_registry


class CalibrationConfig(BaseModel):
    """Where calibration text comes from and how much of it; used only if a pass needs it."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(32, gt=0, description="number of token windows")
    seq_len: int = Field(512, gt=0, description="tokens per window")
    data_file: str | None = Field(None, description="plain-text file; default: offline English text")
    dataset: Literal["c4", "wikitext2"] | None = Field(
        None, description="a hub corpus's *train* split instead (c4: en train shard 0; wikitext2: wikitext-2-raw-v1 "
                          "train); needs the network; never an evaluation split")
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        if self.dataset is not None and self.data_file is not None:
            raise ValueError("give calibration.data_file or calibration.dataset, not both")
        return self


class PassEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    passes: list[PassEntry] = Field(min_length=1)
    _built: list[CompressionPass] | None = PrivateAttr(default=None)

    def build_passes(self) -> list[CompressionPass]:
        """The configured pass objects, built (and validated) once per recipe."""
        if self._built is None:
            self._built = [_build_pass(i, entry) for i, entry in enumerate(self.passes)]
        return self._built

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(where: str, exc: ValidationError, model: type[BaseModel]) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown key {loc!r}; allowed keys: {allowed}"
    if err["type"] == "missing":
        return f"{where}: missing required key {loc!r}"
    return f"{where}: {loc}: {err['msg']} (got {err.get('input')!r})"


def _build_pass(index: int, entry: PassEntry) -> CompressionPass:
    registry = pass_registry()
    where = f"recipe passes[{index}]"
    if entry.type not in registry:
        raise RecipeError(f"{where}: unknown pass type {entry.type!r}; allowed: {', '.join(sorted(registry))}")
    cls = registry[entry.type]
    fields = entry.model_dump(exclude={"type"})
    try:
        config: PassConfig = cls.Config.model_validate(fields)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(f"{where} ({entry.type})", exc, cls.Config)) from None
    for pattern, override in config.overrides.items():
        try:
            cls.Config.model_validate({**fields, **override, "overrides": {}})
        except ValidationError as exc:
            raise RecipeError(
                _format_validation_error(f"{where} ({entry.type}) overrides[{pattern!r}]", exc, cls.Config)
            ) from None
    return cls(config)


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names -> their one-line descriptions."""
    out = {}
    for item in sorted(resources.files("llmcomp.recipes").joinpath("builtin").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".yaml"):
            data = yaml.safe_load(item.read_text()) or {}
            out[item.name[: -len(".yaml")]] = str(data.get("description", ""))
    return out


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with a 'passes' list, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(where, exc, Recipe)) from None
    recipe.build_passes()  # validate every pass config now, not halfway through a model
    return recipe


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        text, where = path.read_text(), str(path)
    else:
        builtin = resources.files("llmcomp.recipes").joinpath("builtin", f"{name_or_path}.yaml")
        if not builtin.is_file():
            raise RecipeError(
                f"unknown recipe {name_or_path!r}: not a file, and not a built-in recipe "
                f"({', '.join(builtin_recipes())})"
            )
        text, where = builtin.read_text(), f"built-in recipe {name_or_path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: invalid YAML ({' '.join(str(exc).split())})") from None
    return recipe_from_dict(data, where)
