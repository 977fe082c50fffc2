"""`gradprune dataset pack|push|validate`: build, upload and check a trusted clean image set.

Heavy imports (great_expectations, boto3, PIL) happen inside the commands so that `--help` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

dataset_app = typer.Typer(
    name="dataset", help="Build, upload and check a trusted clean image set.", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False,
)


def register(app: typer.Typer) -> None:
    """Add the `dataset` group to the app."""
    app.add_typer(dataset_app, name="dataset")


def _floats(values: str | None, what: str) -> list[float] | None:
    from gradprune_mlflow.errors import BadInput

    if values is None:
        return None
    try:
        return [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"{what} must be comma-separated numbers, e.g. 0.2860 or 0.485,0.456,0.406") from None


@dataset_app.command("pack", no_args_is_help=True)
def pack_command(
    src: Annotated[Path, typer.Argument(
        metavar="SRC", show_default=False,
        help="A folder with one sub-folder of images per class, or an .npz with 'images' and 'labels'.")],
    out: Annotated[Path, typer.Option("--out", metavar="DEST", show_default=False,
                                      help="New folder to write the clean set to.")],
    name: Annotated[str | None, typer.Option("--name", help="Set name (default: SRC's name).")] = None,
    mean: Annotated[str | None, typer.Option(
        "--mean", metavar="M[,M,M]", help="The model's input normalisation mean per channel (default: the images' "
                                          "own statistics).")] = None,
    std: Annotated[str | None, typer.Option(
        "--std", metavar="S[,S,S]", help="The model's input normalisation std per channel.")] = None,
    num_classes: Annotated[int | None, typer.Option(
        "--num-classes", help="Number of classes (default: the folders, or the largest label + 1).")] = None,
) -> None:
    """Write the clean-set layout (dataset.json, manifest.csv, PNGs) from an image folder or arrays."""
    from gradprune_mlflow.data.cleanset import read_manifest, read_meta
    from gradprune_mlflow.data.pack import pack_clean_set

    folder = pack_clean_set(src, out, name=name, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                            num_classes=num_classes)
    meta, rows = read_meta(folder), read_manifest(folder)
    typer.echo(f"packed {len(rows)} images of {meta.num_classes} classes, shape {list(meta.input_shape)}, "
               f"mean {list(meta.mean)}, std {list(meta.std)} into {folder}")
    if mean is None:
        typer.echo("note: mean/std were computed from these images; pass --mean/--std if the model was normalised "
                   "differently")


@dataset_app.command("push", no_args_is_help=True)
def push_command(
    local: Annotated[Path, typer.Argument(metavar="LOCAL", show_default=False, help="A packed clean-set folder.")],
    uri: Annotated[str, typer.Argument(metavar="s3://BUCKET/PREFIX", show_default=False,
                                       help="Where to upload it.")],
) -> None:
    """Upload a clean set to S3 (endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; standard credentials)."""
    from gradprune_mlflow.data.s3 import push_clean_set

    count = push_clean_set(local, uri)
    typer.echo(f"uploaded {count} objects to {uri.rstrip('/')}")


@dataset_app.command("validate", no_args_is_help=True)
def validate_command(
    data: Annotated[str, typer.Argument(metavar="DATA", show_default=False,
                                        help="A clean-set folder or s3://bucket/prefix.")],
    min_per_class: Annotated[int, typer.Option("--min-per-class", help="Fewest images any class may have.")] = 10,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Most images the set may hold.")] = 200_000,
    json_out: Annotated[Path | None, typer.Option(
        "--json", metavar="FILE", help="Also write the full result (the GE summary) as JSON.")] = None,
) -> None:
    """Run the Great Expectations suite on a clean set; exit 2 naming the failing checks when it fails."""
    from rich.console import Console
    from rich.table import Table

    from gradprune_mlflow.data.expectations import Checks, validate_clean_set
    from gradprune_mlflow.data.s3 import fetch_clean_set

    folder = fetch_clean_set(data)
    outcome = validate_clean_set(folder, Checks(min_per_class=min_per_class, max_rows=max_rows), source=data)
    if json_out is not None:
        json_out.write_text(outcome.to_json() + "\n")
    table = Table(title=f"clean set {data}", title_justify="left")
    for col in ("check", "expectation", "column", "result"):
        table.add_column(col)
    for row in outcome.summary["expectations"]:
        table.add_row(row["check"], row["expectation"], row.get("column", ""), "ok" if row["success"] else "FAILED")
    Console().print(table)
    stats = outcome.summary["statistics"]
    typer.echo(f"{stats['successful_expectations']} of {stats['evaluated_expectations']} expectations met "
               f"({outcome.summary['data']['rows']} images)")
    outcome.raise_for_failure()
