"""The label-leak attacks' scoring (experiments/label_leak.py) and one short run of both modes."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments.label_leak import (_Observed, auc, direction_scores, invert_update, leak_auc, least_energy, low_energy,
                                    mixing_coefficients, norm_scores, spectral_scores, summary, tail_weight, train)
from pockprop.runtime.private_backprop import Masker, mask


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 30)
        y[:2] = [0, 1]
        s = rng.integers(0, 5, 30).astype(float)  # many ties
        assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0 and auc([0.9, 0.2, 0.1], [1, 0, 0]) == 1.0
    assert auc([1.0, 1.0], [0, 1]) == 0.5
    assert leak_auc([0.9, 0.8, 0.1], [0, 0, 1]) == 1.0  # a reversed score leaks as much
    with pytest.raises(ValueError, match="both"):
        auc([1.0, 2.0], [1, 1])


def test_scores():
    v = np.array([[3.0, 4.0], [0.0, -2.0], [6.0, 8.0]])
    np.testing.assert_allclose(norm_scores(v), [5, 2, 10])
    np.testing.assert_allclose(direction_scores(v, 0), [1, -0.8, 1])
    s = spectral_scores(np.array([[0.0], [0.1], [-0.1], [0.05], [5.0]]))
    assert s.argmax() == 4  # the lone outlier scores highest


def test_least_energy_recovers_the_gradient_from_one_server_view():
    """The documented limit: the span of what one server receives contains g, and with large noise g is its
    least-energy direction."""
    g = np.random.default_rng(0).standard_normal((16, 8))
    guess = least_energy(mask(g, 2, seed=0).vectors)
    cos = abs(guess.ravel() @ g.ravel()) / np.linalg.norm(guess) / np.linalg.norm(g)
    assert cos > 0.99


def test_low_energy_candidates_and_the_oracle_pick():
    """With decoys, g is one of the m - 1 low-energy candidates: the oracle (labels in hand) always finds it,
    the least-energy attack only when g happens to be the smallest."""
    rng = np.random.default_rng(0)
    masker, obs, hits = Masker(4, decoys=True, seed=0), _Observed(), 0
    for _ in range(20):
        y = (rng.random(32) < 0.2).astype(np.int64)
        y[:2] = [1, 0]
        g = np.where(y[:, None] == 1, 5.0, 1.0) * (1 + 0.1 * rng.standard_normal((32, 6)))  # the norm gives y away
        vectors = masker(g).vectors
        candidates = low_energy(vectors)
        assert len(candidates) == 3 and all(abs(np.linalg.norm(c) - 1) < 1e-9 for c in candidates)
        hits += abs(least_energy(vectors).ravel() @ g.ravel()) / np.linalg.norm(g) > 0.9
        obs.add({}, y)  # the labels; the oracle adds its scores beside them
        obs.add_oracle("oracle", candidates, y)
    assert obs.aucs()["oracle"]["norm"] > 0.95
    assert 1 <= hits <= 12  # about one batch in three
    assert tail_weight(np.r_[np.full((9, 2), 1.0), [[5.0, 5.0]]]) > tail_weight(np.r_[np.full((9, 2), 1.0), [[0.2, 0.2]]])


def test_invert_update_recovers_per_sample_gradients_of_a_linear_layer():
    """The documented limit on the applied update: a linear layer's weight gradient is G^T X with X known."""
    rng = np.random.default_rng(0)
    G, X = rng.standard_normal((8, 3)), rng.standard_normal((8, 20))
    np.testing.assert_allclose(invert_update(G.T @ X, X), G, atol=1e-9)


def test_protected_training_equals_plain_and_hides_the_cut_gradient():
    # lr 0.1: at the experiment's 0.3 this net amplifies float rounding from step to step (docs/split.md)
    plain, private = train("plain", epochs=1, lr=0.1), train("private", m=2, epochs=1, lr=0.1)
    decoys = train("private", m=3, decoys=True, epochs=1, lr=0.1)
    for n, w in plain["middle"].items():
        np.testing.assert_allclose(private["middle"][n], w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(decoys["middle"][n], w, rtol=1e-4, atol=1e-5)
    assert private["accuracy"] == plain["accuracy"] == decoys["accuracy"]
    assert max(decoys["epochs"][0]["z0"].values()) < 0.65 and private["epochs"][0]["least-energy"]["norm"] > 0.9
    assert plain["epochs"][0]["g"]["norm"] > 0.9 and plain["epochs"][0]["g"]["direction"] > 0.9
    for name in ("z0", "z1", "z0+z1", "z0-z1"):
        assert max(private["epochs"][0][name].values()) < 0.65, name
    assert private["epochs"][0]["applied update, inverted"]["norm"] > 0.9  # the applied update is not protected
    assert private["server_backwards_per_step"] == 2 and private["bytes_up_per_step"] > 2 * plain["bytes_up_per_step"]


def test_mixing_coefficients_sum_to_one_per_feature():
    c = mixing_coefficients(3, 5, 2.0, np.random.default_rng(0))
    assert c.shape == (3, 5)
    np.testing.assert_allclose(c.sum(axis=0), 1.0, rtol=1e-12)
    assert np.abs(c - 1 / 3).max() > 0.5  # secret and far from the plain average


def test_summary_groups_what_the_server_received():
    row = {"z0": {"norm": 0.5, "direction": 0.52}, "z0-z1": {"norm": 0.55, "direction": 0.5},
           "least-energy": {"norm": 0.9}, "copy 1: h (forward)": {"norm": 0.7}, "update norm": 0.1}
    assert summary(row) == {"received vectors, their sums and differences": 0.55, "least-energy": 0.9,
                            "h (forward)": 0.7}
