"""Caption metrics as the COCO caption toolkit (pycocoevalcap) computes them, so they compare with published numbers.

With Java on PATH every caption, hypotheses and references alike, goes once through the toolkit's Stanford
PTBTokenizer (lowercased, its punctuation list dropped) and pycocoevalcap scores the tokens: BLEU-1..4 (corpus
level, "closest" reference length), METEOR 1.5 (its jar), ROUGE-L (beta 1.2) and CIDEr-D (idf from the references
of the set being scored). The numbers are the toolkit's own, on its scales: 0-1, CIDEr-D typically 0-10 (papers
print them x100).

Without Java the jars cannot run: BLEU, ROUGE-L and CIDEr-D are still the toolkit's code, but on nltk Treebank
tokens under the same rules, and METEOR is nltk's (WordNet from omniflow.metrics.wordnet). Their labels say that
they are not comparable with COCO numbers.

sacreBLEU-4 (13a tokenizer on the raw, case-sensitive text, 0-100) is an extra column, comparable with sacreBLEU
numbers only.

Output keys, one per column: bleu_1 .. bleu_4, meteor, rouge, cider, sacrebleu.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from typing import Mapping, Sequence

from omniflow.metrics.wordnet import INSTALL_HINT, ensure_wordnet
from omniflow.runtime.errors import ConfigError, DataError

# metric name (--metrics) -> output key -> column label of the COCO toolkit's number
METRICS: dict[str, dict[str, str]] = {
    "bleu": {f"bleu_{n}": f"BLEU-{n}" for n in range(1, 5)},
    "meteor": {"meteor": "METEOR"},
    "rouge": {"rouge": "ROUGE-L"},
    "cider": {"cider": "CIDEr-D"},
    "sacrebleu": {"sacrebleu": "sacreBLEU-4 (13a)"},
}
DEFAULT_METRICS = tuple(METRICS)
DIGITS = {"sacrebleu": 2}  # sacreBLEU's 0-100 scale; the toolkit's numbers get 4 decimals
NOT_PTB = " (nltk tokens, not PTB)"
NLTK_METEOR = "METEOR (nltk, not comparable to METEOR 1.5)"
JAVA_HINT = "for those, install Java (Debian/Ubuntu: apt-get install default-jre-headless)"
# Appended to every tokenizer run: it must come out last, tokenized, or Java's output is not the captions' tokens.
CANARY = ("Last line.", "last line")


class TextMetricInputError(DataError):
    """Predictions/references are malformed (length mismatch, missing or empty references)."""


class UnknownTextMetricError(ConfigError):
    """A metric name that is not in METRICS."""


class CocoToolkitError(ConfigError):
    """Java is on PATH but the toolkit's jars failed under it."""

    def __init__(self, what: str, output: str):
        super().__init__(f"the COCO caption toolkit's {what} failed under Java: {output[:300]!r}; fix Java, or take "
                         "it off PATH to get the labelled non-COCO substitutes")


@dataclass(frozen=True)
class Captions:
    """Samples scored as one corpus: predictions[i] against references[i] (one or more strings)."""

    predictions: Sequence[str]
    references: Sequence[Sequence[str]]
    sample_ids: Sequence[object] | None = None


@dataclass(frozen=True)
class Evaluation:
    """scores: per corpus, output key -> value (None: could not be computed, see notes);
    labels: output key -> column label, saying where a number is not the COCO toolkit's."""

    scores: list[dict[str, float | None]]
    labels: dict[str, str]
    coco_toolkit: bool  # every BLEU/METEOR/ROUGE-L/CIDEr-D number is the toolkit's
    notes: list[str]


def validate_inputs(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    sample_ids: Sequence[object] | None = None,
) -> None:
    """Raise TextMetricInputError naming the sample when the inputs cannot be scored."""
    if len(predictions) != len(references):
        raise TextMetricInputError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; they must pair up"
        )
    if not predictions:
        raise TextMetricInputError("no predictions to score")
    if sample_ids is not None and len(sample_ids) != len(predictions):
        raise TextMetricInputError(f"got {len(sample_ids)} sample ids for {len(predictions)} predictions")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        where = f"sample {sample_ids[i]!r} (index {i})" if sample_ids is not None else f"sample index {i}"
        if not isinstance(pred, str):
            raise TextMetricInputError(f"{where}: prediction must be a string, got {type(pred).__name__}")
        if isinstance(refs, str):
            raise TextMetricInputError(f"{where}: references must be a list of strings, got one string")
        if len(refs) == 0:
            raise TextMetricInputError(f"{where}: has no references")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                raise TextMetricInputError(f"{where}: reference {j} is empty or not a string: {ref!r}")


def check_metric_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownTextMetricError(f"unknown text metric {name!r} (valid: {', '.join(METRICS)}){hint}")


def java_available() -> bool:
    """The toolkit's wrappers run `java` from PATH, so PATH decides, as it does for them."""
    return shutil.which("java") is not None


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The toolkit's PTBTokenizer on all texts in one JVM: lowercased tokens, its punctuation list dropped."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The jar keeps input lines and the wrapper turns only "\n" into a space, so a "\r", "\f" or U+2028 inside a
    # caption would shift every later caption onto another one's tokens: any line break becomes a space first.
    lines = [" ".join(text.splitlines()) for text in texts] + [CANARY[0]]
    tokens = PTBTokenizer().tokenize({0: [{"caption": line} for line in lines]}).get(0, [])
    # The wrapper ignores Java's exit status and takes whatever Java printed (e.g. a VM error) for tokens.
    if len(tokens) != len(lines) or tokens[-1] != CANARY[1]:
        raise CocoToolkitError("PTB tokenizer", tokens[0] if tokens else "no output")
    return tokens[:-1]


@functools.cache
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer  # the word step of nltk.word_tokenize; needs no NLTK data

    return NLTKWordTokenizer()


def treebank_tokenize(text: str) -> str:
    """The toolkit's tokenizing rules without Java: lowercase, Treebank tokens with -lrb-/-rrb- for brackets, its
    punctuation list dropped. Close to the Stanford PTB tokens, not the same (e.g. "/x/" stays one token)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    words = (w.lower() for w in _word_tokenizer().tokenize(text.lower(), convert_parentheses=True))
    return " ".join(w for w in words if w not in PUNCTUATIONS)


class Meteor15:
    """The toolkit's METEOR 1.5 jar, started once per evaluation: loading its paraphrase table takes 5 s (idle
    2-core VM) and runs while the captions are tokenized."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor

        self.jar = Meteor()

    def score(self, gts: dict, res: dict) -> float:
        try:
            return float(self.jar.compute_score(gts, res)[0])
        except (ValueError, OSError) as err:  # the JVM died, or printed something that is not a score
            self.jar.lock.release()  # compute_score still holds it, and Meteor.__del__ would wait for it forever
            # closes its stdin without a broken-pipe error from Meteor.__del__, and gives what Java printed
            stdout, stderr = self.jar.meteor_p.communicate(timeout=60)
            printed = " ".join((stdout + stderr).decode(errors="replace").split())
            raise CocoToolkitError("METEOR 1.5", printed or str(err)) from None


def nltk_meteor(gts: dict, res: dict) -> float | None:
    """Mean sentence METEOR (nltk, best reference per sample); None when WordNet is missing."""
    if not ensure_wordnet():
        return None
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([r.split() for r in gts[i]], res[i][0].split(), wordnet=wordnet) for i in res]
    return sum(scores) / len(scores)


def sacrebleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (sacreBLEU, 13a, 0-100) on the raw text. Ragged reference lists are padded with None,
    which sacreBLEU skips; padding with '' would count as a real empty reference."""
    import sacrebleu

    depth = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def column_labels(metrics: Sequence[str], coco_toolkit: bool) -> dict[str, str]:
    labels = {}
    for name in metrics:
        for key, label in METRICS[name].items():
            if coco_toolkit or name == "sacrebleu":
                labels[key] = label
            else:
                labels[key] = NLTK_METEOR if name == "meteor" else label + NOT_PTB
    return labels


def evaluate(corpora: Sequence[Captions], metrics: Sequence[str] = DEFAULT_METRICS) -> Evaluation:
    """Score each corpus on its own, as the toolkit would score it alone (corpus-level BLEU, CIDEr-D idf from its
    references), with one tokenizer run and one METEOR JVM for all of them."""
    check_metric_names(metrics)
    for captions in corpora:
        validate_inputs(captions.predictions, captions.references, captions.sample_ids)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    coco = java_available()
    meteor = Meteor15() if coco and "meteor" in metrics else None  # first, so that its JVM loads meanwhile
    # each distinct caption once: the same references recur across files and tasks
    texts = list(dict.fromkeys(t for c in corpora for t in itertools.chain(c.predictions, *c.references)))
    tokens = dict(zip(texts, ptb_tokenize(texts) if coco else map(treebank_tokenize, texts)))

    all_scores = []
    for captions in corpora:
        res = {i: [tokens[p]] for i, p in enumerate(captions.predictions)}
        gts = {i: [tokens[r] for r in refs] for i, refs in enumerate(captions.references)}
        scores: dict[str, float | None] = {}
        if "bleu" in metrics:
            scores.update(zip(METRICS["bleu"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
        if "meteor" in metrics:
            scores["meteor"] = meteor.score(gts, res) if meteor else nltk_meteor(gts, res)
        if "rouge" in metrics:
            scores["rouge"] = float(Rouge().compute_score(gts, res)[0])
        if "cider" in metrics:
            scores["cider"] = float(Cider().compute_score(gts, res)[0])
        if "sacrebleu" in metrics:
            scores["sacrebleu"] = sacrebleu4(captions.predictions, captions.references)
        all_scores.append(scores)

    notes = []
    if set(metrics) - {"sacrebleu"}:
        notes.append(f"all but sacreBLEU: the COCO caption toolkit's numbers (pycocoevalcap {version('pycocoevalcap')}"
                     ", PTB tokens, METEOR 1.5) on its scales (papers print them x100)" if coco else
                     "Java not found on PATH, so the COCO caption toolkit's PTB tokenizer and METEOR 1.5 cannot run: "
                     "BLEU, ROUGE-L and CIDEr-D use its code on nltk tokens and METEOR is nltk's; none of them "
                     f"compares with published COCO numbers; {JAVA_HINT}")
    if "sacrebleu" in metrics:
        notes.append("sacreBLEU-4 (13a): sacreBLEU on the raw text, 0-100, not comparable with BLEU-4")
    if any(scores.get("meteor", 0.0) is None for scores in all_scores):
        notes.append(f"METEOR n/a: nltk cannot load WordNet; fix with: {INSTALL_HINT}")
    return Evaluation(all_scores, column_labels(metrics, coco), coco, notes)


def format_table(rows: Mapping[str, Mapping[str, float | int | None]], labels: Mapping[str, str]) -> str:
    """Markdown table: one row per prediction file, the labelled columns first, then any others (e.g. samples)."""
    keys = list(dict.fromkeys([*labels, *(key for scores in rows.values() for key in scores)]))

    def cell(key: str, value: float | int | None) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, int):
            return str(value)
        return f"{value:.{DIGITS.get(key, 4)}f}"

    lines = ["| predictions | " + " | ".join(labels.get(key, key) for key in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for source, scores in rows.items():
        lines.append(f"| {source} | " + " | ".join(cell(key, scores.get(key)) for key in keys) + " |")
    return "\n".join(lines)
