"""Lexical router: TF-IDF word and character n-grams under a multinomial logistic regression.

Why a bag of n-grams next to a fine-tuned sentence encoder: many task cues are surface forms
(a template phrase, a question format, a citation style) that mean pooling blurs, and a linear
model learns them from every training record in seconds instead of from a few hundred in minutes.
On our dev splits it beats the fine-tuned encoder on in-pool top-1 and loses to it when the query's
own task is out of the pool; `ensemble` combines both (numbers in bench/RESULTS.md). scikit-learn
does the vectorising and the fitting; this module only stores and reloads them without pickles.

Artefact (`catalog.router_path("lexical")`), safetensors and JSON only:
    vocabulary.json       {"word": [term of column 0, ...], "char": [...]}
    lexical.safetensors   idf_word, idf_char, coef (T, F_word + F_char), intercept (T,)
    labels.json           the catalog keys in label order
    router.json           text_mode, T_cal, training facts
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..catalog import Catalog, CatalogError
from .probabilistic import ProbabilisticRouter, read_artefact, write_artefact

VOCABULARY_FILE = "vocabulary.json"
WEIGHTS_FILE = "lexical.safetensors"
# Word uni+bigrams carry template phrases, character 2-5-grams inside word boundaries carry
# formats, numbers and morphology; sublinear tf keeps long inputs from dominating.
VECTORIZERS = {"word": {"analyzer": "word", "ngram_range": (1, 2), "sublinear_tf": True},
               "char": {"analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True}}
FIT_LIMITS = {"word": {"max_features": 100_000}, "char": {"min_df": 2, "max_features": 200_000}}
DEFAULT_C = 10.0   # inverse L2 strength: weak regularisation, the features are many and sparse


class LexicalModel:
    """Fitted vectorisers plus a linear layer: logits = [tfidf_word(x), tfidf_char(x)] @ coef.T + intercept."""

    def __init__(self, vectorizers: dict, coef: np.ndarray, intercept: np.ndarray):
        self.vectorizers, self.coef, self.intercept = vectorizers, coef, intercept

    @classmethod
    def fit(cls, texts: list[str], labels: np.ndarray, n_labels: int, c: float = DEFAULT_C) -> LexicalModel:
        """Fit on `texts` with integer `labels` in [0, n_labels); every label must occur."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        vectorizers = {name: TfidfVectorizer(**params, **FIT_LIMITS[name]).fit(texts)
                       for name, params in VECTORIZERS.items()}
        clf = LogisticRegression(C=c, max_iter=2000).fit(_features(vectorizers, texts), labels)
        if list(clf.classes_) != list(range(n_labels)):
            raise ValueError(f"every label needs training texts; got labels {list(clf.classes_)} of {n_labels}")
        coef, intercept = clf.coef_, clf.intercept_
        if n_labels == 2:   # scikit-learn keeps one row for two classes: logit(1) - logit(0)
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        return cls(vectorizers, coef.astype(np.float32), intercept.astype(np.float32))

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits (N, T)."""
        return np.asarray(_features(self.vectorizers, texts) @ self.coef.T) + self.intercept

    def save(self, out: Path, labels: list[str], settings: dict) -> None:
        from safetensors.numpy import save_file

        write_artefact(out, labels, settings)
        vocab = {name: [t for t, _ in sorted(v.vocabulary_.items(), key=lambda kv: kv[1])]
                 for name, v in self.vectorizers.items()}
        (out / VOCABULARY_FILE).write_text(json.dumps(vocab, ensure_ascii=False))
        tensors = {f"idf_{name}": v.idf_.astype(np.float32) for name, v in self.vectorizers.items()}
        save_file({**tensors, "coef": np.ascontiguousarray(self.coef), "intercept": self.intercept},
                  str(out / WEIGHTS_FILE))

    @classmethod
    def load(cls, path: Path) -> LexicalModel:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        from sklearn.feature_extraction.text import TfidfVectorizer

        try:   # a truncated file, a missing entry, an idf that does not fit its vocabulary
            vocab = json.loads((path / VOCABULARY_FILE).read_text())
            tensors = load_file(str(path / WEIGHTS_FILE))
            vectorizers = {}
            for name, params in VECTORIZERS.items():
                v = TfidfVectorizer(**params, vocabulary={t: i for i, t in enumerate(vocab[name])})
                v.idf_ = tensors[f"idf_{name}"].astype(np.float64)
                vectorizers[name] = v
            n_features = sum(len(vocab[name]) for name in VECTORIZERS)
            coef, intercept = tensors["coef"], tensors["intercept"]
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise CatalogError(f"lexical {path}: unreadable artefact ({type(e).__name__}: {e})") from None
        if coef.ndim != 2 or coef.shape[1] != n_features:
            raise CatalogError(f"lexical {path}: weights of shape {coef.shape} for {n_features} terms")
        return cls(vectorizers, coef, intercept)


def _features(vectorizers: dict, texts: list[str]):
    """(N, F) sparse: the vectorisers' TF-IDF columns side by side."""
    from scipy.sparse import hstack

    return hstack([v.transform(texts) for v in vectorizers.values()]).tocsr()


class LexicalRouter(ProbabilisticRouter):
    """TF-IDF n-grams + logistic regression over the catalog's tasks; trains in seconds."""

    name = "lexical"
    artefacts = ("lexical",)

    def __init__(self, catalog: Catalog):
        path = catalog.router_path("lexical")   # CatalogError when the catalog has none
        labels, self.settings = read_artefact(path, "lexical")
        self.model = LexicalModel.load(path)
        if self.model.coef.shape[0] != len(labels):
            raise CatalogError(f"lexical {path}: {self.model.coef.shape[0]} weight rows for {len(labels)} labels")
        self.calibration = float(self.settings.get("calibration_temperature", 1.0))
        super().__init__(catalog, labels)

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.model.logits(texts) / self.calibration
