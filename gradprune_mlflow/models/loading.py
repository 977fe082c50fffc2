"""Load a model from a file, an MLflow model folder or an MLflow URI, in whichever format it was saved, scanning first.

Formats (`model_format`): a whole-module torch.save file ("torch-save") and an MLflow pickle-format model ("pickle")
load as the eager module they hold; a pt2 archive (MLflow's default format, or a torch.export.save file) and
TorchScript (a torch.jit.save file, or an MLflow model of a ScriptModule) load as adapters (adapter.py) that write
the sanitized model back in their own format. Nothing is loaded before its bytes were scanned (scan.py), and the
bytes loaded are the bytes scanned.
"""

from __future__ import annotations

import io
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.errors import BadInput, GradpruneError, UnsafeModel, UnsupportedModel
from gradprune_mlflow.models.adapter import FormatAdapter, Source
from gradprune_mlflow.models.scan import ZIP_MAGIC, read_model_file, scan_bytes_as_model, scan_model_file

# The pickle modules an MLflow pytorch model may name in data/pickle_module_info.txt; mlflow imports that name.
SAFE_PICKLE_MODULES = {"pickle", "cloudpickle", "mlflow.pytorch.pickle_module"}
# Files inside a downloaded MLflow model that torch or pickle could load; the rest (MLmodel, yaml, txt) is text.
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".pt2", ".joblib", ".dat", ".data", ".zip",
                   ".npy", ".npz"}
_MAGIC = (b"\x80", ZIP_MAGIC)  # pickle protocol 2+ and zip archives start with these


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def archive_kind(data: bytes) -> str | None:
    """'pt2' or 'torchscript' for those archives, None for anything else (torch.save zips, pickles)."""
    if not data.startswith(ZIP_MAGIC):
        return None
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        fmt = [n for n in names if n.rsplit("/", 1)[-1] == "archive_format"]
        if fmt and archive.read(fmt[0]).strip() == b"pt2":
            return "pt2"
        if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):
            return "torchscript"
    return None


def model_format(model: nn.Module, *, from_file: bool) -> str:
    """The format name a loaded model came in: its adapter's, else 'torch-save' (a file) or 'pickle' (MLflow)."""
    if isinstance(model, FormatAdapter):
        return model.model_format
    return "torch-save" if from_file else "pickle"


def _adapter(kind: str, data: bytes, source: Source, name: str) -> FormatAdapter:
    from gradprune_mlflow.models.pt2 import ExportedModel
    from gradprune_mlflow.models.torchscript import ScriptedModel

    try:
        if kind == "pt2":
            return ExportedModel(data, source, name)
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not for our users to act on
            warnings.simplefilter("ignore", FutureWarning)
            return ScriptedModel(torch.jit.load(io.BytesIO(data), map_location="cpu"), source)
    except GradpruneError:
        raise
    except Exception as exc:
        raise BadInput(f"{name} is not a readable {kind} archive ({type(exc).__name__}: {_first_line(exc)})") from None


def load_model_file(path: str | Path, *, map_location: str = "cpu") -> nn.Module:
    """Scan, then load a model file: a whole-module torch.save file, a torch.jit.save file or a pt2 archive.

    Takes the path. Returns the nn.Module in eval mode (an adapter for TorchScript and pt2). Raises UnsafeModel
    (refused before loading), BadInput (missing or unreadable file) or UnsupportedModel (the file holds something
    other than a module).
    """
    path = Path(path)
    data = read_model_file(path)
    scan_bytes_as_model(data, path.name)
    kind = archive_kind(data)
    if kind is not None:
        return _adapter(kind, data, Source(path.name), path.name).eval()
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise UnsupportedModel(f"model file {path.name} needs code that is not installed ({exc}); install the "
                               "package that defines the model class") from None
    except Exception as exc:
        raise BadInput(f"model file {path.name} is not a readable torch.save file ({type(exc).__name__}: "
                       f"{_first_line(exc)})") from None
    return _as_module(obj, path.name)


def _as_module(obj: Any, name: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        hint = "a state_dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UnsupportedModel(f"{name} holds {hint}, not an nn.Module; save the whole model with "
                               "torch.save(model, path)")
    return obj.eval()


def is_mlflow_uri(ref: str) -> bool:
    """True for what MLflow downloads (models:/, runs:/, scheme://...), False for a plain local path."""
    return ref.startswith(("models:/", "runs:/")) or ("://" in ref and not ref.startswith("file://"))


def load_model(ref: str | Path) -> nn.Module:
    """Load a model from a local file, a local MLflow model folder or an MLflow model URI, scanning it first.

    Takes a path or `models:/name/3`, `models:/name@alias`, `runs:/<run>/<path>`. URIs are downloaded to a temporary
    folder, every pickle in it is scanned, and only then is it loaded.
    Returns the nn.Module in eval mode. Raises UnsafeModel, BadInput or UnsupportedModel with one line.
    """
    ref = str(ref)
    if not is_mlflow_uri(ref):
        path = Path(ref.removeprefix("file://"))
        if path.is_dir():
            if not (path / "MLmodel").is_file():
                raise BadInput(f"{path} is a folder without an MLmodel file; give a torch.save file or an MLflow model")
            return load_mlflow_dir(path, name=str(path))
        return load_model_file(path)
    with tempfile.TemporaryDirectory(prefix="gradprune-model-") as tmp:
        local = _download(ref, tmp)
        return load_mlflow_dir(local, name=ref)


def _download(uri: str, dst: str) -> Path:
    from gradprune_mlflow.models.download import download_model  # the one wrapper, shared with the registry scan

    return download_model(uri, dst)


def load_mlflow_dir(folder: str | Path, *, name: str | None = None) -> nn.Module:
    """Load a local MLflow model folder of the pytorch flavor (pickle, pt2 or TorchScript) after scanning it.

    Refuses (UnsafeModel) folders that carry Python code (`code_paths`: mlflow puts it on sys.path, where a
    pickle could import it) or name a pickle module other than pickle/cloudpickle. Raises BadInput when it is not a
    pytorch-flavor MLflow model, UnsupportedModel when it does not hold a module.
    """
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    folder = Path(folder)
    name = name or str(folder)
    flavor = _pytorch_flavor(folder, name)
    if flavor.get("code"):
        raise UnsafeModel(f"model {name} carries Python code ({flavor['code']}/) that would run on load: refused; "
                          "log the model without code_paths and install its package instead")
    data = folder / str(flavor.get("model_data", "data"))
    info = data / "pickle_module_info.txt"
    if info.is_file() and info.read_text().strip() not in SAFE_PICKLE_MODULES:
        raise UnsafeModel(f"model {name} asks to be unpickled with {info.read_text().strip()!r}: refused without "
                          f"loading; only {', '.join(sorted(SAFE_PICKLE_MODULES))} are accepted")
    # mlflow.pytorch reads data/model.pth when it exists, else data/model.pt2
    model_file = data / "model.pth" if (data / "model.pth").is_file() else data / "model.pt2"
    for file in _pickle_files(folder.rglob("*")):
        if file != model_file:
            scan_model_file(file)
    content = read_model_file(model_file)
    scan_bytes_as_model(content, f"{model_file.parent.name}/{model_file.name}")
    kind = archive_kind(content)
    if kind is not None:
        return _adapter(kind, content, Source.from_folder(folder, model_file), name).eval()
    try:
        model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except (ModuleNotFoundError, AttributeError) as exc:
        raise UnsupportedModel(f"model {name} needs code that is not installed ({exc}); install the package "
                               "that defines the model class") from None
    except MlflowException as exc:
        raise BadInput(f"cannot load model {name}: {_first_line(exc)}") from None
    except Exception as exc:
        raise BadInput(f"cannot load model {name} ({type(exc).__name__}: {_first_line(exc)})") from None
    return _as_module(model, name)


def _pytorch_flavor(folder: Path, name: str) -> dict[str, Any]:
    import yaml

    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    except FileNotFoundError:
        raise BadInput(f"{name} is not an MLflow model (no MLmodel file); give a model logged with "
                       "mlflow.pytorch") from None
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(f"{name} has an unreadable MLmodel file ({_first_line(exc)})") from None
    flavors = (mlmodel or {}).get("flavors") or {}
    if "pytorch" not in flavors:
        raise BadInput(f"{name} is not a pytorch model (flavors: {', '.join(flavors) or 'none'}); "
                       "gradprune sanitizes mlflow.pytorch models only")
    return flavors["pytorch"] or {}


def _pickle_files(paths: Iterable[Path]) -> list[Path]:
    out = []
    for path in paths:
        if not path.is_file() or path.is_symlink():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            out.append(path)
            continue
        with path.open("rb") as fh:
            head = fh.read(4)
        if head.startswith(_MAGIC) or zipfile.is_zipfile(path):
            out.append(path)
    return sorted(out)
