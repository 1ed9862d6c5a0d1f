"""Caption/text metrics against several references per sample: BLEU-4, ROUGE-L, METEOR, CIDEr-D.

Scales follow each metric's usual reporting: BLEU-4 in sacreBLEU's 0-100, ROUGE-L F and
METEOR in 0-1, CIDEr-D as in the COCO toolkit (x10, typically 0-10).
BLEU uses sacreBLEU's own tokenizer (13a, case-sensitive) and ROUGE-L rouge_score's, so the
numbers match those libraries; METEOR and CIDEr-D share `tokenize` (lowercase, Treebank
words, punctuation dropped) for hypothesis and references alike.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from omniflow.metrics.wordnet import INSTALL_HINT, ensure_wordnet
from omniflow.runtime.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("bleu", "rouge", "meteor", "cider")


class TextMetricInputError(DataError):
    """Predictions/references are malformed (length mismatch, missing or empty references)."""


@functools.cache
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer  # the word step of nltk.word_tokenize; needs no NLTK data

    return NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercased Treebank word tokens without pure-punctuation tokens."""
    return [tok for tok in _word_tokenizer().tokenize(text.lower()) if any(c.isalnum() for c in tok)]


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


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (sacreBLEU, 0-100). Ragged reference lists are padded with None,
    which sacreBLEU skips; padding with '' would count as a real empty reference."""
    import sacrebleu

    depth = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F-measure (rouge_score, no stemming), best reference per sample, averaged."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return sum(scores) / len(scores)


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """Mean sentence METEOR (nltk, best reference per sample); None when WordNet is missing."""
    if not ensure_wordnet():
        logger.warning("METEOR unavailable: nltk cannot load WordNet; fix with: %s", INSTALL_HINT)
        return None
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    scores = [
        meteor_score([tokenize(r) for r in refs], tokenize(pred), wordnet=wordnet)
        for pred, refs in zip(predictions, references)
    ]
    return sum(scores) / len(scores)


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def cider_d(
    predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D as in the COCO caption toolkit: tf-idf n-gram cosine (n=1..max_n) with idf from
    the evaluated references, clipped hypothesis weights, Gaussian length penalty, x10."""
    hyp_counts = [_ngrams(tokenize(p), max_n) for p in predictions]
    ref_counts = [[_ngrams(tokenize(r), max_n) for r in refs] for refs in references]
    doc_freq = Counter(g for refs in ref_counts for g in set().union(*refs))
    log_docs = math.log(len(ref_counts))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(max_n)]
        for gram, tf in counts.items():
            # n-grams unseen in the references get df 1, like the toolkit
            vectors[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in vec.values())) for vec in vectors]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)  # word count
        return vectors, norms, length

    total = 0.0
    for hyp, refs in zip(hyp_counts, ref_counts):
        h_vec, h_norm, h_len = tfidf(hyp)
        sample = 0.0
        for ref in refs:
            r_vec, r_norm, r_len = tfidf(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] > 0 and r_norm[n] > 0:
                    dot /= h_norm[n] * r_norm[n]
                sample += dot * penalty
        total += 10.0 * sample / (max_n * len(refs))
    return total / len(hyp_counts)


@dataclass(frozen=True)
class TextMetric:
    """A registered metric: table label, scorer, decimals shown, and the fix when it returns None."""

    label: str
    compute: Callable[[Sequence[str], Sequence[Sequence[str]]], float | None]
    digits: int = 4
    unavailable_hint: str = ""


TEXT_METRICS: dict[str, TextMetric] = {
    "bleu": TextMetric("BLEU-4", bleu4, digits=2),
    "rouge": TextMetric("ROUGE-L", rouge_l),
    "meteor": TextMetric("METEOR", meteor, unavailable_hint=f"METEOR needs WordNet: {INSTALL_HINT}"),
    "cider": TextMetric("CIDEr-D", cider_d),
}


class UnknownTextMetricError(ConfigError):
    """A metric name that is not in TEXT_METRICS."""


def get_text_metric(name: str) -> TextMetric:
    if name not in TEXT_METRICS:
        close = difflib.get_close_matches(name, list(TEXT_METRICS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownTextMetricError(f"unknown text metric {name!r} (valid: {', '.join(TEXT_METRICS)}){hint}")
    return TEXT_METRICS[name]


def compute_text_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    sample_ids: Sequence[object] | None = None,
) -> dict[str, float | None]:
    """Score predictions[i] against references[i] (one or more strings); None = unavailable."""
    chosen = {name: get_text_metric(name) for name in metrics}
    validate_inputs(predictions, references, sample_ids)
    return {name: metric.compute(predictions, references) for name, metric in chosen.items()}


def format_comparison_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """Markdown table: one row per prediction file, one column per metric; None shows as n/a."""
    names: list[str] = []
    for scores in results.values():
        names += [n for n in scores if n not in names]
    names.sort(key=lambda n: list(TEXT_METRICS).index(n) if n in TEXT_METRICS else len(TEXT_METRICS))
    labels = [TEXT_METRICS[n].label if n in TEXT_METRICS else n for n in names]

    def cell(name: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, int):
            return str(value)
        return f"{value:.{TEXT_METRICS[name].digits if name in TEXT_METRICS else 4}f}"

    lines = ["| predictions | " + " | ".join(labels) + " |", "|---" * (len(names) + 1) + "|"]
    for source, scores in results.items():
        lines.append(f"| {source} | " + " | ".join(cell(n, scores.get(n)) for n in names) + " |")
    missing = [n for n in names if any(scores.get(n) is None for scores in results.values())]
    if missing:
        lines.append("")
    for name in missing:
        hint = TEXT_METRICS[name].unavailable_hint if name in TEXT_METRICS else ""
        lines.append(f"n/a {name}: {hint or 'not computed'}")
    return "\n".join(lines)
