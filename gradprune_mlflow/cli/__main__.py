"""`python -m gradprune_mlflow.cli` runs the `gradprune` command."""

from gradprune_mlflow.cli import app

app(prog_name="gradprune")
