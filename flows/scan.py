"""Prefect entrypoint `flows/scan.py:scan_registry`: the flow of gradprune_flows.scan."""

from gradprune_flows.scan import scan_registry

__all__ = ["scan_registry"]
