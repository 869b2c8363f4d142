"""An ipywidgets browser over a set of images and their features: pick a query, see its
nearest neighbours with distances. Works in Jupyter, JupyterLab and VS Code notebooks."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from utils_cv.similarity import distances, plot

__all__ = ["NeighborBrowser"]


class NeighborBrowser:
    """Browse nearest neighbours: ``NeighborBrowser(paths, features, labels).show()``.

    Args:
        paths: image files, aligned with ``features``.
        features: (n, d) features (e.g. from ``features.extract_features``).
        labels: optional class names; neighbours of the query's class are framed green.
        k: neighbours shown.
        distance: ``"l2"`` or ``"cosine"``.
    """

    def __init__(self, paths: Sequence, features, labels: Sequence[str] | None = None, k: int = 5,
                 distance: str = "l2"):
        import ipywidgets as w

        if len(paths) != len(features):
            raise ValueError(f"'paths' has {len(paths)} items but 'features' has {len(features)} rows.")
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"'labels' has {len(labels)} items but 'paths' has {len(paths)}.")
        self.paths, self.labels = list(paths), None if labels is None else list(labels)
        self.k = min(k, len(paths) - 1)
        self.D, self.I = distances.knn(features, features, self.k, distance=distance, exclude_self=True)
        names = [f"{i}: {self.labels[i] + '/' if self.labels else ''}{getattr(p, 'name', p)}" for i, p in enumerate(self.paths)]
        self.query = w.Dropdown(options=list(zip(names, range(len(names)))), value=0, description="query")
        self.slider = w.IntSlider(min=0, max=len(names) - 1, value=0, description="#", continuous_update=False)
        self.query.observe(self._on_query, names="value")
        self.slider.observe(self._on_slider, names="value")
        self.output = w.Output()
        self.widget = w.VBox([w.HBox([self.query, self.slider]), self.output])
        self.axes = None
        self._draw(0)

    def _on_slider(self, change) -> None:
        if self.query.value != change["new"]:
            self.query.value = change["new"]

    def _on_query(self, change) -> None:
        if self.slider.value != change["new"]:
            self.slider.value = change["new"]
        self._draw(change["new"])

    def neighbors(self, q: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of the k nearest neighbours of image ``q``."""
        return self.D[q], self.I[q]

    def _draw(self, q: int) -> None:
        import matplotlib.pyplot as plt

        d, idx = self.neighbors(q)
        self.output.clear_output(wait=True)
        with self.output:
            fig, ax = plt.subplots(figsize=(1.7 * (self.k + 1), 2.3))
            self.axes = plot.plot_neighbors(
                self.paths[q], [self.paths[i] for i in idx], d,
                None if self.labels is None else self.labels[q],
                None if self.labels is None else [self.labels[i] for i in idx], ax=ax,
            )
            self.shown = q
            plt.show()
            plt.close(fig)

    def show(self):
        """The widget, for display as a notebook cell's last expression."""
        return self.widget

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
