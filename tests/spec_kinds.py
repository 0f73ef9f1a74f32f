"""A module kind that only tests know, standing in for kinds a consumer cannot run (yet)."""

from __future__ import annotations

from typing import Literal

from llmcomp.scheme import ModuleSpec, register_spec, spec_kinds

DUMMY_KIND = "test_only_kind"


class DummySpec(ModuleSpec):
    kind: Literal["test_only_kind"] = "test_only_kind"


if DUMMY_KIND not in spec_kinds():
    register_spec(DummySpec)
