"""τ calibrated to the encoder and the catalog: leave-one-out fit, recorded, used by the centroid router."""

import numpy as np
import pytest

from routing.calibration import CALIBRATION_KEY, GRID, fit_centroid_temperature, leave_one_out_scores
from routing.catalog import Catalog, derive_catalog
from routing.decision import RouteRequest, softmax
from routing.routers import make_router
from routing.task_index import TaskIndex, normalise
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records


def test_leave_one_out_scores_match_centroids_recomputed_without_the_sample():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 5)).astype(np.float32)
    keys = ["a/x"] * 5 + ["b/y"] * 4 + ["c/z"] * 3
    index = TaskIndex.from_embeddings(emb, keys)
    z = leave_one_out_scores(index)
    x = normalise(emb.astype(np.float64))
    for n in range(len(x)):
        for t in range(3):
            rows = [m for m in range(len(x)) if index.labels[m] == t and m != n]
            centroid = normalise(x[rows].mean(axis=0, keepdims=True))[0]
            assert z[n, t] == pytest.approx(float(x[n] @ centroid), abs=1e-6)


def test_fit_is_sharp_for_separated_tasks_and_softer_when_they_overlap():
    rng = np.random.default_rng(1)
    centres = np.eye(3, 8) * 10
    separated = TaskIndex.from_embeddings(np.repeat(centres, 10, 0) + rng.normal(size=(30, 8)),
                                          [k for k in ("a/x", "b/y", "c/z") for _ in range(10)])
    assert fit_centroid_temperature(separated) == pytest.approx(GRID[0])   # never wrong: weigh the top alone
    overlapping = TaskIndex.from_embeddings(np.repeat(centres / 10, 10, 0) + rng.normal(size=(30, 8)),
                                            [k for k in ("a/x", "b/y", "c/z") for _ in range(10)])
    t = fit_centroid_temperature(overlapping)
    assert GRID[0] < t < GRID[-1]
    z = leave_one_out_scores(overlapping)   # the fitted T is the NLL minimum, within the grid's resolution
    nll = lambda temp: -np.mean(np.log(softmax(z, temp)[np.arange(len(z)), overlapping.labels]))  # noqa: E731
    assert nll(t) <= min(nll(t * 1.1), nll(t / 1.1)) + 1e-9


def test_calibrated_catalog_weighs_by_t_cal_and_the_paper_rule_is_one_flag_away(tmp_path, encoder):
    val = demo_records("val")
    calibrated = build_catalog(val, tmp_path / "cal")
    paper = build_catalog(val, tmp_path / "paper", calibrate_tau=False)
    t_cal = calibrated.calibration[CALIBRATION_KEY]
    assert paper.calibration == {} and 0 < t_cal < 0.2
    assert Catalog.load(calibrated.root).calibration == calibrated.calibration   # recorded, reloaded
    query = "Shares of Northwind Traders (NWTR) slumped after the earnings call."
    emb = encoder.encode([query])[0]
    for tau in (0.2, 0.05, 1.0):
        request = RouteRequest(query, top_k=3, temperature=tau, embedding=emb)
        cal, raw = (make_router("centroid", c).route([request])[0] for c in (calibrated, paper))
        assert [k for k, _ in cal.tasks] == [k for k, _ in raw.tasks]
        assert np.allclose([w for _, w in raw.tasks], softmax(np.array(raw.scores), tau))
        assert np.allclose([w for _, w in cal.tasks], softmax(np.array(cal.scores), t_cal * tau / 0.2))
    # A new index (fewer tasks) gets a calibration refitted to it; an uncalibrated catalog stays so.
    fewer = [r for r in val if r.domain != "med"]
    from training.catalog_build import build_index

    index = build_index(fewer, "input", None, encoder)
    tasks = {k: t for k, t in calibrated.tasks.items() if not k.startswith("med/")}
    derived = derive_catalog(calibrated, tmp_path / "derived", tasks=tasks, index=index)
    assert derived.calibration == {CALIBRATION_KEY: round(fit_centroid_temperature(index), 6)}
    assert derive_catalog(paper, tmp_path / "derived-paper", tasks=tasks, index=index).calibration == {}
