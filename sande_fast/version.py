"""The package version (one place, read by the report and the build)."""
__version__ = "0.1.0"
