"""Prefect entrypoints: deploy/prefect.yaml names `flows/sanitize.py:sanitize_model_version` and
`flows/scan.py:scan_registry`. The flows themselves live in the installed package gradprune_flows; this folder is
not installed, so Prefect loads these files by path from the repository (or /opt/gradprune in the image).
"""
