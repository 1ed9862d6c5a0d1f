"""scripts/eval_text.py end to end: several prediction files, one table, JSON, METEOR fallback."""
import json
import subprocess
import sys

import pytest

from omniflow.metrics.text import compute_text_metrics
from runtime_helpers import REPO, env

RECORDS = [
    {"id": "astronaut", "task": "image_to_text", "prediction": "a woman in a white space suit",
     "references": ["an astronaut in a white space suit", "portrait of a woman astronaut"]},
    {"id": "coffee", "task": "image_to_text", "prediction": "a cup of coffee on a table",
     "references": ["a cup of coffee on a saucer", "coffee cup seen from above", "a hot drink"]},
    {"id": "wiki-1", "task": "text", "prediction": "the river flows to the sea",
     "references": ["the river flows into the sea"]},
]


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def run_eval(*args, extra_env=None):
    return subprocess.run([sys.executable, str(REPO / "scripts/eval_text.py"), *map(str, args)], capture_output=True,
                          text=True, env={**env(), **(extra_env or {})}, timeout=120)


def test_two_files_side_by_side(tmp_path):
    worse = [{**r, "prediction": "something else entirely"} for r in RECORDS]
    a = write(tmp_path / "mlp_head" / "predictions.json", RECORDS)
    b = write(tmp_path / "refiner" / "predictions.json", worse)
    out = tmp_path / "scores.json"
    result = run_eval("--predictions", a, b, "--by_task", "--output_json", out)
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    expected = compute_text_metrics([r["prediction"] for r in RECORDS], [r["references"] for r in RECORDS])
    got = scores["overall"]["mlp_head/predictions.json"]
    assert got["samples"] == 3 and all(got[k] == pytest.approx(v) for k, v in expected.items())
    assert got["bleu"] > scores["overall"]["refiner/predictions.json"]["bleu"]
    assert set(scores["by_task"]) == {"image_to_text", "text"}
    table = result.stdout.splitlines()
    assert table[0].startswith("| predictions | BLEU-4 | ROUGE-L | METEOR | CIDEr-D")
    assert table[2].startswith("| mlp_head/predictions.json | ") and table[3].startswith("| refiner/")


def test_meteor_unavailable_others_still_run(tmp_path):
    empty = tmp_path / "no_wordnet"
    empty.mkdir()
    a = write(tmp_path / "p.json", RECORDS)
    result = run_eval("--predictions", a, "--output_json", tmp_path / "s.json",
                      extra_env={"OMNIFLOW_NLTK_DATA": str(empty), "NLTK_DATA": str(empty), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "s.json").read_text())["overall"]["p.json"]
    assert scores["meteor"] is None and scores["bleu"] > 0
    assert "n/a meteor: METEOR needs WordNet" in result.stdout and "wordnet install" in result.stdout


def test_bad_inputs_are_one_line(tmp_path):
    missing = run_eval("--predictions", tmp_path / "nope.json")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: FileNotFoundError")
    broken = write(tmp_path / "b.json", [{"id": "x", "prediction": "a"}])
    result = run_eval("--predictions", broken)
    assert result.returncode == 2 and "record 0 lacks ['references']" in result.stderr
    empty_refs = write(tmp_path / "e.json", [{"id": "x", "prediction": "a", "references": []}])
    result = run_eval("--predictions", empty_refs)
    assert result.returncode == 2 and "'x'" in result.stderr.strip().splitlines()[-1]
