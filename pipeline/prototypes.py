"""Word-embedding prototypes, the word-frequency prior mu and caption representations z_t.

All three come from the frozen LLM and the captions alone, so they are computed
once and cached in ``<key>.h5``: ``prototypes`` (K x D, L2-normalised rows of the
input embedding matrix E), ``token_ids`` (K, the vocabulary ids of those rows),
``prior`` (K, sums to 1), ``texts`` (distinct caption strings of every split) and
``z_t`` (one L2-normalised row per text). The key hashes the LLM's weights, the
captions and the prototype settings.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.errors import CacheError, DatasetError, MismatchError, MissingInputError
from pipeline.config import PrototypesConfig
from pipeline.io import atomic_path, sha256_json
from pipeline.lms import LanguageModel, caption_prompt

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: the prior counts caption tokens as they follow the prompt


def prototypes_key(lm: LanguageModel, train_captions: list[str], all_texts: list[str], cfg: PrototypesConfig,
                   prompt: str) -> str:
    settings = {k: getattr(cfg, k) for k in ("subset", "prior", "temperature", "smoothing")}
    return sha256_json({"format": FORMAT_VERSION, "llm_weights": lm.weights_sha256, "train_captions": train_captions,
                        "texts": all_texts, "settings": settings, "prompt": caption_prompt(prompt)})


def special_ids(lm: LanguageModel) -> list[int]:
    ids = set(lm.tokenizer.all_special_ids)
    if lm.tokenizer.pad_token_id is not None:
        ids.add(lm.tokenizer.pad_token_id)
    return sorted(i for i in ids if i < lm.vocab_size)


def document_frequency(lm: LanguageModel, captions: list[str], prompt: str) -> np.ndarray:
    """(vocab,) number of training captions containing each token id, in the token forms training
    feeds: each caption tokenised after the prompt (its first word in the leading-space form)."""
    df = np.zeros(lm.vocab_size, dtype=np.float64)
    for ids in lm.caption_token_ids(captions, prompt):
        df[np.unique(np.asarray(ids, dtype=np.int64))] += 1
    return df


def released_prior(df: np.ndarray, token_ids: np.ndarray, pad_id: int | None, temperature: float) -> np.ndarray:
    """The authors' word distribution (park-jungin/vlap, commit f206b6c, "generate word distributions", and
    `(vocab_dist / 2.5e-1).softmax(dim=0)` in its Sinkhorn): the document frequency with the pad id's count
    zeroed, divided by its total, then a softmax at `temperature` over the prototype words. Nothing is zeroed
    after the softmax; it is nearly uniform (a word in every caption gets e^(1/temperature) times an unseen one's)."""
    freq = df.copy()
    if pad_id is not None:
        freq[pad_id] = 0.0
    freq = freq / freq.sum() if freq.sum() > 0 else freq
    logits = freq[token_ids] / temperature
    mu = np.exp(logits - logits.max())
    return mu / mu.sum()


def word_prior(df: np.ndarray, token_ids: np.ndarray, zeroed: list[int], cfg: PrototypesConfig,
               pad_id: int | None = None) -> np.ndarray:
    """mu over the prototype words: df^temperature (temperature < 1 flattens), special ids
    zeroed, plus additive smoothing so that no ordinary word has zero mass; or the authors' recipe
    (`released`), or uniform (special ids zeroed)."""
    if cfg.prior == "released":
        return released_prior(df, token_ids, pad_id, cfg.temperature)
    if cfg.prior == "uniform":
        mu = np.ones(len(token_ids))
    else:
        mu = df[token_ids] ** cfg.temperature
        mu = mu / mu.sum() if mu.sum() > 0 else np.ones(len(token_ids)) / len(token_ids)
        mu = mu + cfg.smoothing
    mu[np.isin(token_ids, zeroed)] = 0.0
    return mu / mu.sum()


@torch.inference_mode()
def caption_representations(lm: LanguageModel, texts: list[str], batch_size: int) -> np.ndarray:
    """z_t (T, D): L2-normalised masked mean of the LLM's last hidden states over each text's tokens."""
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="caption reps", unit="batch"):
        ids, mask = lm.tokenize(texts[i : i + batch_size])
        states = lm.text_states(ids, mask).float()  # (b, T, D)
        m = mask.unsqueeze(-1).float()
        out.append(F.normalize((states * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, lm.hidden_size), np.float32)


@dataclass
class Prototypes:
    path: Path
    key: str
    prototypes: torch.Tensor  # (K, D) L2-normalised
    token_ids: torch.Tensor  # (K,)
    prior: torch.Tensor  # (K,) sums to 1
    text_index: dict[str, int]  # caption text -> row of z_t
    z_t: torch.Tensor  # (T, D) L2-normalised
    attrs: dict

    def text_reps(self, texts: list[str]) -> torch.Tensor:
        return self.z_t[[self.text_index[t] for t in texts]]  # (B, D)


def build_prototypes(lm: LanguageModel, train_captions: list[str], all_texts: list[str], cfg: PrototypesConfig,
                     out_dir: Path, prompt: str) -> tuple[Path, bool]:
    """Write (or reuse) the prototypes file; returns (path, hit)."""
    all_texts = sorted(set(all_texts))
    key = prototypes_key(lm, train_captions, all_texts, cfg, prompt)
    path = Path(out_dir) / f"{key}.h5"
    if path.exists():
        log.info("prototypes: cache hit %s (nothing computed)", path.name)
        return path, True
    df = document_frequency(lm, train_captions, prompt)
    zeroed = special_ids(lm)
    if cfg.subset == "corpus":
        token_ids = np.array(sorted(set(np.flatnonzero(df)) - set(zeroed)), dtype=np.int64)
        if len(token_ids) == 0:
            raise DatasetError("prototypes.subset: corpus keeps no word (no training captions)")
    else:
        token_ids = np.arange(lm.vocab_size, dtype=np.int64)
    with torch.no_grad():
        E = F.normalize(lm.embedding_matrix.float(), dim=-1)[torch.from_numpy(token_ids).to(lm.device)].cpu().numpy()
    prior = word_prior(df, token_ids, zeroed, cfg, pad_id=lm.tokenizer.pad_token_id)
    z_t = caption_representations(lm, all_texts, cfg.batch_size)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("prototypes", data=E.astype(np.float32), track_times=False)
        f.create_dataset("token_ids", data=token_ids, track_times=False)
        f.create_dataset("prior", data=prior, track_times=False)
        f.create_dataset("texts", data=np.array(all_texts, dtype=object), dtype=h5py.string_dtype(), track_times=False)
        f.create_dataset("z_t", data=z_t.astype(np.float32), track_times=False)
        f.attrs["cache_key"] = key
        f.attrs["llm"] = lm.spec if not lm.spec.startswith("hf:") else "hf"
        f.attrs["llm_weights_sha256"] = lm.weights_sha256
        f.attrs["settings"] = json.dumps({k: getattr(cfg, k) for k in ("subset", "prior", "temperature", "smoothing")})
    log.info("prototypes: %d words, %d texts -> %s", len(token_ids), len(all_texts), path.name)
    return path, False


def load_prototypes(path: str | Path, device: torch.device = torch.device("cpu")) -> Prototypes:
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: prototypes cache not found (run the prototypes stage first)")
    try:
        with h5py.File(path, "r") as f:
            texts = [t.decode() for t in f["texts"][:]]
            return Prototypes(
                path=path,
                key=str(f.attrs["cache_key"]),
                prototypes=torch.from_numpy(f["prototypes"][:]).to(device),
                token_ids=torch.from_numpy(f["token_ids"][:]).to(device),
                prior=torch.from_numpy(f["prior"][:]).float().to(device),
                text_index={t: i for i, t in enumerate(texts)},
                z_t=torch.from_numpy(f["z_t"][:]).to(device),
                attrs=dict(f.attrs),
            )
    except (OSError, KeyError) as err:
        raise CacheError(f"{path}: not a readable prototypes cache ({err}); "
                         "run the prototypes stage again (dvc repro -f prototypes)") from None


def prototypes_file(prototypes_dir: Path) -> Path:
    index = Path(prototypes_dir) / "index.json"
    if not index.exists():
        raise MissingInputError(f"{index}: not found (run the prototypes stage first)")
    try:
        return Path(prototypes_dir) / json.loads(index.read_text())["file"]
    except (ValueError, KeyError, TypeError) as err:
        raise CacheError(f"{index}: damaged prototypes index ({type(err).__name__}: {err}); "
                         "run the prototypes stage again (dvc repro -f prototypes)") from None


def check_prototypes_match(protos: Prototypes, lm: LanguageModel) -> None:
    if protos.attrs.get("llm_weights_sha256") != lm.weights_sha256:
        raise MismatchError(f"{protos.path}: prototypes were built from another LLM than {lm.spec} (re-run the prototypes stage)")
