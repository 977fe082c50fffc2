"""Prefect entrypoint `flows/sanitize.py:sanitize_model_version`: the flow of gradprune_flows.sanitize."""

from gradprune_flows.sanitize import sanitize_model_version

__all__ = ["sanitize_model_version"]
