"""scripts/eval_text.py end to end: its numbers are pycocoevalcap's, called here as the COCO caption evaluation calls
it; without Java (PATH without java, as a user without it has) the substitutes are labelled; one-line errors."""
import json
import shutil
import subprocess
import sys

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from omniflow.metrics.text import NLTK_METEOR, treebank_tokenize
from omniflow.metrics.wordnet import install_wordnet
from runtime_helpers import REPO, env

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO toolkit's jars need Java on PATH")
SCORE_KEYS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge", "cider", "sacrebleu"]

# 12 COCO-style captions, 3 to 5 references each, with capitals, punctuation, brackets, a repeated word.
RECORDS = [
    {"id": "beach", "task": "image_to_text", "prediction": "A man is riding a horse on the beach.",
     "references": ["A man rides a horse along the beach.", "A person on horseback at the seaside.",
                    "a man riding a brown horse on sand", "Horse and rider on a sandy beach near the water."]},
    {"id": "dogs", "task": "image_to_text", "prediction": "dogs dogs dogs in the snow",
     "references": ["Two dogs are playing in the snow.", "A pair of dogs running through snow",
                    "Dogs play in a snowy field."]},
    {"id": "plate", "task": "image_to_text", "prediction": "a plate of food (broccoli and rice)",
     "references": ["A plate with broccoli and rice.", "Food on a white plate with vegetables.",
                    "a dinner plate of broccoli, chicken and rice", "plate of food", "A meal of rice and greens."]},
    {"id": "bus", "task": "image_to_text", "prediction": "a red double-decker bus on the street",
     "references": ["A double decker bus on a street.", "a red bus in the city",
                    "A bus drives down the road past buildings.", "The red bus isn't moving."]},
    {"id": "river", "task": "text", "prediction": "The river flows to the sea; it doesn't stop.",
     "references": ["The river flows into the sea.", "A river runs down to the ocean.", "the river never stops"]},
    {"id": "sonnet", "task": "text", "prediction": "Shall I compare thee to a summer's day?",
     "references": ["Shall I compare thee to a summer's day?", "Shall I liken you to a day in summer?",
                    "Thou art more lovely and more temperate."]},
    {"id": "kitchen", "task": "image_to_text", "prediction": "A kitchen with a stove, a sink and wooden cabinets.",
     "references": ["A kitchen with wooden cabinets and a stove.", "a small kitchen with a sink and an oven",
                    "Wooden cupboards above a white stove.", "The kitchen has a sink, stove and refrigerator."]},
    {"id": "tennis", "task": "image_to_text", "prediction": "a woman swinging a tennis racket",
     "references": ["A woman swings her racket at a tennis ball.", "A tennis player hitting the ball.",
                    "a female tennis player on a court"]},
    {"id": "giraffes", "task": "image_to_text", "prediction": "Two giraffes standing next to a tree.",
     "references": ["Two giraffes stand by a tall tree.", "A pair of giraffes eating leaves from a tree",
                    "giraffes near a tree in a zoo enclosure", "Two giraffes in the grass beside trees."]},
    {"id": "laptop", "task": "image_to_text", "prediction": "a cat sleeping on the keyboard of a laptop",
     "references": ["A cat lying on a laptop keyboard.", "A grey cat sleeps on an open laptop.",
                    "the cat is napping on the computer"]},
    {"id": "winter", "task": "text", "prediction": "Now is the winter of our discontent",
     "references": ["Now is the winter of our discontent.", "This is the winter of our discontent",
                    "Our discontented winter is now."]},
    {"id": "rose", "task": "text", "prediction": "A rose by any other name would smell as sweet",
     "references": ["That which we call a rose by any other name would smell as sweet.",
                    "A rose would smell as sweet by any other name.", "Any other name, and a rose smells as sweet."]},
]
WORSE = [{**r, "prediction": "a picture of something"} for r in RECORDS]


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def run_eval(*args, extra_env=None):
    return subprocess.run([sys.executable, str(REPO / "scripts/eval_text.py"), *map(str, args)], capture_output=True,
                          text=True, env={**env(), **(extra_env or {})}, timeout=300)


def without_java(tmp_path):
    """PATH that leads to no java (the script runs from sys.executable's absolute path)."""
    return {"PATH": str(tmp_path / "no_java_bin")}


def coco_dicts(records):
    return ({i: [{"caption": c} for c in r["references"]] for i, r in enumerate(records)},
            {i: [{"caption": r["prediction"]}] for i, r in enumerate(records)})


@pytest.fixture(scope="module")
def meteor():
    """The toolkit's METEOR 1.5, one JVM for all the reference computations here (it loads for 5 s or more)."""
    return Meteor()


def coco_toolkit_scores(records, meteor):
    """pycocoevalcap as COCOEvalCap.evaluate runs it: PTBTokenizer on gts and res, then each scorer."""
    gts, res = coco_dicts(records)
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    scores = dict(zip(SCORE_KEYS[:4], Bleu(4).compute_score(gts, res)[0]))
    scores["meteor"] = meteor.compute_score(gts, res)[0]
    scores["rouge"] = Rouge().compute_score(gts, res)[0]
    scores["cider"] = Cider().compute_score(gts, res)[0]
    return scores


def assert_toolkit_numbers(got, expected):
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-6)


@needs_java
def test_numbers_are_the_coco_toolkits_per_file_and_task(tmp_path, meteor):
    good = write(tmp_path / "mlp_head" / "predictions.json", RECORDS)
    worse = write(tmp_path / "refiner" / "predictions.json", WORSE)
    out = tmp_path / "scores.json"
    result = run_eval("--predictions", good, worse, "--by_task", "--output_json", out)
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    overall, by_task = scores["overall"], scores["by_task"]
    assert_toolkit_numbers(overall["mlp_head/predictions.json"], coco_toolkit_scores(RECORDS, meteor))
    assert_toolkit_numbers(overall["refiner/predictions.json"], coco_toolkit_scores(WORSE, meteor))
    for task in ("image_to_text", "text"):  # each task scored as its own corpus (its own CIDEr-D idf)
        subset = [r for r in RECORDS if r["task"] == task]
        assert_toolkit_numbers(by_task[task]["mlp_head/predictions.json"], coco_toolkit_scores(subset, meteor))
        assert by_task[task]["mlp_head/predictions.json"]["samples"] == len(subset)

    assert scores["coco_toolkit"] is True
    assert scores["labels"] == {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4",
                                "meteor": "METEOR", "rouge": "ROUGE-L", "cider": "CIDEr-D",
                                "sacrebleu": "sacreBLEU-4 (13a)"}
    got = overall["mlp_head/predictions.json"]
    assert list(got) == [*SCORE_KEYS, "samples"] and got["samples"] == len(RECORDS)
    assert all(got[k] > overall["refiner/predictions.json"][k] for k in SCORE_KEYS)
    lines = result.stdout.splitlines()
    assert lines[0] == ("| predictions | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D "
                        "| sacreBLEU-4 (13a) | samples |")
    assert lines[2] == "| mlp_head/predictions.json | " + " | ".join(
        [f"{got[k]:.4f}" for k in SCORE_KEYS[:-1]] + [f"{got['sacrebleu']:.2f}", str(len(RECORDS))]) + " |"
    assert "the COCO caption toolkit's numbers (pycocoevalcap 1.2" in result.stdout
    assert [line for line in lines if line.endswith(":")] == ["image_to_text:", "text:"]


def test_without_java_the_substitutes_are_labelled(tmp_path):
    install_wordnet()  # for the nltk METEOR (tested against nltk's own values in test_metrics_text.py)
    out = tmp_path / "scores.json"
    result = run_eval("--predictions", write(tmp_path / "p.json", RECORDS), "--output_json", out,
                      extra_env=without_java(tmp_path))
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    assert scores["coco_toolkit"] is False
    assert scores["labels"]["bleu_4"] == "BLEU-4 (nltk tokens, not PTB)"
    assert scores["labels"]["meteor"] == NLTK_METEOR == "METEOR (nltk, not comparable to METEOR 1.5)"
    assert scores["labels"]["sacrebleu"] == "sacreBLEU-4 (13a)"
    assert result.stdout.startswith("| predictions | BLEU-1 (nltk tokens, not PTB) |")
    assert "| METEOR (nltk, not comparable to METEOR 1.5) | ROUGE-L (nltk tokens, not PTB) |" in result.stdout
    assert "Java not found on PATH" in result.stdout and "apt-get install default-jre-headless" in result.stdout

    # BLEU, ROUGE-L and CIDEr-D are still the toolkit's code, on the Treebank tokens.
    gts, res = coco_dicts(RECORDS)
    gts = {i: [treebank_tokenize(c["caption"]) for c in caps] for i, caps in gts.items()}
    res = {i: [treebank_tokenize(c["caption"]) for c in caps] for i, caps in res.items()}
    expected = dict(zip(SCORE_KEYS[:4], Bleu(4).compute_score(gts, res)[0]))
    expected["rouge"] = Rouge().compute_score(gts, res)[0]
    expected["cider"] = Cider().compute_score(gts, res)[0]
    assert_toolkit_numbers(scores["overall"]["p.json"], expected)
    assert 0 < scores["overall"]["p.json"]["meteor"] < 1


def test_without_java_or_wordnet_meteor_is_na_others_still_run(tmp_path):
    empty = tmp_path / "no_wordnet"
    empty.mkdir()
    a = write(tmp_path / "p.json", RECORDS)
    result = run_eval("--predictions", a, "--output_json", tmp_path / "s.json", extra_env={
        **without_java(tmp_path), "OMNIFLOW_NLTK_DATA": str(empty), "NLTK_DATA": str(empty), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "s.json").read_text())["overall"]["p.json"]
    assert scores["meteor"] is None and scores["bleu_4"] > 0
    assert "METEOR n/a: nltk cannot load WordNet" in result.stdout and "wordnet install" in result.stdout


@needs_java
@pytest.mark.parametrize("java_options, failed", [
    ("-Xmx1k", "PTB tokenizer"),  # no JVM starts at all
    ("-Xms2100m -Xmx3g", "METEOR 1.5"),  # the tokenizer's JVM starts, METEOR's (-Xmx2G) cannot
])
def test_java_that_fails_is_one_line(tmp_path, java_options, failed):
    result = run_eval("--predictions", write(tmp_path / "p.json", RECORDS),
                      extra_env={"JAVA_TOOL_OPTIONS": java_options})
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith(f"error: CocoToolkitError: the COCO caption toolkit's {failed} "
                                                      "failed under Java"), result.stderr
    assert "take it off PATH" in last


def test_bad_inputs_are_one_line(tmp_path):
    missing = run_eval("--predictions", tmp_path / "nope.json")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: FileNotFoundError")
    broken = write(tmp_path / "b.json", [{"id": "x", "prediction": "a"}])
    result = run_eval("--predictions", broken)
    assert result.returncode == 2 and "record 0 lacks ['references']" in result.stderr
    empty_refs = write(tmp_path / "e.json", [{"id": "x", "prediction": "a", "references": []}])
    result = run_eval("--predictions", empty_refs)
    assert result.returncode == 2 and "'x'" in result.stderr.strip().splitlines()[-1]
