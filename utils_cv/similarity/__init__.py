"""Image similarity: data, backbones, features, metrics and search.

Submodules are imported on demand (``from utils_cv.similarity import data, model``) so that
``import utils_cv.similarity.data`` does not pull in torch.
"""

__all__ = ["checkpoint", "cli", "collection", "data", "dedup", "diffusion", "distances", "features", "heads", "index", "index_tuning",
           "metrics", "model", "plot", "rerank", "scale", "scale_index", "scale_io", "splits", "train", "widget"]
