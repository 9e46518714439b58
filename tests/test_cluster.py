"""Class clustering: planted hierarchies are recovered, super-class scores are what they claim."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import squareform

from bitsweep.cluster import (
    cluster_classes,
    confusion_distances,
    confusion_matrix,
    merge_logits,
    superclass_scores,
    weight_distances,
)
from bitsweep.errors import BitsweepError

# Classes 0..9 planted in five super-classes, interleaved so the order says nothing.
PLANTED = [0, 1, 0, 2, 0, 3, 0, 3, 4, 3]


def planted_weights(seed: int, noise: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(PLANTED) + 1, 64))
    return centres[PLANTED] + noise * rng.normal(size=(len(PLANTED), 64))


@pytest.mark.parametrize("seed", range(5))
def test_planted_hierarchy_is_recovered_exactly(seed):
    found = cluster_classes(weight_distances(planted_weights(seed)), k=5)
    assert found["groups"] == PLANTED  # groups are numbered by their smallest class, as PLANTED is
    auto = cluster_classes(weight_distances(planted_weights(seed)))
    assert auto["k"] == 5 and auto["groups"] == PLANTED


def test_cut_threshold_separates_the_chosen_groups():
    found = cluster_classes(weight_distances(planted_weights(0)), k=5)
    heights = np.array(found["linkage"])[:, 2]
    assert (heights < found["threshold"]).sum() == len(PLANTED) - 5  # merges below the line join within groups


def test_confusion_distances_follow_mutual_confusion():
    counts = np.array([[90, 10, 0], [30, 70, 0], [0, 5, 95]])
    square = squareform(confusion_distances(counts))
    most = (0.10 + 0.30) / 2
    assert square[0, 1] == 0.0
    assert square[1, 2] == pytest.approx(1 - (0.0 + 0.05) / 2 / most)
    assert square[0, 2] == 1.0
    labels = torch.tensor([0, 0, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0])
    assert confusion_matrix(predictions, labels, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_merged_logits_are_log_summed_probabilities():
    logits = torch.randn(6, 5, dtype=torch.float64)
    groups = [0, 1, 0, 2, 1]
    merged = merge_logits(logits, groups)
    probabilities = logits.softmax(1)
    for g in range(3):
        summed = probabilities[:, [c for c, h in enumerate(groups) if h == g]].sum(1)
        assert torch.allclose(merged.softmax(1)[:, g], summed)


def test_superclass_scores_forgive_confusions_inside_a_group():
    groups = [0, 0, 1]
    reference = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]])
    logits = torch.tensor([[0.0, 5, 0], [5, 0, 0], [0, 0, 5], [0, 0, 5]])  # swaps inside group 0, one real error
    labels = torch.tensor([0, 1, 2, 0])
    scores = superclass_scores(logits, labels, reference, groups)
    assert scores == {"super_agreement": 75.0, "super_top1": 75.0}
    assert superclass_scores(logits, None, reference, groups) == {"super_agreement": 75.0}


def test_bad_k_is_one_clear_error():
    with pytest.raises(BitsweepError, match=r"k=11 is outside 1..10.*clustering.k"):
        cluster_classes(weight_distances(planted_weights(0)), k=11)
    with pytest.raises(BitsweepError, match="one weight row per class"):
        weight_distances(np.ones((1, 4)))
