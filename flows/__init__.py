"""Prefect flows over the gradprune library: `sanitize_model_version` and `scan_registry`."""

from flows.sanitize import sanitize_model_version
from flows.scan import scan_registry

__all__ = ["sanitize_model_version", "scan_registry"]
