"""K-means representative selection (training/selection.py): real FAISS, real MiniLM, a real tiny Llama."""

from __future__ import annotations

import zlib
from collections import Counter

import faiss
import numpy as np
import pytest

from training.records import Record
from training.selection import embed_records, kmeans_representatives, select_representatives

faiss.omp_set_num_threads(1)  # PITFALLS: pin threads on the 2-core machine


def clustered(n_clusters=8, per_cluster=30, d=16, spread=1.0, sep=30.0, seed=0):
    """Well-separated Gaussian blobs: (x (n, d) float32, labels (n,)).

    Far apart on purpose: K-means can still settle in a local optimum (two centroids in one blob),
    and these tests are about what happens after clustering, not about initialisation luck.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d)) * sep
    x = np.concatenate([c + spread * rng.normal(size=(per_cluster, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(n_clusters), per_cluster)


def expected_nearest(x, labels, metric):
    """Per true cluster, the sample a perfect K-means would keep: nearest its cluster's centroid."""
    out = set()
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        pts = x[idx]
        if metric == "l2":
            out.add(int(idx[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))]))
        else:
            if metric == "cos":
                pts = pts / np.linalg.norm(pts, axis=1, keepdims=True)
            out.add(int(idx[np.argmax(pts @ pts.mean(0))]))
    return out


@pytest.mark.parametrize("metric", ["l2", "cos", "ip"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_representative_per_cluster_nearest_its_centroid(metric, seed):
    x, labels = clustered(seed=seed)
    if metric == "ip":  # IP clusters by direction only on the unit sphere (unnormalised, norms dominate)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    reps = kmeans_representatives(x, 8, metric, seed=seed)
    assert reps.dtype == np.int64 and len(reps) == 8
    assert sorted(labels[reps]) == list(range(8))  # one per cluster
    assert set(reps.tolist()) == expected_nearest(x, labels, metric)


def test_ip_keeps_fewest_on_unnormalised_embeddings():
    """Paper Figure 2 / §5.1: IP selects far fewer samples than L2 or COS."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 16)) * rng.lognormal(0, 0.5, size=(200, 1))).astype(np.float32)
    counts = {m: len(kmeans_representatives(x, 50, m)) for m in ("l2", "cos", "ip")}
    assert counts["l2"] == counts["cos"] == 50
    assert counts["ip"] < 40


def test_duplicates_collapse_so_fewer_than_k_survive():
    base = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    x = np.tile(base, (4, 1))  # 12 rows, 3 distinct, first occurrences at 0, 1, 2
    for metric in ("l2", "cos", "ip"):
        reps = kmeans_representatives(x, 5, metric)
        assert sorted(reps.tolist()) == [0, 1, 2], metric


def test_k_is_capped_at_n_and_results_are_deterministic():
    x, _ = clustered(n_clusters=2, per_cluster=5)
    assert sorted(kmeans_representatives(x, 100, "l2").tolist()) == list(range(10))
    y, _ = clustered(seed=3)
    a, b = kmeans_representatives(y, 12, "cos", seed=7), kmeans_representatives(y, 12, "cos", seed=7)
    assert np.array_equal(a, b) and len(set(a.tolist())) == len(a)
    assert len(kmeans_representatives(np.zeros((0, 4), np.float32), 3, "l2")) == 0


def test_bad_arguments_raise():
    x, _ = clustered()
    with pytest.raises(ValueError, match="metric"):
        kmeans_representatives(x, 3, "manhattan")
    with pytest.raises(ValueError, match="k must"):
        kmeans_representatives(x, 0, "l2")
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans_representatives(x, 3, "l2")


# ---- select_representatives ---------------------------------------------------------------------

class TableEncoder:
    """A deterministic stand-in for routing.encoder: text 'g<i>-...' embeds near direction i."""

    dim = 32

    def encode(self, texts, batch_size=64, progress=False):
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, t in enumerate(texts):
            group = int(t.split("-")[0][1:])
            rng = np.random.default_rng(zlib.crc32(t.encode()))
            out[row, group] = 10.0
            out[row] += 0.1 * rng.normal(size=self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def rec(domain, task, text, output="y"):
    return Record("do it", text, output, domain, task)


def tiny_tasks():
    """fin/a: 3 groups x 3 texts; legal/b: 4 groups x 2 texts; med/c: 3 records, 1 distinct text (dupes)."""
    a = [rec("fin", "a", f"g{g}-a{i}") for g in range(3) for i in range(3)]
    b = [rec("legal", "b", f"g{10 + g}-b{i}") for g in range(4) for i in range(2)]
    c = [rec("med", "c", "g20-same", output=f"out{i}") for i in range(3)]
    return a + b + c


def test_select_balances_reports_and_keeps_first_duplicate():
    records = tiny_tasks()
    enc = TableEncoder()
    # per_task=4: fin/a has 3 clusters of 9 texts (k=4 still gives 4 distinct reps), legal/b 4,
    # med/c a single distinct text -> 1 survivor. Floor ceil(4/2)=2: common count 2, med/c short.
    reps, report = select_representatives(records, 4, encoder=enc, progress=False)
    assert report == {
        "fin/a": {"records": 9, "requested": 4, "k": 4, "survivors": 4, "kept": 2},
        "legal/b": {"records": 8, "requested": 4, "k": 4, "survivors": 4, "kept": 2},
        "med/c": {"records": 3, "requested": 4, "k": 1, "survivors": 1, "kept": 1},
    }
    assert Counter(r.key for r in reps) == {"fin/a": 2, "legal/b": 2, "med/c": 1}
    assert [r.output for r in reps if r.key == "med/c"] == ["out0"]  # the first duplicate is kept
    assert len(set(reps)) == len(reps)
    # legal/b's 4 survivors are one per group (k == number of groups)
    _, full = select_representatives(records, 4, encoder=enc, progress=False, balance=False)
    assert {k: v["kept"] for k, v in full.items()} == {"fin/a": 4, "legal/b": 4, "med/c": 1}
    # strict paper balancing: every task cut to the fewest survivors
    strict, rep = select_representatives(records, 4, encoder=enc, progress=False, min_per_task=0)
    assert Counter(r.key for r in strict) == {"fin/a": 1, "legal/b": 1, "med/c": 1}
    # with a larger floor nobody is cut below 3
    _, rep = select_representatives(records, 4, encoder=enc, progress=False, min_per_task=3)
    assert {k: v["kept"] for k, v in rep.items()} == {"fin/a": 3, "legal/b": 3, "med/c": 1}


def test_select_one_per_cluster_when_k_matches():
    records = tiny_tasks()
    reps, report = select_representatives(records, 3, encoder=TableEncoder(), progress=False, balance=False)
    assert report["fin/a"]["survivors"] == 3
    assert sorted(r.input.split("-")[0] for r in reps if r.key == "fin/a") == ["g0", "g1", "g2"]


def test_select_shuffles_deterministically():
    records = tiny_tasks()
    kw = dict(encoder=TableEncoder(), progress=False, balance=False)
    first, _ = select_representatives(records, 4, seed=0, **kw)
    again, _ = select_representatives(list(records), 4, seed=0, **kw)
    other, _ = select_representatives(records, 4, seed=1, **kw)
    assert first == again
    assert first != other
    assert [r.key for r in first] != sorted(r.key for r in first)  # mixed across tasks, not grouped


def test_select_rejects_bad_arguments():
    with pytest.raises(ValueError, match="per_task"):
        select_representatives(tiny_tasks(), 0, encoder=TableEncoder(), progress=False)
    with pytest.raises(ValueError, match="base_model_path"):
        select_representatives(tiny_tasks(), 2, how="base-embeddings", progress=False)


def test_select_with_the_real_encoder():
    texts = {
        ("fin", "sentiment"): ["Shares of Acme jumped 12% after earnings.", "Stocks fell sharply on rate fears.",
                               "Profit warning sends Globex lower.", "Shares of Acme jumped 12% after earnings."],
        ("med", "qa"): ["What are the symptoms of anemia?", "How is type 2 diabetes treated?",
                        "Can ibuprofen cause stomach ulcers?"],
    }
    records = [rec(d, t, x) for (d, t), xs in texts.items() for x in xs]
    reps, report = select_representatives(records, 3, progress=False)  # default: MiniLM, no prefix, cos
    assert report["fin/sentiment"]["k"] == 3 and report["fin/sentiment"]["survivors"] == 3
    assert report["med/qa"]["survivors"] == 3
    assert len(reps) == 6 and len({r.input for r in reps}) == 6


# ---- base-embeddings: the base LLM's embedding layer ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 1-layer Llama and a WordLevel tokenizer over a small vocabulary, saved as a HF directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "[PAD] [UNK] [BOS] [EOS] the cat dog sat ran on mat fast stock rose fell bank loan".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                         eos_token_id=3))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.get_input_embeddings().weight.detach().numpy().copy(), {w: i for i, w in enumerate(words)}


def test_base_embeddings_are_token_means_of_the_embedding_layer(tiny_llama):
    path, weight, vocab = tiny_llama
    texts = ["the cat sat on the mat", "stock rose", "bank loan fell fast", "zebra cat"]  # zebra -> [UNK]
    records = [rec("fin", "a", t) for t in texts]
    emb = embed_records(records, "base-embeddings", base_model_path=path, batch_size=3)  # 2 batches
    assert emb.shape == (4, 16) and emb.dtype == np.float32
    for row, t in zip(emb, texts):
        ids = [vocab.get(w, vocab["[UNK]"]) for w in t.split()]  # no [BOS]: special tokens are not added
        np.testing.assert_allclose(row, weight[ids].mean(0), rtol=1e-5, atol=1e-6)


def test_select_with_base_embeddings(tiny_llama):
    path, _, _ = tiny_llama
    # word order does not change a mean of token embeddings: fin/a has 5 texts but 2 distinct embeddings
    fin = ["stock rose", "rose stock", "bank loan", "loan bank", "stock rose"]
    pets = ["the cat sat", "the dog ran", "cat on mat", "dog sat on the mat"]
    records = [rec("fin", "a", t) for t in fin] + [rec("pets", "b", t) for t in pets]
    for metric in ("l2", "ip", "cos"):
        reps, report = select_representatives(records, 3, how="base-embeddings", metric=metric,
                                              base_model_path=path, progress=False, min_per_task=0)
        assert report["fin/a"]["k"] == 2 and report["fin/a"]["survivors"] <= 2, metric
        assert report["pets/b"]["k"] == 3, metric
        common = min(v["survivors"] for v in report.values())
        assert all(v["kept"] == common for v in report.values())
        assert len(reps) == 2 * common
    reps, report = select_representatives(records, 3, how="base-embeddings", metric="l2",
                                          base_model_path=path, progress=False, balance=False)
    assert report["fin/a"]["survivors"] == 2 and report["pets/b"]["survivors"] == 3
    assert {r.input for r in reps if r.key == "fin/a"} == {"stock rose", "bank loan"}  # first occurrences
