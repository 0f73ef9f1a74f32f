"""The evaluation tasks ``llmcomp eval`` knows: names, metrics, and where their data lives.

Two families:

- ``perplexity``: token-level perplexity computed by :mod:`llmcomp.eval.perplexity` on one corpus
  (``wikitext2``, ``c4``, ``offline``).
- ``harness``: tasks run by lm-evaluation-harness on the model object (GLUE, and lm-eval's own
  ``wikitext``, whose *word* perplexity per document is a different metric from ``wikitext2``).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcomp.errors import LlmcompError

PERPLEXITY = "perplexity"
HARNESS = "harness"
GLUE_HUB = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its metrics (primary first), the columns its local files need, and file lookup.

    ``local_files`` lists ``(subdir, split_stem)`` candidates under ``--data-dir``, tried in order;
    ``split_key`` is the lm-eval config field the local split is bound to.
    """

    name: str
    kind: str
    metrics: tuple[str, ...]
    higher_is_better: bool
    description: str
    columns: tuple[str, ...] = ()
    local_files: tuple[tuple[str, str], ...] = ()
    split_key: str = "validation_split"

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


def _glue(name: str, columns: tuple[str, ...], metrics: tuple[str, ...] = ("acc",),
          local_files: tuple[tuple[str, str], ...] | None = None) -> TaskSpec:
    files = local_files or ((name, "validation"),)
    return TaskSpec(name, HARNESS, metrics, True, f"GLUE {name} (lm-eval, {GLUE_HUB} validation)",
                    (*columns, "label"), files)


TASKS: dict[str, TaskSpec] = {
    "wikitext2": TaskSpec("wikitext2", PERPLEXITY, ("perplexity",), False,
                          "token perplexity, wikitext-2-raw-v1 test (GPTQ protocol)"),
    "c4": TaskSpec("c4", PERPLEXITY, ("perplexity",), False,
                   "token perplexity, c4 en validation subset (GPTQ protocol)"),
    "offline": TaskSpec("offline", PERPLEXITY, ("perplexity",), False,
                        "token perplexity on offline license texts (not a standard benchmark)"),
    "sst2": _glue("sst2", ("sentence",)),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), ("acc", "f1")),
    "rte": _glue("rte", ("sentence1", "sentence2")),
    "cola": _glue("cola", ("sentence",), ("mcc",)),
    "qnli": _glue("qnli", ("question", "sentence")),
    "qqp": _glue("qqp", ("question1", "question2"), ("acc", "f1")),
    "mnli": _glue("mnli", ("premise", "hypothesis"),
                  local_files=(("mnli", "validation_matched"), ("mnli", "validation"))),
    "mnli_mismatch": _glue("mnli_mismatch", ("premise", "hypothesis"),
                           local_files=(("mnli_mismatch", "validation_mismatched"),
                                        ("mnli_mismatch", "validation"), ("mnli", "validation_mismatched"))),
    "wnli": _glue("wnli", ("sentence1", "sentence2")),
    "wikitext": TaskSpec(
        "wikitext", HARNESS, ("word_perplexity", "byte_perplexity", "bits_per_byte"), False,
        "lm-eval wikitext: WORD perplexity per document (rolling), not comparable to wikitext2",
        ("page",), (("wikitext", "test"),), "test_split",
    ),
}
GLUE_TASKS = tuple(name for name, spec in TASKS.items() if spec.kind == HARNESS and name != "wikitext")


def parse_tasks(text: str) -> list[TaskSpec]:
    """``"wikitext2,sst2"`` -> specs, in order, without duplicates; ``glue`` expands to all GLUE tasks."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        expanded = GLUE_TASKS if name == "glue" else (name,)
        for item in expanded:
            if item not in TASKS:
                raise LlmcompError(f"unknown task {raw.strip()!r}; allowed: {', '.join(TASKS)}, glue")
            if item not in names:
                names.append(item)
    if not names:
        raise LlmcompError(f"no task given; allowed: {', '.join(TASKS)}, glue")
    return [TASKS[n] for n in names]
