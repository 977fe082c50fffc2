"""Prefect flows over the gradprune library: `sanitize_model_version` and `scan_registry`.

Installed as `gradprune_flows`, a name no other distribution claims; the repository's flows/ folder holds the
Prefect entrypoints (deploy/prefect.yaml) that re-export these flows.
"""

from gradprune_flows.sanitize import sanitize_model_version
from gradprune_flows.scan import scan_registry

__all__ = ["sanitize_model_version", "scan_registry"]
