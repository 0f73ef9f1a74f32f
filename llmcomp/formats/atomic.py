"""Write a directory atomically: build it beside its final name, then swap it into place.

Used by ``llmcomp compress`` (checkpoints) and ``llmcomp export`` alike. Readers never see a
half-written directory: until :meth:`AtomicDirectory.commit`, the output name holds either
nothing or the previous version, untouched. On commit every file is fsynced, the previous
version is moved aside, the new one renamed into place, and only then is the old one deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from llmcomp.errors import CheckpointError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def write_file_atomic(path: Path, content: str | bytes) -> None:
    """Replace ``path`` in one step (temp file, fsync, rename): never a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AtomicDirectory:
    """``with AtomicDirectory(out, overwrite) as stage: ...; stage.commit()``.

    Files go into ``stage.path`` (``OUT.tmp-<pid>``). Leaving the block without ``commit()``
    (an exception, Ctrl-C) removes the staging directory and leaves ``OUT`` as it was.
    """

    def __init__(self, output: str | Path, overwrite: bool = False) -> None:
        self.output = Path(output)
        if self.output.exists() and not overwrite:
            raise CheckpointError(f"{self.output} already exists; pass --overwrite to replace it")
        if self.output.exists() and not self.output.is_dir():
            raise CheckpointError(f"{self.output} exists and is not a directory")
        self.path = self.output.with_name(f"{self.output.name}.tmp-{os.getpid()}")
        self.committed = False

    def __enter__(self) -> AtomicDirectory:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        fsync_tree(self.path)
        old = None
        if self.output.exists():
            old = self.output.with_name(f"{self.output.name}.old-{os.getpid()}")
            os.replace(self.output, old)
        os.replace(self.path, self.output)
        fsync_dir(self.output.parent)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output
