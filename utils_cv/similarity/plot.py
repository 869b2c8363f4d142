"""Plots for image similarity. Each function takes ``ax=None`` and returns the Axes it drew on."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from utils_cv.similarity.data import load_image
from utils_cv.similarity._checks import positive_int

__all__ = ["save_figure", "plot_search_results", "plot_class_examples", "plot_duplicate_groups", "plot_neighbors", "plot_rank_distribution", "plot_recall_at_k",
           "plot_recall_vs_speed", "plot_training_log"]


def _thumb(path, size: int) -> np.ndarray:
    """A square thumbnail of a file, a PIL image or an (H, W, 3) uint8 RGB array."""
    from PIL import Image

    if isinstance(path, Image.Image):
        im = path.convert("RGB")
    elif isinstance(path, np.ndarray):
        im = Image.fromarray(path).convert("RGB")
    else:
        im = load_image(path)
    im.thumbnail((size, size))
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    arr = np.asarray(im)
    y, x = (size - arr.shape[0]) // 2, (size - arr.shape[1]) // 2
    canvas[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
    return canvas


def plot_neighbors(
    query_path,
    neighbor_paths: Sequence,
    distances: Sequence[float],
    query_label: str | None = None,
    neighbor_labels: Sequence[str] | None = None,
    ax=None,
    thumb_size: int = 128,
):
    """A query image followed by its nearest neighbours on one Axes.

    ``query_path`` may also be an in-memory image (PIL or RGB array), e.g. a camera frame.

    Each neighbour is captioned with its distance and label; when labels are given, a green
    frame marks a neighbour of the query's class and a red frame one of another class.

    Returns:
        The matplotlib Axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    k = len(neighbor_paths)
    if len(distances) != k:
        raise ValueError(f"'distances' has {len(distances)} values for {k} neighbours.")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 * (k + 1), 2.2))
    gap = thumb_size // 8
    step = thumb_size + gap
    items = [(query_path, "query" + (f"\n{query_label}" if query_label else ""), None)]
    for i, (p, d) in enumerate(zip(neighbor_paths, distances)):
        label = neighbor_labels[i] if neighbor_labels is not None else None
        caption = f"{d:.3f}" + (f"\n{label}" if label else "")
        ok = None if label is None or query_label is None else label == query_label
        items.append((p, caption, ok))
    for i, (p, caption, ok) in enumerate(items):
        x0 = i * step + (gap if i else 0)
        ax.imshow(_thumb(p, thumb_size), extent=(x0, x0 + thumb_size, thumb_size, 0))
        if ok is not None:
            ax.add_patch(Rectangle((x0, 0), thumb_size, thumb_size, fill=False, lw=3,
                                   edgecolor="tab:green" if ok else "tab:red"))
        ax.text(x0 + thumb_size / 2, thumb_size + 4, caption, ha="center", va="top", fontsize=8)
    ax.set_xlim(-2, len(items) * step + gap)
    ax.set_ylim(thumb_size + 40, -2)
    ax.set_axis_off()
    return ax


def plot_class_examples(paths: Sequence, labels: Sequence[str], per_class: int = 4, ax=None,
                        thumb_size: int = 96, seed: int = 0):
    """A grid of example images: one row per class, ``per_class`` images each (a seeded
    random pick), the class name and its image count at the start of the row.

    Returns:
        The matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if len(paths) != len(labels):
        raise ValueError(f"'paths' has {len(paths)} items but 'labels' has {len(labels)}: they must be aligned.")
    if not len(paths):
        raise ValueError("The 'paths' parameter is empty.")
    positive_int(per_class, "per_class")
    y = np.asarray([str(l) for l in labels])
    classes = sorted(set(y.tolist()))
    rng = np.random.default_rng(seed)
    canvas = np.full((len(classes) * thumb_size, per_class * thumb_size, 3), 255, np.uint8)
    for r, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        pick = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
        for j, i in enumerate(pick):
            canvas[r * thumb_size:(r + 1) * thumb_size, j * thumb_size:(j + 1) * thumb_size] = _thumb(paths[i], thumb_size)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.1 * per_class + 1.6, 1.1 * len(classes)))
    ax.imshow(canvas)
    ax.set_yticks([(r + 0.5) * thumb_size for r in range(len(classes))])
    ax.set_yticklabels([f"{c} ({(y == c).sum()})" for c in classes])
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return ax


def plot_rank_distribution(ranks, num_negatives: int | None = None, ax=None, label: str | None = None):
    """Histogram of the positive's rank over comparative sets (1 = best), median marked.

    Returns:
        The matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("The 'ranks' parameter is empty.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    top = int(num_negatives + 1 if num_negatives else ranks.max())
    bins = np.arange(0.5, top + 1.5, max(1, top // 50))
    ax.hist(ranks, bins=bins, alpha=0.7, label=label)
    median = float(np.median(ranks))
    ax.axvline(median, color="k", ls="--", lw=1)
    ax.text(median, ax.get_ylim()[1] * 0.95, f" median {median:g}", va="top")
    ax.set_xlabel("rank of the positive (1 = best)")
    ax.set_ylabel("comparative sets")
    if label:
        ax.legend()
    return ax


def plot_recall_at_k(results: dict, ax=None, max_k: int = 20):
    """Recall@k curves of several models on one Axes.

    Args:
        results: model name -> either an ``evaluate_retrieval`` dict (its ``recall@K``
            entries are plotted) or an array of comparative-set ranks (recall@k for
            k = 1..max_k).

    Returns:
        The matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("The 'results' parameter is empty: give at least one model.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for name, value in results.items():
        if isinstance(value, dict):
            pairs = sorted((int(key.split("@")[1]), v) for key, v in value.items() if key.startswith("recall@"))
            if not pairs:
                raise ValueError(f"results[{name!r}] has no 'recall@K' entry.")
            ks, recalls = zip(*pairs)
        else:
            ranks = np.asarray(value)
            ks = np.arange(1, max_k + 1)
            recalls = [(ranks <= k).mean() for k in ks]
        ax.plot(ks, recalls, marker="o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_recall_vs_speed(rows: Sequence[dict], ax=None, k: int = 10, target: float | None = 0.95):
    """Recall@k against queries per second, one line per backend (rows from
    ``index_tuning.sweep_search_params`` or ``index_tuning.recommend(...)["table"]``).

    Up and to the right is better; ``target`` draws the recall goal as a dashed line.

    Returns:
        The matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("The 'rows' parameter is empty: pass what index_tuning.sweep_search_params returned.")
    key = f"recall@{k}"
    missing = [r for r in rows if key not in r or "qps" not in r]
    if missing:
        raise ValueError(f"Each row needs 'qps' and {key!r}; got keys {sorted(missing[0])}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["qps"], r[key]) for r in rows if r["backend"] == backend)
        ax.plot(*zip(*pts), marker="o", ms=4, label=backend)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (log)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_training_log(log: Sequence[dict], ax=None):
    """Losses and validation MAP@R per epoch, from ``train.fine_tune``'s log (epoch 0 = the
    starting weights). MAP@R goes on a second y axis; the best epoch is marked.

    Returns:
        The matplotlib Axes of the losses. The MAP@R axis is its twin, the figure's last Axes
        (``ax.figure.axes[-1]``); nothing is attached to the Axes.
    """
    import matplotlib.pyplot as plt

    if not log:
        raise ValueError("The 'log' parameter is empty: pass what train.fine_tune returned.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [e["epoch"] for e in log]
    for key, style in (("train_loss", "-"), ("valid_loss", "--")):
        pts = [(e["epoch"], e[key]) for e in log if key in e]
        if pts:
            ax.plot(*zip(*pts), style, marker="o", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("loss")
    ax.set_xticks(epochs)
    scored = [(e["epoch"], e["map@r"]) for e in log if "map@r" in e]
    if scored:
        twin = ax.twinx()
        twin.plot(*zip(*scored), color="tab:green", marker="s", ms=3, label="validation MAP@R")
        best = max(scored, key=lambda p: p[1])
        twin.scatter([best[0]], [best[1]], s=80, facecolors="none", edgecolors="tab:green", zorder=3)
        twin.set_ylabel("validation MAP@R")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    elif ax.lines:
        ax.legend(fontsize=8)
    return ax


def plot_duplicate_groups(groups: Sequence, max_groups: int = 6, max_members: int = 6, thumb_size: int = 112,
                          axes=None, remove: Sequence = ()):
    """One row per duplicate group: the representative, then its duplicates with their
    distance to it underneath; files listed in ``remove`` are captioned "remove?".

    Args:
        groups: ``dedup.duplicate_groups`` output (or lists of paths, distances then not shown).
        axes: a sequence of Axes, one per row; None makes a figure.

    Returns:
        The list of Axes drawn on.
    """
    import matplotlib.pyplot as plt

    positive_int(max_groups, "max_groups")
    positive_int(max_members, "max_members")
    rows = list(groups)[:max_groups]
    if not rows:
        raise ValueError("The 'groups' parameter is empty: there are no duplicates to show.")
    if axes is None:
        width = max(min(len(g.ids if hasattr(g, "ids") else g), max_members) for g in rows)
        _, axes = plt.subplots(len(rows), 1, figsize=(1.5 * width + 0.5, 2.0 * len(rows)), squeeze=False)
        axes = list(axes[:, 0])
    marked = {str(p) for p in remove}
    for ax, group in zip(axes, rows):
        ids = list(group.ids if hasattr(group, "ids") else group)[:max_members]
        dists = list(getattr(group, "distances", [None] * len(ids)))[:max_members]
        gap = thumb_size // 8
        for i, (p, d) in enumerate(zip(ids, dists)):
            x0 = i * (thumb_size + gap)
            ax.imshow(_thumb(p, thumb_size), extent=(x0, x0 + thumb_size, thumb_size, 0))
            name = str(getattr(p, "name", p)).rsplit("/", 1)[-1][:18]
            caption = "representative" if i == 0 else (f"{d:.3f}" if d is not None else "")
            if str(p) in marked:
                caption += " remove?"
            ax.text(x0 + thumb_size / 2, thumb_size + 4, f"{caption}\n{name}", ha="center", va="top", fontsize=7)
        ax.set_xlim(-2, len(ids) * (thumb_size + gap))
        ax.set_ylim(thumb_size + 36, -2)
        ax.set_axis_off()
    return axes


def save_figure(fig, path, dpi: int = 100):
    """Write ``fig`` to ``path`` as a PNG atomically (a crash never leaves half a file) and
    close it. Returns the path."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from utils_cv.common.paths import atomic_write

    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
    return path


def plot_search_results(queries: Sequence, neighbours: Sequence[Sequence], distances: Sequence[Sequence[float]]):
    """One row per query (a file or an in-memory image): the query, then its neighbours (files)
    with their distances and file names. Returns the figure (rows are ``fig.axes``)."""
    import matplotlib.pyplot as plt
    from pathlib import Path

    if not len(queries) or len(queries) != len(neighbours) or len(queries) != len(distances):
        raise ValueError("'queries', 'neighbours' and 'distances' must be non-empty and aligned.")
    k = max(1, max(len(n) for n in neighbours))
    fig, axes = plt.subplots(len(queries), 1, figsize=(1.7 * (k + 1), 2.3 * len(queries)), squeeze=False)

    def name(p):  # a file name any figure can show (undecodable bytes escaped)
        return str(Path(p).name).encode("utf-8", "backslashreplace").decode("utf-8")

    for ax, q, hits, dists in zip(axes[:, 0], queries, neighbours, distances):
        plot_neighbors(q, list(hits), list(dists), name(q) if isinstance(q, (str, Path)) else None,
                       [name(h) for h in hits], ax=ax)
    fig.tight_layout()
    return fig
