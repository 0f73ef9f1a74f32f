"""``llmcomp export``: convert an llmcomp checkpoint into a format other engines load as is."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from llmcomp.cli.common import console, user_errors


class ExportFormat(str, Enum):
    compressed_tensors = "compressed-tensors"


@user_errors
def export(
    checkpoint: Path = typer.Argument(..., help="llmcomp checkpoint directory (from `llmcomp compress`)"),
    fmt: ExportFormat = typer.Option(ExportFormat.compressed_tensors, "--format", "-f", help="target format"),
    output: Path = typer.Option(..., "--output", "-o", help="output directory"),
    overwrite: bool = typer.Option(False, help="replace OUTPUT if it exists"),
) -> None:
    """Export int4/int8 weight-only checkpoints to compressed-tensors `pack-quantized`, the format
    stock vLLM and transformers (with the compressed-tensors package) read without llmcomp. Schemes the
    format cannot express (int2/3, group sizes that do not divide the input dimension, sparse or
    factorized modules) are refused with the reason."""
    from llmcomp.formats.compressed_tensors import export_compressed_tensors

    summary = export_compressed_tensors(checkpoint, output, overwrite=overwrite)
    groups = ", ".join(f"{k}: {len(v)} modules" for k, v in summary.schemes.items())
    console.print(
        f"exported {checkpoint} -> {summary.output_dir} ({fmt.value}, {summary.bytes / 1e6:.1f} MB; {groups})"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
