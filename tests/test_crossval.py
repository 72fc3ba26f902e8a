"""Cross-validated k-NN and linear probe against scikit-learn's own cross_val_score, and the paired bootstrap against
distributions worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from scdino.crossval import (
    bootstrap_differences,
    cross_validate,
    folds_of,
    merge_labels,
    oof_predictions,
    paired_comparison,
    parse_merge,
    probe_model,
    scores,
)
from scdino.errors import ConfigError


def _toy(n_per_class=(30, 25, 20), dims=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per_class), dims))
    y = np.concatenate([np.full(n, i) for i, n in enumerate(n_per_class)])
    x = centres[y] + rng.normal(scale=1.3, size=(len(y), dims))
    return x.astype(np.float32), y


def test_probe_folds_match_cross_val_score():
    x, y = _toy()
    splits = folds_of(y, 5, seed=3)
    pred = oof_predictions(x, y, splits, "probe")
    mine = [float((pred[te] == y[te]).mean()) for _, te in splits]
    theirs = cross_val_score(probe_model(), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=3))
    np.testing.assert_allclose(mine, theirs, atol=1e-12)


def test_knn_folds_match_cross_val_score_of_a_cosine_weighted_neighbours_classifier():
    x, y = _toy(seed=1)
    splits = folds_of(y, 4, seed=0)
    pred = oof_predictions(x, y, splits, "knn", k=10, temperature=0.07)
    mine = [float((pred[te] == y[te]).mean()) for _, te in splits]
    # the vote from its definition: cosine distance d = 1 - similarity, weight exp(similarity / T)
    sk = KNeighborsClassifier(10, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07))
    theirs = cross_val_score(sk, x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0))
    np.testing.assert_allclose(mine, theirs, atol=1e-12)
    assert 0.5 < np.mean(mine) < 1  # separable but not trivially so


def test_scores_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    s = scores(y, pred, ["a", "b", "c", "d"])
    assert s["top1"] == pytest.approx((pred == y).mean())
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["per_class_recall"]["c"] == pytest.approx((pred[y == 2] == 2).mean())


def test_bootstrap_of_four_cells_worked_out_by_hand():
    # two cells per class; A - B right per cell: [1, 0, 1, 0]. Resampling two cells within each class with
    # replacement, the number of "+1" cells drawn is Binomial(2, 1/2) per class, so top-1 A - B = S / 4 with
    # S ~ Binomial(4, 1/2): 0, .25, .5, .75, 1 with probability 1, 4, 6, 4, 1 sixteenths. Balanced accuracy is
    # (N0 / 2 + N1 / 2) / 2 = S / 4 too.
    y = np.array([0, 0, 1, 1])
    a = np.array([0, 0, 1, 0])
    b = np.array([1, 0, 0, 0])
    for name in ("top1", "balanced_accuracy"):
        d = bootstrap_differences(y, a, b, name, n_boot=40000, seed=1)
        freq = [np.mean(np.isclose(d, v)) for v in (0, 0.25, 0.5, 0.75, 1)]
        np.testing.assert_allclose(freq, np.array([1, 4, 6, 4, 1]) / 16, atol=0.01)
    c = paired_comparison(y, a, b, "A", "B", n_boot=40000, seed=1)
    # P(S = 0) = 1/16 > 2.5%: the interval reaches 0, so a lead of half the cells on four cells is no win
    assert c["top1"]["difference"] == 0.5
    assert (c["top1"]["low"], c["top1"]["high"]) == (0.0, 1.0)
    assert c["top1"]["verdict"] == "no difference shown"


def test_bootstrap_interval_of_a_clear_lead_is_the_binomial_quantiles():
    # 40 cells per class; A is right everywhere, B wrong on 10 cells of class 0: top-1 A - B = N / 80 with
    # N ~ Binomial(40, 1/4), so the 95% interval is its 2.5% and 97.5% quantiles over 80
    y = np.repeat([0, 1], 40)
    a = y.copy()
    b = y.copy()
    b[:10] = 1
    c = paired_comparison(y, a, b, "A", "B", n_boot=20000, seed=0)
    lo, hi = binom.ppf([0.025, 0.975], 40, 0.25) / 80
    assert c["top1"]["difference"] == pytest.approx(10 / 80)
    assert c["top1"]["low"] == pytest.approx(lo, abs=1 / 80 + 1e-9)
    assert c["top1"]["high"] == pytest.approx(hi, abs=1 / 80 + 1e-9)
    assert c["top1"]["verdict"] == "A beats B"
    # balanced: class 0's recall difference N / 40, class 1's 0, mean N / 80: the same distribution
    assert c["balanced_accuracy"]["verdict"] == "A beats B"
    swapped = paired_comparison(y, b, a, "B", "A", n_boot=2000, seed=0)
    assert swapped["top1"]["verdict"] == "A beats B"


def test_cross_validate_compares_feature_sets_on_the_same_cells_and_merges_classes():
    x, y = _toy((30, 25, 6, 5), seed=2)
    names = np.array(["G1", "S", "Ana", "Telo"], dtype=object)[y]
    noise = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    with pytest.raises(ConfigError, match="at least 6 cells per class; Telo \\(5\\)"):
        cross_validate({"signal": x, "noise": noise}, names, folds=6)
    cv = cross_validate({"signal": x, "noise": noise}, names, folds=5, n_boot=500, merge=parse_merge("Ana,Telo=late_M"))
    assert cv["classes"] == ["G1", "S", "late_M"] and cv["class_counts"]["late_M"] == 11
    for method in ("knn", "probe"):
        s = cv["scores"][method]["signal"]
        lo, hi = s["top1_interval"]
        assert lo <= s["top1"] <= hi
        (comp,) = cv["comparisons"][method]
        assert (comp["a"], comp["b"]) == ("signal", "noise")
        assert comp["top1"]["verdict"] == "signal beats noise"
        assert comp["top1"]["difference"] == pytest.approx(s["top1"] - cv["scores"][method]["noise"]["top1"])


def test_merge_refuses_a_class_no_cell_has():
    assert parse_merge("Anaphase,Telophase=late;G2=G2M") == {"Anaphase": "late", "Telophase": "late", "G2": "G2M"}
    with pytest.raises(ConfigError, match="Telophse, which no cell has"):
        merge_labels(np.array(["Anaphase", "Telophase"]), parse_merge("Anaphase,Telophse=late"))
    with pytest.raises(ConfigError, match="expected CLASS,CLASS=NEW"):
        parse_merge("Anaphase,Telophase")


def test_evaluate_settings_refuse_a_bad_merge_augmentation_or_fold_count():
    from scdino.engine.evaluate import EvalSettings

    EvalSettings(merge_classes="Anaphase,Telophase=late", tta="d8").validate()
    with pytest.raises(ConfigError, match="expected CLASS,CLASS=NEW"):
        EvalSettings(merge_classes="Anaphase").validate()
    with pytest.raises(ConfigError, match="--tta 'd4'"):
        EvalSettings(tta="d4").validate()
    with pytest.raises(ConfigError, match="--folds -1"):
        EvalSettings(folds=-1).validate()
    with pytest.raises(ConfigError, match="--bootstrap 10"):
        EvalSettings(bootstrap=10).validate()


def test_holdout_validate_scores_the_held_out_cells_as_scikit_learn_fit_on_the_training_cells():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from scdino.crossval import holdout_validate

    x, y = _toy((40, 30, 20), seed=4)
    names = np.array(["G1", "S", "M"])[y]
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), bool)
    test[rng.choice(len(y), 30, replace=False)] = True
    noise = rng.normal(size=x.shape).astype(np.float32)
    res = holdout_validate(
        {"signal": x[~test], "noise": noise[~test]},
        names[~test],
        {"signal": x[test], "noise": noise[test]},
        names[test],
        n_boot=300,
    )
    assert res["n_cells"] == 30 and res["n_train"] == len(y) - 30 and res["classes"] == ["G1", "M", "S"]
    truth = np.array([{"G1": 0, "M": 1, "S": 2}[v] for v in names[test]])
    sk = KNeighborsClassifier(20, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07))
    codes = np.array([{"G1": 0, "M": 1, "S": 2}[v] for v in names[~test]])
    knn = sk.fit(x[~test], codes).predict(x[test])
    scaler = StandardScaler().fit(x[~test])
    probe = LogisticRegression(max_iter=1000, random_state=0).fit(scaler.transform(x[~test]), codes)
    for method, pred in (("knn", knn), ("probe", probe.predict(scaler.transform(x[test])))):
        s = res["scores"][method]["signal"]
        assert s["top1"] == pytest.approx(float((pred == truth).mean()))
        assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
        assert s["top1_interval"][0] <= s["top1"] <= s["top1_interval"][1]
        assert res["predictions"][method]["signal"] == pred.tolist()
    c = res["comparisons"]["knn"][0]
    assert (c["a"], c["b"]) == ("signal", "noise") and c["top1"]["low"] > 0
    with pytest.raises(ConfigError, match="differ"):
        holdout_validate({"a": x}, names, {"b": x}, names)
    only_held = names[test].astype(object)
    only_held[0] = "Telophase"
    with pytest.raises(ConfigError, match="held-out classes Telophase have no training cells"):
        holdout_validate({"a": x[~test]}, names[~test], {"a": x[test]}, only_held)
    with pytest.raises(ConfigError, match="rows for 30 labelled held-out cells"):
        holdout_validate({"a": x[~test]}, names[~test], {"a": x}, names[test])
