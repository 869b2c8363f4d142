"""utils_cv: image-similarity recipes on fastai / torch (data, models, features, metrics, search)."""

__version__ = "0.1.0"
