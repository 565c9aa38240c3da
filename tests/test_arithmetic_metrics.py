import itertools

import numpy as np
import pytest

from pipeline.tasks.arithmetic_metrics import nearest_neighbours, swap_accuracy

COLOURS = ["red", "green", "blue"]
SHAPES = ["circle", "square", "triangle"]


def _basis(seed: int = 0, dim: int = 16) -> dict[str, np.ndarray]:
    # Orthonormal word vectors (one per colour and shape) in a random orientation.
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return {w: q[:, i] for i, w in enumerate(COLOURS + SHAPES)}


def _colour_swap_run(gallery_attrs: list[dict]) -> float:
    """Every gallery image as source, every other colour as word_b; returns swap accuracy."""
    e = _basis()
    gallery = np.stack([e[a["color"]] + e[a["shape"]] for a in gallery_attrs])  # (G, D)
    queries, sources, targets = [], [], []
    for i, src in enumerate(gallery_attrs):
        for b in COLOURS:
            if b != src["color"]:
                queries.append(gallery[i] - e[src["color"]] + e[b])
                sources.append(i)
                targets.append({**src, "color": b})
    nn = nearest_neighbours(np.stack(queries), gallery, exclude=np.array(sources))
    return swap_accuracy([gallery_attrs[j] for j in nn], targets, "color")


ALL_IMAGES = [{"color": c, "shape": s} for c, s in itertools.product(COLOURS, SHAPES)]


def test_exact_arithmetic_gives_full_accuracy():
    # source - colour_a + colour_b lands exactly on the colour_b image with the same shape.
    assert _colour_swap_run(ALL_IMAGES) == 1.0


def test_missing_target_image_gives_hand_computed_fraction():
    # Without a green triangle, 8 sources x 2 colours = 16 queries; the two asking for a
    # green triangle (from red and blue triangle) must fail: 14 / 16.
    gallery = [a for a in ALL_IMAGES if a != {"color": "green", "shape": "triangle"}]
    assert _colour_swap_run(gallery) == pytest.approx(14 / 16)


def test_nearest_neighbours_is_cosine_and_honours_exclude():
    gallery = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0]])
    queries = np.array([[2.0, 0.0], [2.0, 0.0]])
    # Cosine ignores the length of gallery row 1; row 0 is the exact direction.
    np.testing.assert_array_equal(nearest_neighbours(queries, gallery), [0, 0])
    np.testing.assert_array_equal(nearest_neighbours(queries, gallery, exclude=np.array([0, 1])), [1, 0])


def test_nearest_neighbours_rejects_zero_vectors():
    with pytest.raises(ValueError, match="queries row 0"):
        nearest_neighbours(np.zeros((1, 2)), np.eye(2))


def test_swap_accuracy_needs_changed_and_kept_attributes():
    target = {"color": "blue", "shape": "circle"}
    retrieved = [
        {"color": "blue", "shape": "circle", "image_id": 7},  # hit (extra keys ignored)
        {"color": "blue", "shape": "square"},  # right colour, lost the shape
        {"color": "red", "shape": "circle"},  # kept the shape, colour unchanged
        {"color": "blue", "shape": "circle"},  # hit
    ]
    assert swap_accuracy(retrieved, [target] * 4, "color") == 0.5
    with pytest.raises(ValueError, match="no attribute 'size'"):
        swap_accuracy(retrieved, [target] * 4, "size")
    with pytest.raises(ValueError):
        swap_accuracy(retrieved, [target], "color")
