"""Thin shim so that older tools calling ``setup.py`` keep working; all metadata is in pyproject.toml."""
from setuptools import setup

setup()
