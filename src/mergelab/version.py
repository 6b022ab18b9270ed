"""The package version (``mergelab.__version__``), apart from the package root so that any module may\nrecord it without importing the root."""

__version__ = "0.1.0"
