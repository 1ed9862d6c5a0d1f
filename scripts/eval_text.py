"""Score generated text against references with the COCO caption toolkit: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D
(and sacreBLEU-4 as an extra column).

    python scripts/eval_text.py --predictions checkpoints/mlp_head/predictions.json \
        checkpoints/refiner/predictions.json --by_task --output_json results.json

Each predictions file is what ``generate_text.py`` writes: a JSON list of
``{"id", "task", "prediction", "references": [...]}``. Several files are printed side by side as one
table (and per task with ``--by_task``, each task scored as its own corpus). The numbers are pycocoevalcap's
(see omniflow.metrics.text); without Java on PATH the columns say which are substitutes, not COCO numbers.
"""
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omniflow.metrics.text import DEFAULT_METRICS, METRICS, Captions, evaluate, format_table
from omniflow.runtime.errors import DataError, run_main
from omniflow.runtime.options import parse_options


@dataclass
class EvalOptions:
    predictions: List[str] = field(default_factory=list, metadata={"help": "predictions.json file(s) to score"})
    metrics: List[str] = field(default_factory=lambda: list(DEFAULT_METRICS), metadata={
        "help": "metrics to compute", "choices": list(METRICS)})
    output_json: Optional[str] = field(default=None, metadata={"help": "write all scores to this JSON file"})
    by_task: bool = field(default=False, metadata={"help": "also score each task (text, image_to_text, ...) apart"})


def read_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of prediction records")
    for i, record in enumerate(records):
        missing = {"id", "prediction", "references"} - set(record)
        if missing:
            raise DataError(f"{path}: record {i} lacks {sorted(missing)}")
    return records


def captions(records: list[dict]) -> Captions:
    return Captions([r["prediction"] for r in records], [r["references"] for r in records], [r["id"] for r in records])


def task_of(record: dict) -> str:
    return record.get("task") or "unknown"


def column_names(paths: list[Path]) -> list[str]:
    """File names, or parent/file where two files share a name (e.g. several predictions.json)."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def main():
    opts = parse_options(EvalOptions, description=__doc__)
    if not opts.predictions:
        raise DataError("give at least one file with --predictions")
    paths = [Path(p) for p in opts.predictions]
    groups = {}  # (file column, task or None for all) -> its records, scored as one corpus
    for name, path in zip(column_names(paths), paths):
        records = read_predictions(path)
        groups[name, None] = records
        if opts.by_task:
            for record in sorted(records, key=task_of):
                groups.setdefault((name, task_of(record)), []).append(record)
    # one evaluation for all files and tasks: the captions are tokenized in one go and METEOR's JVM starts once
    evaluation = evaluate([captions(records) for records in groups.values()], opts.metrics)
    results, per_task = {}, defaultdict(dict)
    for ((name, task), records), scores in zip(groups.items(), evaluation.scores):
        (results if task is None else per_task[task])[name] = {**scores, "samples": len(records)}
    print(format_table(results, evaluation.labels))
    for task, table in per_task.items():
        print(f"\n{task}:\n{format_table(table, evaluation.labels)}")
    if evaluation.notes:
        print("\n" + "\n".join(evaluation.notes))
    if opts.output_json:
        out = Path(opts.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"overall": results, "by_task": per_task, "labels": evaluation.labels,
                                   "coco_toolkit": evaluation.coco_toolkit}, indent=2) + "\n")
        print(f"\nscores written to {out}")


if __name__ == "__main__":
    run_main(main)
