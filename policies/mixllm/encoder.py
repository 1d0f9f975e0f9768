"""MixLLM stage 1: tag-enhanced query embeddings (Wang et al., NAACL 2025, arXiv 2502.18482).

MixLLM tags each query, clusters the tags into domains and fine-tunes its BERT query encoder
with an unsupervised contrastive objective: queries of one domain are pulled together
(intra-domain similarity) and queries of different domains pushed apart (inter-domain
separation). Here:

- tags come from `sim.tags.KeyphraseTagger` (offline stand-in for the paper's LLM tagger),
  fitted on the training rows only; tags are embedded with the base encoder and clustered
  into `n_domains` domains (`sim.tags.TagDomains`), again on the training rows only;
- the loss on a batch of training queries is a supervised-contrastive (SupCon) loss with the
  domain as label, at temperature `temperature`: its numerator rewards similarity within a
  domain, its denominator penalises similarity across domains. Nothing about answer quality
  is used. An anchor term, `anchor_weight * (1 - cos(z, z_base))`, keeps each query near its
  base embedding so the fine-tune adds domain structure without erasing what the generic
  encoder knew;
- the encoder sees each query's own question (`sim.tags.question_part`: the last paragraph
  of a few-shot prompt) without instruction lines shared by many training questions
  (`sim.tags.TemplateLines`), left-truncated to `max_tokens`; only the top `train_layers`
  transformer layers are trained, on cached outputs of the frozen ones. Short inputs and a
  short trained stack are what let a MiniLM fine-tune on ~3k queries in minutes on 2 CPU
  cores;
- training runs in eval mode (dropout off), batches are drawn with a numpy generator from
  `seed`, so the same inputs give the same weights; the fine-tuned weights and the resulting
  embeddings are cached on disk.

For `EncoderSpec(kind="hashing")` (tests, machines without the weights) the "encoder" is the
hashing bag of words followed by a trainable linear map initialised to the identity, trained
with the same objective.

Measured on the shared RouterBench file (benchmarks/bench_tag_embeddings.py): a cold
fine-tune on 1,764 training queries, embedding all 3,150, takes about 80 s on 2 idle CPU
cores. It does NOT measurably improve per-LLM quality prediction over the generic encoder
reading the same question text: with both probes (kNN, logistic regression) the selected
variant's differences in mean AUC and Brier score on the test split are inside their 95%
bootstrap intervals (logistic: AUC [-0.003, +0.003]). Against the generic encoder on the
full prompt, the logistic probe does gain a little (AUC +0.006, [+0.002, +0.012]; Brier
[-0.0010, -0.0003]), but the generic encoder on the question part gains as much: that gain
comes from what the encoder reads, not from the fine-tune.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sim.embeddings import (
    EMBED_INSTALL_HINT,
    cache_key,
    cache_root,
    encode_texts,
    encoder_identity,
    hashing_embed,
    import_torch_transformers,
    length_sorted_batches,
    load_array,
    load_transformer,
    mean_pool,
    progress_bar,
    save_array,
    texts_digest,
    token_limit,
    transformer_embed,
)
from sim.errors import RouteSimError
from sim.scenario import EncoderSpec
from sim.tags import KeyphraseTagger, TagDomains, Tagger, TemplateLines, question_part

log = logging.getLogger(__name__)

# Part of the cache key: bump when tagging, domains or training change what the same
# settings produce, so stale fine-tunes are never reused.
_ALGORITHM_VERSION = 3


@dataclass(frozen=True)
class FineTuneSettings:
    """Knobs of the tag-enhanced fine-tune (all part of the cache key)."""

    epochs: int = 2
    n_domains: int = 12
    temperature: float = 0.1
    anchor_weight: float = 1.0
    learning_rate: float = 3e-5
    batch_size: int = 64
    max_tokens: int = 128
    max_tags: int = 5
    train_layers: int = 2  # top transformer layers fine-tuned (the rest stay frozen)

    def __post_init__(self) -> None:
        positive = ("epochs", "n_domains", "batch_size", "max_tokens", "max_tags", "train_layers")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RouteSimError(
                    f"fine-tune setting {name}={v!r} must be an integer >= 1", field=name
                )
        for name in ("temperature", "learning_rate"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise RouteSimError(
                    f"fine-tune setting {name}={v!r} must be a finite number > 0", field=name
                )
        v = self.anchor_weight
        if not (isinstance(v, int | float) and np.isfinite(v) and v >= 0):
            raise RouteSimError(
                f"fine-tune setting anchor_weight={v!r} must be a finite number >= 0",
                field="anchor_weight",
            )


@dataclass(frozen=True)
class FineTuneResult:
    """Embeddings plus what the fine-tune did (for benchmarks and logs)."""

    embeddings: np.ndarray  # (n, d) float32, L2-normalised
    domains: np.ndarray | None  # (len(train_rows),) domain per training row; None if cached
    seconds: float  # wall time of tagging + fine-tuning + embedding (0 when cached)
    cached: bool
    losses: tuple[float, ...]  # mean loss per epoch (empty when cached)


def tag_enhanced_embeddings(
    texts: Sequence[str],
    eval_names: Sequence[str] | None,
    *,
    encoder: EncoderSpec,
    train_rows: np.ndarray,
    seed: int,
    epochs: int = 2,
    cache_dir: str | None = None,
    progress: bool = False,
    **settings,
) -> np.ndarray:
    """(n, d) float32 L2-normalised tag-enhanced embeddings of ALL `texts`.

    The tagger, the domains and the fine-tune see only `train_rows`; the fine-tuned encoder
    then embeds every text. Extra keyword arguments set `FineTuneSettings` fields
    (n_domains, temperature, anchor_weight, learning_rate, batch_size, max_tokens, max_tags,
    train_layers).
    """
    known = set(FineTuneSettings.__dataclass_fields__) - {"epochs"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise RouteSimError(
            f"unknown fine-tune setting(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(known))}", field="tag_enhanced_embeddings",
        )
    return fine_tune(
        texts, eval_names, encoder=encoder, train_rows=train_rows, seed=seed,
        settings=FineTuneSettings(epochs=epochs, **settings),
        cache_dir=cache_dir, progress=progress,
    ).embeddings


def fine_tune(
    texts: Sequence[str],
    eval_names: Sequence[str] | None,
    *,
    encoder: EncoderSpec,
    train_rows: np.ndarray,
    seed: int,
    settings: FineTuneSettings = FineTuneSettings(),
    cache_dir: str | None = None,
    progress: bool = False,
    tagger: Tagger | None = None,
) -> FineTuneResult:
    """`tag_enhanced_embeddings` with explicit settings and a report of what happened.

    `tagger` replaces the default `KeyphraseTagger` (fitted here on the training questions);
    a given tagger is used as it is. The training queries' tags are part of the cache key,
    so whichever tagger gave them, other tags never reuse a fine-tune.
    """
    texts = [str(t) for t in texts]
    n = len(texts)
    train_rows = np.asarray(train_rows)
    if train_rows.size and (
        train_rows.dtype == bool or not np.issubdtype(train_rows.dtype, np.integer)
    ):
        raise RouteSimError(
            f"train_rows must be integer row indices, not {train_rows.dtype} values (for a "
            f"boolean mask pass np.flatnonzero(mask))", field="train_rows",
        )
    train_rows = train_rows.astype(np.int64).ravel()
    if cache_dir:  # one cache for everything this computes (tag embeddings included)
        encoder = encoder.model_copy(update={"cache_dir": cache_dir})
    if eval_names is not None and len(eval_names) != n:
        raise RouteSimError(
            f"eval_names has {len(eval_names)} entries for {n} texts", field="eval_names"
        )
    if train_rows.size == 0 or train_rows.min() < 0 or train_rows.max() >= n:
        raise RouteSimError(
            f"train_rows must be a non-empty set of row indices in [0, {n}); got "
            f"{train_rows.size} rows", field="train_rows",
        )
    questions = encoder_inputs(texts, train_rows)
    max_tokens = min(settings.max_tokens, token_limit(encoder))
    train_q = [questions[i] for i in train_rows]
    train_ev = None if eval_names is None else [str(eval_names[i]) for i in train_rows]
    if tagger is None:
        tagger = KeyphraseTagger(max_tags=settings.max_tags).fit(train_q)
    # Tagging is cheap next to the fine-tune, so the tags themselves key the cache.
    train_tags = tagger.tags(train_q, train_ev)
    identity = encoder_identity(encoder)
    weights_key = cache_key(
        "mixllm-tag-encoder", _ALGORITHM_VERSION, identity, asdict(settings), max_tokens, seed,
        texts_digest(train_q), texts_digest(train_ev or []),
        # the hashing encoder's idf depends on every text, so its weights do too
        texts_digest(questions) if encoder.kind == "hashing" else "",
        texts_digest(["\x1f".join(t) for t in train_tags]),
    )
    root = cache_root(encoder.cache_dir) / "mixllm_encoder"
    emb_path = root / f"{weights_key}-{cache_key(texts_digest(texts))}.npy"
    weights_dir = root / weights_key

    cached = load_array(emb_path, rows=n)
    if cached is not None:
        log.info("tag-enhanced embeddings read from cache %s", emb_path)
        return FineTuneResult(cached, None, 0.0, True, ())

    start = time.perf_counter()
    ss = np.random.SeedSequence(seed)
    domain_ss, order_ss = ss.spawn(2)
    if not any(train_tags):
        raise RouteSimError(
            f"the tagger gave none of the {train_rows.size} training queries a tag, so there "
            f"are no domains to fine-tune toward; give it texts with content words or set "
            f"tags: false", field="mixllm.params.tags",
        )

    torch = _import_torch(encoder)
    backbone = _backbone(encoder, questions, max_tokens, settings.train_layers)
    log.info("encoder ready (frozen layers run once): %.1f s", time.perf_counter() - start)
    domains = TagDomains.fit(train_tags, backbone.embed_texts, n_domains=settings.n_domains,
                             seed=domain_ss)
    labels = domains.assign(train_tags, backbone.embed_texts)
    log.info("tags clustered into %d domains: %.1f s", domains.n_domains,
             time.perf_counter() - start)
    losses: tuple[float, ...] = ()
    if backbone.load(weights_dir):
        log.info("fine-tuned encoder weights read from cache %s", weights_dir)
    else:
        losses = _train(
            torch, backbone, train_rows, labels, settings, np.random.default_rng(order_ss),
            progress,
        )
        backbone.save(weights_dir)
        log.info("trained %d epochs: %.1f s", settings.epochs, time.perf_counter() - start)
    out = backbone.embed_rows(np.arange(n), batch_size=encoder.batch_size, progress=progress)
    if not np.isfinite(out).all():  # never cache (or route on) a diverged fine-tune
        raise RouteSimError(
            f"the tag-enhanced fine-tune diverged (non-finite embeddings) with settings "
            f"{asdict(settings)}; lower learning_rate or raise temperature",
            field="mixllm.params.encoder",
        )
    save_array(emb_path, out)
    seconds = time.perf_counter() - start
    log.info("tag-enhanced encoder: %d training queries, %d domains, %.1f s",
             train_rows.size, domains.n_domains, seconds)
    return FineTuneResult(out, labels, seconds, False, losses)


def encoder_inputs(texts: Sequence[str], train_rows: np.ndarray) -> list[str]:
    """What the tag-enhanced encoder reads per query: its question (the last paragraph of a
    few-shot prompt) without the instruction lines most training questions share."""
    questions = [question_part(t) for t in texts]
    template = TemplateLines.fit([questions[i] for i in train_rows])
    return [template.strip(q) for q in questions]


# ----------------------------------------------------------------------------- training
def supcon_loss(torch, z, labels, temperature: float):
    """Supervised-contrastive loss of unit vectors `z` with domain `labels` (torch); a
    label below 0 (no domain) only ever appears in denominators."""
    b = z.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(eye, 0.0)
    # A query without a domain (NO_DOMAIN) is nobody's positive, not even another's like it.
    pos = (labels[:, None] == labels[None, :]) & ~eye & (labels >= 0)[:, None]
    n_pos = pos.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return z.sum() * 0.0
    per_query = -(log_prob * pos).sum(dim=1) / n_pos.clamp(min=1)
    return per_query[has_pos].mean()


def _train(torch, backbone, train_rows, labels, settings, rng, progress) -> tuple[float, ...]:
    with torch.enable_grad():
        params = [p for p in backbone.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.01)
        anchors = torch.from_numpy(backbone.base_embeddings(train_rows))
        label_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        lengths = backbone.lengths(train_rows)
        bs = min(settings.batch_size, train_rows.size)
        steps = max(1, train_rows.size // bs)  # drop the ragged last batch
        losses = []
        with progress_bar(progress, "tag-enhanced fine-tune", settings.epochs * steps) as adv:
            for _ in range(settings.epochs):
                total = 0.0
                for idx in _bucketed_batches(rng, lengths, bs, steps):
                    z = backbone.forward(train_rows[idx])
                    loss = supcon_loss(torch, z, label_t[idx], settings.temperature)
                    anchor = (1.0 - (z * anchors[idx]).sum(dim=1)).mean()
                    loss = loss + settings.anchor_weight * anchor
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    adv(1)
                losses.append(total / steps)
    return tuple(losses)


_BUCKET = 8  # batches per length bucket


def _bucketed_batches(rng, lengths: np.ndarray, bs: int, steps: int) -> list[np.ndarray]:
    """`steps` random batches of `bs` rows, rows of similar length batched together.

    Rows are shuffled, cut into buckets of `_BUCKET` batches, sorted by length inside a
    bucket and the batches shuffled again: about half the padding of plain random batches
    (few-shot questions are long, coding prompts short) while batches stay random.
    """
    perm = rng.permutation(len(lengths))[: steps * bs]
    batches = []
    for c in range(0, len(perm), bs * _BUCKET):
        chunk = perm[c : c + bs * _BUCKET]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ---------------------------------------------------------------------------- backbones
def _import_torch(encoder: EncoderSpec):
    if encoder.kind != "hashing":
        return import_torch_transformers()[0]
    try:
        import torch
    except ImportError:
        raise RouteSimError(
            f"tag-enhanced fine-tuning needs torch: {EMBED_INSTALL_HINT}",
            field="workload.encoder",
        ) from None
    return torch


def _backbone(encoder: EncoderSpec, questions: list[str], max_tokens: int, train_layers: int):
    if encoder.kind == "hashing":
        return _HashingBackbone(questions, encoder.dim, max_tokens)
    return _TransformerBackbone(encoder, questions, max_tokens, train_layers)


class _TransformerBackbone:
    """A BERT-family encoder over the inputs of all rows; only its top layers train.

    The bottom layers stay frozen, so their outputs are computed once for every row (one
    forward pass) and each training step runs just the top `train_layers` layers: several
    times cheaper than fine-tuning the whole stack, which is what makes ~3k queries fit in
    minutes on 2 CPU cores. A model whose layers are not reachable as `model.encoder.layer`
    (BERT, RoBERTa, MiniLM) is fine-tuned through its full forward pass instead.
    """

    def __init__(self, encoder: EncoderSpec, inputs: list[str], max_tokens: int,
                 train_layers: int):
        import torch

        self.encoder = encoder
        self.inputs = inputs
        self.max_tokens = max_tokens
        self.tokenizer, self.model = load_transformer(encoder.model_path)
        layers = _layer_stack(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if layers is None:
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.first_trained = None
            self.prefix: list | None = None
            self.base = self.embed_rows(np.arange(len(inputs)), batch_size=encoder.batch_size,
                                        progress=False)
            return
        self.first_trained = max(0, len(layers) - train_layers)
        for layer in layers[self.first_trained :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.prefix, self.base = self._prefix_states(torch)
        if not self._top_path_matches(torch):
            log.warning("cached-layer fine-tuning does not reproduce %s's forward pass; "
                        "fine-tuning through the full model instead", type(self.model).__name__)
            self.prefix = None

    def _prefix_states(self, torch) -> tuple[list, np.ndarray]:
        """Per row, the (tokens, d) output of the frozen layers (input of the first trained),
        and every row's embedding by the untouched encoder (the anchors), in one pass."""
        states: list = [None] * len(self.inputs)
        base = np.zeros((len(self.inputs), int(self.model.config.hidden_size)), np.float32)
        lengths = [len(t) for t in self.inputs]
        with torch.no_grad():
            for idx in length_sorted_batches(lengths, self.encoder.batch_size):
                enc = self._tokenize(idx)
                out = self.model(**enc, output_hidden_states=True)
                hidden = out.hidden_states[self.first_trained]
                keep = enc["attention_mask"].sum(dim=1).tolist()
                for j, i in enumerate(idx):
                    states[i] = hidden[j, : keep[j]].clone()
                pooled = mean_pool(out.last_hidden_state, enc["attention_mask"])
                base[idx] = torch.nn.functional.normalize(pooled, dim=1).numpy()
        return states, base

    def base_embeddings(self, rows: np.ndarray) -> np.ndarray:
        return self.base[rows]

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        if self.prefix is None:
            return np.array([len(self.inputs[i]) for i in rows])
        return np.array([len(self.prefix[i]) for i in rows])

    def _top_path_matches(self, torch) -> bool:
        rows = np.arange(min(4, len(self.inputs)))
        with torch.no_grad():
            enc = self._tokenize(rows)
            full = self.model(**enc).last_hidden_state
            ref = torch.nn.functional.normalize(mean_pool(full, enc["attention_mask"]), dim=1)
            return bool(torch.allclose(self.forward(rows), ref, atol=1e-4))

    def _tokenize(self, rows):
        return self.tokenizer(
            [self.inputs[i] for i in rows], padding=True, truncation=True,
            max_length=self.max_tokens, return_tensors="pt",
        )

    def parameters(self):
        return self.model.parameters()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Tags by the untouched encoder, through the embedding cache (tags are short)."""
        spec = self.encoder.model_copy(update={"max_tokens": _TAG_TOKENS})
        return encode_texts(texts, spec, progress=False)

    def embed_rows(self, rows: np.ndarray, *, batch_size: int, progress: bool) -> np.ndarray:
        import torch

        if self.prefix is None:
            return transformer_embed(
                self.tokenizer, self.model, [self.inputs[i] for i in rows],
                max_tokens=self.max_tokens, batch_size=batch_size, progress=progress,
                description="embedding with the tag-enhanced encoder",
            )
        out = np.zeros((len(rows), int(self.model.config.hidden_size)), dtype=np.float32)
        lengths = [len(self.prefix[i]) for i in rows]
        bar = progress_bar(progress, "embedding with the tag-enhanced encoder", len(rows))
        with bar as adv, torch.no_grad():
            for idx in length_sorted_batches(lengths, batch_size):
                out[idx] = self.forward(np.asarray(rows)[idx]).numpy()
                adv(len(idx))
        return out

    def forward(self, rows: np.ndarray):
        import torch

        if self.prefix is None:
            enc = self._tokenize(rows)
            hidden = self.model(**enc).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=1)
        seqs = [self.prefix[i] for i in rows]
        hidden = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        lengths = torch.tensor([len(x) for x in seqs])
        mask = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).to(hidden.dtype)
        # additive mask over keys, (batch, 1, 1, tokens): 0 keeps, a huge negative drops
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        for layer in _layer_stack(self.model)[self.first_trained :]:
            out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return torch.nn.functional.normalize(mean_pool(hidden, mask), dim=1)

    def save(self, weights_dir: Path) -> None:
        _atomic_dir(weights_dir, lambda tmp: self.model.save_pretrained(tmp))

    def load(self, weights_dir: Path) -> bool:
        if not (weights_dir / "config.json").is_file():
            return False
        import transformers

        try:
            tuned = transformers.AutoModel.from_pretrained(weights_dir, local_files_only=True)
            self.model.load_state_dict(tuned.state_dict())
        except Exception as exc:  # any damage to a cache means: compute again
            log.warning("ignoring unreadable cached encoder %s: %s", weights_dir, exc)
            return False
        return True


_TAG_TOKENS = 32


def _layer_stack(model):
    """The transformer blocks of a BERT-style model, or None for another layout."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return layers if layers is not None and len(layers) > 0 else None


class _HashingBackbone:
    """Hashing bag of words + a trainable linear map (identity at the start)."""

    def __init__(self, questions: list[str], dim: int, max_words: int):
        import torch

        self.dim, self.max_words = dim, max_words
        self.features = torch.from_numpy(hashing_embed(questions, dim=dim, max_words=max_words))
        # Built as the identity directly: a torch.nn.Linear would first draw random weights
        # from torch's global generator, moving its caller's random stream.
        self.weight = torch.nn.Parameter(torch.eye(dim))

    def parameters(self):
        return [self.weight]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return hashing_embed(texts, dim=self.dim, max_words=self.max_words)

    def base_embeddings(self, rows: np.ndarray) -> np.ndarray:
        return self.features[rows].numpy()

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        return np.ones(len(rows), dtype=np.int64)

    def embed_rows(self, rows: np.ndarray, *, batch_size: int, progress: bool) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.forward(rows).numpy().astype(np.float32)

    def forward(self, rows: np.ndarray):
        import torch

        return torch.nn.functional.normalize(self.features[rows] @ self.weight.T, dim=1)

    def save(self, weights_dir: Path) -> None:
        w = self.weight.detach().numpy()
        _atomic_dir(weights_dir, lambda tmp: np.save(Path(tmp) / "linear.npy", w))

    def load(self, weights_dir: Path) -> bool:
        import torch

        f = weights_dir / "linear.npy"
        if not f.is_file():
            return False
        try:
            w = np.load(f, allow_pickle=False)
        except Exception as exc:  # any damage to a cache means: compute again
            log.warning("ignoring unreadable cached encoder %s: %s", weights_dir, exc)
            return False
        if w.shape != (self.dim, self.dim) or not np.isfinite(w).all():
            return False
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(w))
        return True


def _atomic_dir(final: Path, write) -> None:
    """Fill a temp directory beside `final`, then rename it into place."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".tmp")
        try:
            write(tmp)
            if final.exists():  # another process finished first: keep its copy
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as exc:
        log.warning("could not cache fine-tuned encoder in %s: %s", final, exc)
