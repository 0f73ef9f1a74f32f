"""Evaluation text for perplexity: hub corpora, local files, and the offline license texts.

Corpora follow the GPTQ/SparseGPT evaluation code so numbers compare with published ones:

- ``wikitext2``: wikitext-2-raw-v1 *test* split, rows joined with ``"\\n\\n"``.
- ``c4``: the first validation shard of allenai/c4 (en), its first 1100 documents joined with
  ``" "``, truncated to 256 windows of ``seq_len`` tokens.
- ``offline``: license texts from /usr/share/common-licenses (disjoint from calibration text);
  not a standard benchmark, useful only to compare models with each other offline.

``--data-file`` replaces the hub download with a local copy (.txt, .jsonl/.json[.gz] with a
``text`` field, .parquet with a ``text`` column); the same joining rules apply to its rows.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from llmcomp.errors import LlmcompError

C4_DOCS = 1100
C4_WINDOWS = 256
HUB_PROBE_TIMEOUT_S = 3.0
DEFAULT_HUB = "https://huggingface.co"


@dataclass(frozen=True)
class CorpusSpec:
    """Where a perplexity corpus comes from on the hub and how its rows are joined."""

    name: str
    hub_path: str
    hub_config: str | None
    split: str
    separator: str
    max_docs: int | None = None
    max_windows: int | None = None
    hub_kwargs: tuple[tuple[str, str], ...] = ()
    description: str = ""


CORPORA: dict[str, CorpusSpec] = {
    "wikitext2": CorpusSpec(
        "wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", "\n\n",
        description="wikitext-2-raw-v1 test, token-level perplexity (GPTQ protocol)",
    ),
    "c4": CorpusSpec(
        "c4", "allenai/c4", None, "validation", " ", max_docs=C4_DOCS, max_windows=C4_WINDOWS,
        hub_kwargs=(("data_files", "en/c4-validation.00000-of-00008.json.gz"),),
        description=f"c4 en validation shard 0, first {C4_DOCS} docs, {C4_WINDOWS} windows (GPTQ protocol)",
    ),
}
OFFLINE_SOURCE = "offline"
PERPLEXITY_SOURCES = (*CORPORA, OFFLINE_SOURCE)
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


@dataclass(frozen=True)
class EvalText:
    """A ready-to-score corpus: the joined text, a label for reports, and a token cap."""

    text: str
    label: str
    max_windows: int | None = None


def hub_offline() -> bool:
    """True when the user told the HF libraries not to touch the network."""
    flags = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Cheap TCP probe of the hub, so an offline machine fails at once instead of after retries."""
    if hub_offline():
        return False
    return _probe_hub(os.environ.get("HF_ENDPOINT", DEFAULT_HUB), timeout)


@functools.lru_cache(maxsize=8)
def _probe_hub(endpoint: str, timeout: float) -> bool:
    """One probe per endpoint and process: several models/tasks ask the same question."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def missing_corpus_hint(name: str) -> str:
    return (
        f"cannot download the {name} corpus (the hub is unreachable or offline mode is on): "
        f"pass --data-file FILE with a local copy (.txt, .jsonl with a 'text' field, or .parquet with "
        f"a 'text' column), or use --tasks {OFFLINE_SOURCE} for the offline license-text corpus"
    )


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(TEXT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_text_rows(path: str | Path) -> list[str]:
    """Rows of a local corpus file; a .txt file is one row (its whole content)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LlmcompError(f"--data-file {path} does not exist")
    suffix = _suffix(path)
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        return _read_json_rows(path, suffix.endswith(".gz"))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise LlmcompError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
        return [t if t is not None else "" for t in table.column("text").to_pylist()]
    raise LlmcompError(f"unsupported --data-file type {path.name!r}; use one of {', '.join(TEXT_SUFFIXES)}")


def _read_json_rows(path: Path, compressed: bool) -> list[str]:
    opener = gzip.open if compressed else open
    with opener(path, "rt", encoding="utf-8") as fh:
        head = fh.read(1)
        fh.seek(0)
        if head == "[":  # a JSON array of records
            records = json.load(fh)
        else:
            records = [json.loads(line) for line in fh if line.strip()]
    rows = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or "text" not in record:
            raise LlmcompError(f"{path}: record {number} has no 'text' field")
        rows.append(str(record["text"]))
    return rows


def hub_rows(spec: CorpusSpec) -> list[str]:
    if not hub_offline() and not hub_reachable():
        raise LlmcompError(missing_corpus_hint(spec.name))
    import datasets

    kwargs = dict(spec.hub_kwargs)
    if "data_files" in kwargs:
        kwargs["data_files"] = {spec.split: kwargs["data_files"]}
    try:
        dataset = datasets.load_dataset(spec.hub_path, spec.hub_config, split=spec.split, **kwargs)
    except (ConnectionError, OSError, ValueError) as exc:
        raise LlmcompError(missing_corpus_hint(spec.name)) from exc
    return list(dataset["text"])


def load_eval_text(source: str, data_file: str | Path | None = None) -> EvalText:
    """The corpus for perplexity task ``source`` (``wikitext2``, ``c4`` or ``offline``)."""
    if source == OFFLINE_SOURCE:
        from llmcomp.calibration import offline_evaluation_text

        text, description = offline_evaluation_text()
        return EvalText(text, f"offline: {description}; not a standard benchmark")
    if source not in CORPORA:
        raise LlmcompError(f"unknown perplexity corpus {source!r}; allowed: {', '.join(PERPLEXITY_SOURCES)}")
    spec = CORPORA[source]
    if data_file is not None:
        rows, origin = read_text_rows(data_file), f"local file {data_file}"
    else:
        rows, origin = hub_rows(spec), f"hub {spec.hub_path}"
    if spec.max_docs is not None:
        rows = rows[: spec.max_docs]
    return EvalText(spec.separator.join(rows), f"{spec.description}; from {origin}", spec.max_windows)
