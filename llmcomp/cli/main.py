"""Entry point of the ``llmcomp`` command: builds the typer app from the command modules.

Each module in ``COMMAND_MODULES`` exposes ``register(app)``. A command is listed only once its
module exists and works: no placeholders.
"""

from __future__ import annotations

import importlib
import sys

import typer

from llmcomp.cli.common import run_cli

COMMAND_MODULES = [
    "llmcomp.cli.compress_cmd",
    "llmcomp.cli.inspect_cmd",
    "llmcomp.cli.demo_cmd",
    "llmcomp.cli.eval_cmd",
    "llmcomp.cli.serve_cmd",
    "llmcomp.cli.export_cmd",
    "llmcomp.cli.bench_cmd",
    "llmcomp.cli.heal_cmd",
    "llmcomp.cli.profile_cmd",
    "llmcomp.cli.route_cmd",
]

app = typer.Typer(
    name="llmcomp",
    help="Compress, evaluate and serve Hugging Face causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:  # pragma: no cover - thin wrapper used by `python -m llmcomp`
    sys.exit(run_cli(app))
