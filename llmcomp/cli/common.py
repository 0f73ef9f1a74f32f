"""Shared CLI helpers: one-line errors instead of tracebacks, consoles, option parsing."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from llmcomp.errors import LlmcompError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn expected failures into ``error: <one line>`` and exit code 2.

    Set ``LLMCOMP_DEBUG=1`` to see the full traceback instead.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (LlmcompError, FileNotFoundError, ValueError) as exc:
            if os.environ.get("LLMCOMP_DEBUG"):
                raise
            message = " ".join(str(exc).split()) or type(exc).__name__
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def run_cli(app: typer.Typer) -> int:
    try:
        app()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# --kernel on `serve` and `bench`: one option, one validation.
KERNEL_OPTION = typer.Option(
    None, help="force kernels by name, comma-separated, first that fits each layer (sets LLMCOMP_KERNEL), e.g. "
               "cpu_w4a8,cpu_int8pack: int4 layers with int8 activations, faster batched CPU decode "
               "(docs/KERNELS.md)")


def force_kernels(names: str) -> None:
    """Validate kernel names and set ``LLMCOMP_KERNEL`` for this process and its children."""
    from llmcomp.kernels.dispatch import check_kernel_names

    try:
        os.environ["LLMCOMP_KERNEL"] = check_kernel_names(names)
    except ValueError as exc:
        raise LlmcompError(f"--kernel: {exc}") from None
