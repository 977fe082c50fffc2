"""Model files in and out: scan before unpickling, load, and save the sanitized model as an MLflow model folder.

A whole-module `torch.save` file is a pickle, and unpickling runs whatever the file tells it to. Every file is
scanned with picklescan (the maintained scanner MLflow and Hugging Face use) before anything is unpickled, and
refused with UnsafeModel when it imports anything dangerous. That is a deny list, so it is defence in depth, not a
sandbox: load registry models in a worker that holds no secrets.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from picklescan.scanner import Global, SafetyLevel, ScanResult, scan_bytes
from torch import nn

from gradprune_mlflow.errors import BadInput, GradpruneError, UnsafeModel, UnsupportedModel

# picklescan logs every finding at WARNING; we report them ourselves, in one line.
logging.getLogger("picklescan").addHandler(logging.NullHandler())
logging.getLogger("picklescan").propagate = False

# Globals picklescan rates only "suspicious" but that chain into code execution inside a pickle
# (e.g. getitem(vars(__import__("os")), "system")). Nothing a saved nn.Module needs.
EXTRA_UNSAFE: dict[str, set[str] | str] = {
    "builtins": {"__import__", "vars", "globals", "locals", "setattr", "delattr", "input", "super"},
    "__builtin__": {"__import__", "vars", "globals", "locals", "setattr", "delattr", "input", "super"},
    "operator": {"getitem", "call"},
    "_operator": {"getitem", "call"},
    "importlib": "*",
    "marshal": "*",
    "types": "*",
    "code": "*",
    "codeop": "*",
    "inspect": "*",
    "dill": "*",
    "dill._dill": "*",
}
# The pickle modules an MLflow pytorch model may name in data/pickle_module_info.txt; mlflow imports that name.
SAFE_PICKLE_MODULES = {"pickle", "cloudpickle", "mlflow.pytorch.pickle_module"}
# Files inside a downloaded MLflow model that torch or pickle could load; the rest (MLmodel, yaml, txt) is text.
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".pt2", ".joblib", ".dat", ".data", ".zip",
                   ".npy", ".npz"}
_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ and zip archives start with these
_ALIASES = {"posix": "os", "nt": "os", "__builtin__": "builtins"}  # how pickles spell modules users know


def _extra_unsafe(g: Global) -> bool:
    names = EXTRA_UNSAFE.get(g.module)
    return names is not None and (names == "*" or g.name in names)


def _dangerous(result: ScanResult) -> list[str]:
    found = {
        f"{_ALIASES.get(g.module, g.module)}.{g.name}"
        for g in result.globals
        if g.safety == SafetyLevel.Dangerous or _extra_unsafe(g)
    }
    return sorted(found)


def _is_tar(path: Path) -> bool:
    # torch.load still unpickles members of the ancient tar format, which picklescan cannot look into.
    try:
        with tarfile.open(path, mode="r:"):
            return True
    except (tarfile.TarError, OSError, ValueError):
        return False


def scan_model_file(path: str | Path) -> None:
    """Scan a model file (torch.save zip or legacy pickle) without loading it.

    Takes the file path. Returns None when nothing dangerous was found. Raises UnsafeModel naming the dangerous
    imports, or when the file cannot be scanned completely; BadInput when it cannot be read at all.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"model file {path} does not exist; give a torch.save file or an MLflow model URI")
    if _is_tar(path):
        raise UnsafeModel(f"model file {path.name} is in torch's legacy tar format, which cannot be scanned: "
                          "refused without loading; re-save it with a current torch.save")
    try:
        with path.open("rb") as fh:
            # Scanned as a torch file whatever its name: that is how torch.load will read it.
            result = scan_bytes(fh, str(path), ".pt")
    except OSError as exc:
        raise BadInput(f"cannot read model file {path}: {exc}") from None
    except Exception as exc:  # picklescan raises plain exceptions on archives it cannot open
        raise UnsafeModel(f"model file {path.name} could not be scanned ({type(exc).__name__}: {exc}): "
                          "refused without loading") from None
    dangerous = _dangerous(result)
    if dangerous:
        raise UnsafeModel(f"model file {path.name} imports {', '.join(dangerous)}: refused without loading; "
                          "only load models from sources you trust")
    if result.scan_err:
        raise UnsafeModel(f"model file {path.name} holds a pickle that could not be fully scanned: "
                          "refused without loading; re-save it with torch.save")


def load_model_file(path: str | Path, *, map_location: str = "cpu") -> nn.Module:
    """Scan, then load a whole-module `torch.save` file.

    Takes the path. Returns the nn.Module in eval mode. Raises UnsafeModel (refused before unpickling), BadInput
    (missing or unreadable file) or UnsupportedModel (the file holds something other than an nn.Module).
    """
    path = Path(path)
    scan_model_file(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise UnsupportedModel(f"model file {path.name} needs code that is not installed ({exc}); install the "
                               "package that defines the model class") from None
    except Exception as exc:
        raise BadInput(f"model file {path.name} is not a readable torch.save file ({type(exc).__name__}: "
                       f"{_first_line(exc)})") from None
    return _as_module(obj, path.name)


def _as_module(obj: Any, name: str) -> nn.Module:
    if isinstance(obj, torch.jit.ScriptModule):
        raise UnsupportedModel(f"{name} is a TorchScript module, whose filters cannot be pruned; save the "
                               "eager model with torch.save(model, path)")
    if not isinstance(obj, nn.Module):
        hint = "a state_dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UnsupportedModel(f"{name} holds {hint}, not an nn.Module; save the whole model with "
                               "torch.save(model, path)")
    return obj.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_mlflow_uri(ref: str) -> bool:
    """True for what MLflow downloads (models:/, runs:/, scheme://...), False for a plain local path."""
    return ref.startswith(("models:/", "runs:/")) or ("://" in ref and not ref.startswith("file://"))


def load_model(ref: str | Path) -> nn.Module:
    """Load a model from a local file, a local MLflow model folder or an MLflow model URI, scanning it first.

    Takes a path or `models:/name/3`, `models:/name@alias`, `runs:/<run>/<path>`. URIs are downloaded to a temporary
    folder, every pickle in it is scanned, and only then is it loaded with mlflow.pytorch.
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
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except MlflowException as exc:
        raise BadInput(f"cannot fetch model {uri}: {_first_line(exc)}; check the name, version or alias "
                       "and MLFLOW_TRACKING_URI") from None
    except (OSError, ConnectionError) as exc:
        raise GradpruneError(f"cannot fetch model {uri} ({type(exc).__name__}: {_first_line(exc)}); "
                             "check MLFLOW_TRACKING_URI and that the server is up") from None


def load_mlflow_dir(folder: str | Path, *, name: str | None = None) -> nn.Module:
    """Load a local MLflow model folder of the pytorch flavor after scanning every pickle in it.

    Refuses (UnsafeModel) folders that carry Python code (`code_paths`: mlflow puts it on sys.path, where a
    pickle could import it) or name a pickle module other than pickle/cloudpickle. Raises BadInput when it is not a
    pytorch-flavor MLflow model, UnsupportedModel when it does not hold an nn.Module.
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
    for file in _pickle_files(folder.rglob("*")):
        scan_model_file(file)
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


def save_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    input_shape: tuple[int, int, int] | list[int],
    history: list[dict[str, Any]] | None = None,
    extra_files: list[str | Path] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as an MLflow pytorch model folder that `mlflow.pytorch.load_model(out_dir)` loads.

    Takes the model, the folder (replaced when it already holds an MLflow model), the input shape [C, H, W] for the
    signature (float32 [-1, C, H, W] -> logits), the pruning history (written beside it as pruning_history.json),
    extra files to copy in, and MLmodel metadata. Returns the folder. Raises BadInput when out_dir is a non-empty
    folder that is not an MLflow model.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "MLmodel").is_file():
        raise BadInput(f"{out_dir} exists and is not an MLflow model folder; choose another output folder")
    model = model.cpu().eval()
    example = torch.zeros(1, *map(int, input_shape))
    with torch.no_grad():
        logits = model(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        target = staging / "model"
        with quiet("mlflow.pytorch"):  # its pickle warning is about loading untrusted files; this one is ours
            mlflow.pytorch.save_model(
                model, str(target), serialization_format="pickle", pickle_module=pickle, signature=signature,
                # Given explicitly: inferring them would load the model again in a subprocess.
                pip_requirements=_requirements(), extra_files=[str(f) for f in extra_files or []] or None,
                metadata=metadata,
            )
        if history is not None:
            (target / "pruning_history.json").write_text(json.dumps(history, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(target, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _requirements() -> list[str]:
    import mlflow.pytorch

    from gradprune_mlflow import __version__

    return [*mlflow.pytorch.get_default_pip_requirements(), f"gradprune-mlflow=={__version__}"]


@contextmanager
def quiet(name: str) -> Iterator[None]:
    """Raise a logger's level to ERROR inside a with block: mlflow.pytorch warns about pickle on every save and load,
    and ours are scanned first, so the warning says nothing to our users."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
