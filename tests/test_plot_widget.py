import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from utils_cv.similarity import data, plot, widget


def test_plot_neighbors_marks_correct_neighbours(image_folder):
    paths, labels = data.list_images(image_folder)
    ax = plot.plot_neighbors(paths[0], paths[1:4], [0.1, 0.2, 0.3], labels[0], labels[1:4])
    frames = [p for p in ax.patches]
    assert len(frames) == 3
    colors = [matplotlib.colors.to_hex(p.get_edgecolor()) for p in frames]
    expected = ["#2ca02c" if l == labels[0] else "#d62728" for l in labels[1:4]]
    assert colors == expected
    assert len(ax.images) == 4
    assert "0.200" in [t.get_text().split("\n")[0] for t in ax.texts]
    with pytest.raises(ValueError, match="distances"):
        plot.plot_neighbors(paths[0], paths[1:4], [0.1])


def test_rank_distribution_and_recall_curves_return_axes():
    ranks = np.array([1, 1, 2, 5, 40])
    ax = plot.plot_rank_distribution(ranks, num_negatives=99)
    assert ax.get_xlabel().startswith("rank") and "median 2" in " ".join(t.get_text() for t in ax.texts)
    ax = plot.plot_recall_at_k({"imagenet": {"recall@1": 0.5, "recall@2": 0.7, "map": 0.3}, "sets": ranks}, max_k=8)
    lines = ax.get_lines()
    assert [l.get_label() for l in lines] == ["imagenet", "sets"]
    assert list(lines[0].get_xdata()) == [1, 2] and list(lines[0].get_ydata()) == [0.5, 0.7]
    assert lines[1].get_ydata()[0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="empty"):
        plot.plot_recall_at_k({})


def test_neighbor_browser_follows_the_query(image_folder):
    paths, labels = data.list_images(image_folder)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(paths), 4)).astype(np.float32)
    browser = widget.NeighborBrowser(paths, feats, labels, k=3)
    assert browser.shown == 0
    browser.slider.value = 5
    assert browser.query.value == 5 and browser.shown == 5
    d, idx = browser.neighbors(5)
    assert 5 not in idx and np.all(np.diff(d) >= 0)
    browser.query.value = 2
    assert browser.slider.value == 2 and browser.shown == 2
    with pytest.raises(ValueError, match="'labels'"):
        widget.NeighborBrowser(paths, feats, labels[:3])


def test_training_log_plot_marks_the_best_epoch():
    log = [{"epoch": 0, "map@r": 0.5}, {"epoch": 1, "train_loss": 2.0, "valid_loss": 1.5, "map@r": 0.7},
           {"epoch": 2, "train_loss": 1.0, "valid_loss": 1.2, "map@r": 0.6}]
    ax = plot.plot_training_log(log)
    assert [l.get_label() for l in ax.get_lines()] == ["train loss", "valid loss"]
    twin = ax.figure.axes[-1]
    assert twin is not ax and not hasattr(ax, "twin"), "the Axes given back is not changed"
    line = twin.get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 2] and list(line.get_ydata()) == [0.5, 0.7, 0.6]
    assert twin.collections[0].get_offsets().tolist() == [[1.0, 0.7]]
    with pytest.raises(ValueError, match="empty"):
        plot.plot_training_log([])


def test_recall_vs_speed_plot_draws_one_line_per_backend_sorted_by_speed():
    rows = [{"backend": "hnsw", "qps": 900.0, "recall@10": 0.99}, {"backend": "hnsw", "qps": 5000.0, "recall@10": 0.8},
            {"backend": "ivfpq", "qps": 3000.0, "recall@10": 0.95}, {"backend": "exact", "qps": 100.0, "recall@10": 1.0}]
    ax = plot.plot_recall_vs_speed(rows, target=0.9)
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(lines) == {"hnsw", "ivfpq", "exact", "target 0.9"}
    assert list(lines["hnsw"].get_xdata()) == [900.0, 5000.0] and list(lines["hnsw"].get_ydata()) == [0.99, 0.8]
    assert ax.get_xscale() == "log"
    with pytest.raises(ValueError, match="recall@5"):
        plot.plot_recall_vs_speed(rows, k=5)
    with pytest.raises(ValueError, match="empty"):
        plot.plot_recall_vs_speed([])


def test_class_examples_grid_has_one_labelled_row_per_class(image_folder):
    paths, labels = data.list_images(image_folder)
    ax = plot.plot_class_examples(paths, labels, per_class=3, thumb_size=32)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["circles (4)", "squares (4)", "stripes (4)"]
    grid = ax.images[0].get_array()
    assert grid.shape == (3 * 32, 3 * 32, 3)
    assert (np.asarray(grid)[:32, :32] != 255).any(), "thumbnails are drawn"
    with pytest.raises(ValueError, match="'per_class'"):
        plot.plot_class_examples(paths, labels, per_class=0)
