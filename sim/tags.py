"""Query tags and tag domains: the first stage of MixLLM's tag-enhanced query encoder.

MixLLM (Wang et al., NAACL 2025) tags each query with an LLM tagger (InsTag), clusters the
tags into domains and fine-tunes the query encoder so that queries of one domain lie close
together. An LLM tagger cannot run here, so `KeyphraseTagger` is an offline stand-in: up to
`max_tags` keyphrases of the query's own question (RAKE-like: runs of content words between
stop words, scored by the words' inverse document frequency), plus ``task:<eval_name>`` when
the task is known. Any object with a matching `tags` method (the `Tagger` protocol) can
replace it, e.g. an LLM tagger whose answers were computed offline.

`TagDomains` clusters tags into domains: every distinct tag of the training queries is
embedded, k-means groups the tag vectors into `n_domains` domains, and a query belongs to the
domain most of its tags fall in (a tag never seen in training joins the nearest centroid,
so every tagged query gets a domain; a query without tags gets none).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from sim.embeddings import l2_normalise

TagEmbedder = Callable[[Sequence[str]], np.ndarray]

NO_DOMAIN = -1  # `TagDomains.assign`'s label for a query without tags


@runtime_checkable
class Tagger(Protocol):
    """Gives each query a list of fine-grained tags (strings)."""

    def tags(
        self, texts: Sequence[str], eval_names: Sequence[str] | None
    ) -> list[list[str]]: ...


def question_part(prompt: str) -> str:
    """The query's own question: the last paragraph of the prompt.

    Few-shot prompts (RouterBench's ARC-Challenge and Winogrande) list solved examples
    separated by blank lines and put the real question last; a one-paragraph prompt is
    returned whole. A very short last paragraph (e.g. a lone "Answer:") is joined to the
    one before it.
    """
    parts = [p.strip() for p in re.split(r"\n\s*\n", prompt) if p.strip()]
    if not parts:
        return prompt.strip()
    last = parts[-1]
    if len(last) < 20 and len(parts) > 1:
        last = parts[-2] + "\n" + last
    return last


@dataclass(frozen=True)
class TemplateLines:
    """Lines that many queries share verbatim (instructions such as "Print only a single
    choice ..."): they say nothing about one query, so they are dropped before tagging and
    encoding. Fitted on training texts."""

    lines: frozenset[str]

    @classmethod
    def fit(cls, texts: Sequence[str], *, min_share: float = 0.02, min_count: int = 3):
        """Lines occurring in at least max(min_count, min_share * len(texts)) texts."""
        counts: Counter = Counter()
        for t in texts:
            counts.update({line.strip() for line in t.splitlines() if line.strip()})
        threshold = max(min_count, min_share * len(texts))
        return cls(frozenset(line for line, c in counts.items() if c >= threshold))

    def strip(self, text: str) -> str:
        """`text` without template lines (unchanged if nothing else would remain)."""
        kept = [line for line in text.splitlines() if line.strip() not in self.lines]
        out = "\n".join(kept).strip()
        return out or text


# Common English function words plus the instruction words benchmark prompts share
# ("Print only a single choice ... without explanation"): never a keyphrase.
_STOPWORD_TEXT = """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing done down during each either
    else ever every few for from further had has have having he her here hers herself him
    himself his how i if in into is it its itself just least less let like made make many may
    me might more most much must my myself neither no nor not now of off on once one only or
    other others our ours ourselves out over own per rather same shall she should since so some
    such than that the their theirs them themselves then there these they this those though
    through to too two under until up upon us very via was we were what when where whether
    which while who whom whose why will with within without would yet you your yours yourself
    yourselves use used using uses get gets got given give gives thing things way ways another
    three four five first second third new
    print choice answer answers explanation letter correct option options question questions
    following best please statement statements describes describe explain likely most least
    true false select choose single write function find program
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

# Words start with a letter of any script; a line break is a token of its own, so it ends a
# keyphrase and starts a sentence (a capitalised word opening a line is not a name).
# Inside a word only letters, apostrophes and hyphens, as in ASCII before ("so2" is two
# tokens; "_", Winogrande's blank, is punctuation).
_TOKEN = re.compile(r"[^\W\d_](?:[^\W\d_]|['\-])*|\d+|\n|[^\w\s]|_")
_WORD_ONLY = re.compile(r"[^\W\d_](?:[^\W\d_]|['\-])*")


def _normalise(text: str) -> str:
    """NFKC form, so compatibility variants of a letter (ligatures, full-width forms) are
    one word."""
    return unicodedata.normalize("NFKC", text)


def _content_runs(
    text: str, max_words: int, lower_seen: frozenset[str] | set[str] | None = None
) -> list[list[str]]:
    """RAKE-style candidates: runs of content words, split at stop words and punctuation.

    Names (as in Winogrande's "Kyle" and "Logan") end a run too: they are specific to one
    query and say nothing about its domain. A name is a capitalised word inside a sentence,
    or, given `lower_seen` (words seen in lower case in a corpus), a capitalised word never
    seen in lower case.
    """
    runs: list[list[str]] = []
    cur: list[str] = []
    sentence_start = True
    for tok in _TOKEN.findall(_normalise(text)):
        low = tok.lower().strip("'-")
        is_word = tok[0].isalpha() and len(low) >= 3
        proper = tok[0].isupper() and not tok.isupper() and (
            not sentence_start or (lower_seen is not None and low not in lower_seen)
        )
        if is_word and low not in STOPWORDS and not proper:
            cur.append(low)
        else:
            if cur:
                runs.append(cur)
            cur = []
        sentence_start = tok in {".", "?", "!", "\n", ")", ":"} or (
            sentence_start and not tok[0].isalnum()
        )
    if cur:
        runs.append(cur)
    out: list[list[str]] = []
    for run in runs:  # long runs are split into pieces of at most max_words
        for i in range(0, len(run), max_words):
            out.append(run[i : i + max_words])
    return out


@dataclass
class KeyphraseTagger:
    """Offline keyphrase tagger (see module doc). Fit it on the training queries' texts.

    `min_df`: a keyphrase's words must each occur in at least this many fitted questions
    (drops typos and one-off names); a query with no such phrase keeps its best unfiltered
    ones, so every query with a content word gets some tag (one without gets only its task
    tag, or none).
    """

    max_tags: int = 5
    max_phrase_words: int = 3
    min_df: int = 2
    include_eval_name: bool = True
    _df: Counter = field(default_factory=Counter, repr=False)
    _lower_seen: set[str] = field(default_factory=set, repr=False)
    _n_docs: int = 0

    def fit(self, texts: Sequence[str]) -> KeyphraseTagger:
        """Learn document frequencies of content words from the questions of `texts`."""
        self._df = Counter()
        self._lower_seen = set()
        for t in texts:
            q = question_part(t)
            self._lower_seen.update(
                w for w in _WORD_ONLY.findall(_normalise(q)) if w.islower()
            )
            self._df.update({w for run in _content_runs(q, 1) for w in run})
        self._n_docs = len(texts)
        return self

    def _idf(self, word: str) -> float:
        return math.log((1.0 + self._n_docs) / (1.0 + self._df.get(word, 0))) + 1.0

    def keyphrases(self, text: str) -> list[str]:
        """Up to `max_tags` distinct keyphrases of one prompt's question, best first."""
        runs = _content_runs(
            question_part(text), self.max_phrase_words, self._lower_seen or None
        )
        scored: dict[str, float] = {}
        fallback: dict[str, float] = {}
        for run in runs:
            phrase = " ".join(run)
            score = sum(self._idf(w) for w in run)
            fallback[phrase] = max(score, fallback.get(phrase, 0.0))
            if self._n_docs == 0 or all(self._df.get(w, 0) >= self.min_df for w in run):
                scored[phrase] = fallback[phrase]
        pool = scored or fallback
        ranked = sorted(pool.items(), key=lambda kv: (-kv[1], kv[0]))
        return [p for p, _ in ranked[: self.max_tags]]

    def tags(
        self, texts: Sequence[str], eval_names: Sequence[str] | None = None
    ) -> list[list[str]]:
        """Keyphrases of each text, plus ``task:<eval_name>``; fits on `texts` if unfitted."""
        if self._n_docs == 0:
            self.fit(texts)
        out = []
        for i, text in enumerate(texts):
            tags = self.keyphrases(text)
            if self.include_eval_name and eval_names is not None:
                tags.append(f"task:{eval_names[i]}")
            out.append(tags)
        return out


@dataclass(frozen=True, eq=False)
class TagDomains:
    """Tags clustered into domains; `assign` gives any tagged query its domain."""

    tag_domain: dict[str, int]  # each training tag -> its domain
    centroids: np.ndarray  # (k, d) unit vectors in the tag-embedding space

    @property
    def n_domains(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def fit(
        cls,
        query_tags: Sequence[Sequence[str]],
        embed: TagEmbedder,
        *,
        n_domains: int,
        seed: int | np.random.SeedSequence,
    ) -> TagDomains:
        """k-means (weighted by how many queries carry a tag) over the embedded tags."""
        from sklearn.cluster import KMeans

        counts = Counter(t for tags in query_tags for t in set(tags))
        if not counts:
            raise ValueError("no tags to cluster")
        vocab = sorted(counts)
        vectors = np.asarray(embed(vocab), dtype=np.float64)
        k = max(1, min(n_domains, len(vocab)))
        state = int(np.random.default_rng(seed).integers(2**31 - 1))
        km = KMeans(n_clusters=k, n_init=4, random_state=state)
        labels = km.fit_predict(vectors, sample_weight=np.array([counts[t] for t in vocab]))
        centroids = l2_normalise(km.cluster_centers_).astype(np.float32)
        return cls(tag_domain=dict(zip(vocab, labels.tolist(), strict=True)), centroids=centroids)

    def assign(self, query_tags: Sequence[Sequence[str]], embed: TagEmbedder) -> np.ndarray:
        """(n,) int domain of each query: the domain most of its tags belong to, or
        `NO_DOMAIN` for a query without tags (it is like no other query).

        A tag seen in training keeps its cluster; an unseen tag joins the nearest centroid.
        Ties go to the domain of the query's best-ranked tag (taggers list tags best first).
        """
        unseen = sorted({t for tags in query_tags for t in tags} - self.tag_domain.keys())
        domain_of = dict(self.tag_domain)
        if unseen:
            vectors = l2_normalise(np.asarray(embed(unseen), dtype=np.float64))
            nearest = np.argmax(vectors @ self.centroids.T.astype(np.float64), axis=1)
            domain_of.update(zip(unseen, nearest.tolist(), strict=True))
        out = np.full(len(query_tags), NO_DOMAIN, dtype=np.int64)
        for i, tags in enumerate(query_tags):
            if not tags:
                continue
            votes = Counter(domain_of[t] for t in tags)
            top = max(votes.values())
            out[i] = next(domain_of[t] for t in tags if votes[domain_of[t]] == top)
        return out
