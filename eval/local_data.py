"""Find a harness task's local data files under ``--data-dir`` and check their columns.

Accepted layouts, for task ``sst2`` (``mnli`` uses ``validation_matched``/``validation_mismatched``):

    DIR/sst2/validation.jsonl | .json | .parquet | .tsv | .csv
    DIR/sst2/validation-00000-of-00001.parquet        (the hub's own parquet layout)

An optional ``train`` file of the same format next to it becomes the few-shot pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmcomp.errors import LlmcompError
from llmcomp.eval.tasks import TaskSpec

# suffix -> datasets' packaged builder name
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".tsv": "csv", ".csv": "csv"}
TSV_OPTIONS = {"delimiter": "\t", "quoting": 3}  # csv.QUOTE_NONE: GLUE's tsv files hold bare quotes


@dataclass(frozen=True)
class LocalSplit:
    """The files of one split, all of one format."""

    files: tuple[Path, ...]
    builder: str
    suffix: str

    def builder_kwargs(self) -> dict:
        return dict(TSV_OPTIONS) if self.suffix == ".tsv" else {}


def _find_split(folder: Path, stem: str) -> LocalSplit | None:
    for suffix, builder in BUILDERS.items():
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return LocalSplit((path,), builder, suffix)
    shards = sorted(folder.glob(f"{stem}-*.parquet"))
    if shards:
        return LocalSplit(tuple(shards), "parquet", ".parquet")
    return None


def expected_layout(spec: TaskSpec, data_dir: Path | str = "DIR") -> str:
    subdir, stem = spec.local_files[0]
    return f"{Path(data_dir) / subdir / stem}.jsonl (or .parquet/.tsv/.csv, or {stem}-*.parquet)"


def find_local_split(spec: TaskSpec, data_dir: Path) -> tuple[LocalSplit, LocalSplit | None]:
    """(evaluation split, optional train split of the same format) for ``spec`` under ``data_dir``."""
    if not data_dir.is_dir():
        raise LlmcompError(f"--data-dir {data_dir} is not a directory")
    for subdir, stem in spec.local_files:
        split = _find_split(data_dir / subdir, stem)
        if split is not None:
            train = _find_split(data_dir / subdir, "train")
            if train is not None and train.builder != split.builder:
                train = None
            check_columns(spec, split)
            return split, train
    raise LlmcompError(
        f"no local data for task {spec.name}: expected {expected_layout(spec, data_dir)} "
        f"with columns {','.join(spec.columns)}"
    )


def read_columns(path: Path, suffix: str) -> list[str]:
    """Column names of a local data file, read from its header / first record only."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with path.open(encoding="utf-8") as fh:
        if suffix in (".tsv", ".csv"):
            return [c.strip() for c in fh.readline().rstrip("\r\n").split("\t" if suffix == ".tsv" else ",")]
        head = fh.read(1)
        fh.seek(0)
        first = json.load(fh)[0] if head == "[" else json.loads(fh.readline())
    return list(first) if isinstance(first, dict) else []


def check_columns(spec: TaskSpec, split: LocalSplit) -> None:
    for path in split.files:
        missing = [c for c in spec.columns if c not in read_columns(path, split.suffix)]
        if missing:
            raise LlmcompError(f"{path} lacks column(s) {','.join(missing)} needed by task {spec.name}")
