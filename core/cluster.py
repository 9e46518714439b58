"""The cluster step: group classes into super-classes, the paper's "cat/dog → pet".

Two views of which classes resemble each other, both hierarchical (average linkage):
the classifier's weight rows (cosine distance; data-free) and the fp32 model's confusions on
the evaluation data (classes it mixes up are close). A cut of the tree gives K super-classes;
logits merged per super-class (logsumexp) then score every quantized model at that coarser level.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from bitsweep.errors import BitsweepError

MAX_AUTO_K = 20  # an automatic cut looks for at most this many super-classes


def weight_distances(weights: np.ndarray) -> np.ndarray:
    """Condensed cosine distances between the classifier's rows (one row per class)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or len(weights) < 2:
        raise BitsweepError(f"class clustering needs one weight row per class for 2+ classes, got shape "
                            f"{weights.shape}")
    return np.clip(pdist(weights, "cosine"), 0, 2)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> np.ndarray:
    """counts[i, j]: images of class i predicted as class j."""
    index = labels.long() * classes + predictions.long()
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes).numpy()


def confusion_distances(confusion: np.ndarray) -> np.ndarray:
    """Condensed distances 1 − m/max(m), m = (P(j|i) + P(i|j)) / 2: the more two classes are mixed up,
    the closer; the most confused pair is at 0 (a scale that leaves average linkage's tree unchanged)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    mutual = (rates + rates.T) / 2
    np.fill_diagonal(mutual, 0)
    return squareform(1 - mutual / max(mutual.max(), 1e-12), checks=False)


def tree(distances: np.ndarray) -> np.ndarray:
    """The average-linkage tree (scipy's linkage matrix) over condensed distances."""
    return linkage(distances, method="average")


def cut(linkage_matrix: np.ndarray, k: int) -> list[int]:
    """Super-class of each class for a cut into ``k`` groups, numbered by their smallest class."""
    raw = fcluster(linkage_matrix, t=k, criterion="maxclust")
    first = {}
    for cls, group in enumerate(raw):
        first.setdefault(group, len(first))
    return [first[group] for group in raw]


def choose_k(linkage_matrix: np.ndarray) -> int:
    """Where the tree has its largest jump in merge distance, cut there (2 .. MAX_AUTO_K groups).

    Tight groups merge low and distinct ones high; the biggest gap between consecutive merges
    separates the two, and, unlike silhouette scores, it lets a class that resembles no other
    stay a super-class of its own (Fashion-MNIST's bag).
    """
    heights = linkage_matrix[:, 2]
    classes = len(heights) + 1
    if classes <= 2:
        return classes
    # Cutting between merges i and i + 1 (0-based) leaves classes − i − 1 groups.
    candidates = [i for i in range(len(heights) - 1) if 2 <= classes - i - 1 <= MAX_AUTO_K]
    best = max(candidates, key=lambda i: (heights[i + 1] - heights[i], i))
    return classes - best - 1


def cluster_classes(distances: np.ndarray, k: int | None = None) -> dict:
    """Tree, cut and groups for one view: ``k`` super-classes, or ``choose_k``'s when None."""
    matrix = tree(distances)
    classes = len(matrix) + 1
    if k is not None and not 1 <= k <= classes:
        raise BitsweepError(f"clustering k={k} is outside 1..{classes} (the model has {classes} classes); "
                            "set clustering.k in flows.yaml within that range, or 'auto'")
    k = choose_k(matrix) if k is None else k
    groups = cut(matrix, k)
    # The tree is cut between the merges that leave k and k − 1 groups.
    heights = matrix[:, 2]
    threshold = float((heights[classes - k - 1] + heights[classes - k]) / 2) if 1 < k < classes else None
    return {"k": k, "groups": groups, "linkage": matrix.tolist(), "threshold": threshold}


def merge_logits(logits: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Super-class logits: logsumexp of each group's class logits (= log of its summed probability)."""
    groups_t = torch.as_tensor(groups)
    k = int(groups_t.max()) + 1
    return torch.stack([logits[:, groups_t == g].logsumexp(dim=1) for g in range(k)], dim=1)


def superclass_scores(logits: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor,
                      groups: list[int]) -> dict:
    """Super-class top-1 (percent, labelled data only) and agreement with fp32's super-class."""
    predicted = merge_logits(logits.double(), groups).argmax(1)
    scores = {"super_agreement": 100 * (predicted == merge_logits(reference.double(), groups).argmax(1))
              .double().mean().item()}
    if labels is not None:
        scores["super_top1"] = 100 * (predicted == torch.as_tensor(groups)[labels]).double().mean().item()
    return scores
