"""Scan model files before anything in them is loaded.

A whole-module `torch.save` file is a pickle, and unpickling runs whatever the file tells it to. Every file is
scanned with picklescan (the maintained scanner MLflow and Hugging Face use) before anything is unpickled, and
refused with UnsafeModel when it imports anything dangerous. That is a deny list, so it is defence in depth, not a
sandbox: load registry models in a worker that holds no secrets.

Archives get a record-by-record check on top: picklescan reads a torch.save or TorchScript zip's data.pkl and
constants.pkl, but not a pt2 archive's records (weights, constants, custom objects, sample inputs), which
`torch.export.load` may unpickle. There every record must be a raw tensor its config declares as such, JSON, a short
text record, or a pickle (or nested torch.save zip) that scans clean; anything else is refused unloaded. Compiled code
(AOTInductor shared objects) is refused outright, and so are zips with two records of one name (readers disagree on
which one counts).
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import zipfile
from pathlib import Path

from picklescan.scanner import Global, SafetyLevel, ScanResult, scan_bytes, scan_pickle_bytes

from gradprune_mlflow.errors import BadInput, UnsafeModel

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
_ALIASES = {"posix": "os", "nt": "os", "__builtin__": "builtins"}  # how pickles spell modules users know
ZIP_MAGIC = b"PK\x03\x04"
# pt2 records that torch.export.save writes as plain text (the pattern cannot hold pickle opcodes: at most one
# newline, which GLOBAL needs two of, and only ASCII, which STACK_GLOBAL's binary arguments are not).
_TEXT_RECORD = re.compile(rb"[A-Za-z0-9._-]{1,64}\n?")
_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_config\.json$")
_RAW_PREFIXES = ("weight_", "tensor_")
_COMPILED = (".so", ".dll", ".dylib", ".cubin", ".fatbin", ".o")


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


def _judge(result: ScanResult, label: str) -> None:
    dangerous = _dangerous(result)
    if dangerous:
        raise UnsafeModel(f"model file {label} imports {', '.join(dangerous)}: refused without loading; "
                          "only load models from sources you trust")
    if result.scan_err:
        raise UnsafeModel(f"model file {label} holds a pickle that could not be fully scanned: "
                          "refused without loading; re-save it with torch.save")


def _is_tar(data: bytes) -> bool:
    # torch.load still unpickles members of the ancient tar format, which picklescan cannot look into.
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:"):
            return True
    except (tarfile.TarError, OSError, ValueError):
        return False


def read_model_file(path: str | Path) -> bytes:
    """The file's bytes; BadInput when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"model file {path} does not exist; give a torch.save file or an MLflow model URI")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read model file {path}: {exc}") from None


def scan_bytes_as_model(data: bytes, label: str) -> None:
    """Scan a model file's content (torch.save zip or legacy pickle, TorchScript or pt2 archive) without loading it.

    Returns None when nothing dangerous was found. Raises UnsafeModel naming the dangerous imports, or when the
    content cannot be scanned completely.
    """
    if data.startswith(ZIP_MAGIC):
        _check_zip(data, label)
    if _is_tar(data):
        raise UnsafeModel(f"model file {label} is in torch's legacy tar format, which cannot be scanned: "
                          "refused without loading; re-save it with a current torch.save")
    try:
        # Scanned as a torch file whatever its name: that is how torch.load will read it.
        result = scan_bytes(io.BytesIO(data), label, ".pt")
    except Exception as exc:  # picklescan raises plain exceptions on archives it cannot open
        raise UnsafeModel(f"model file {label} could not be scanned ({type(exc).__name__}: {exc}): "
                          "refused without loading") from None
    _judge(result, label)
    if data.startswith(ZIP_MAGIC):
        _scan_records(data, label)


def scan_model_file(path: str | Path) -> None:
    """Scan a model file on disk; see scan_bytes_as_model. BadInput when it cannot be read at all."""
    scan_bytes_as_model(read_model_file(path), Path(path).name)


def _check_zip(data: bytes, label: str) -> None:
    """BadInput for a truncated or corrupted zip: damaged, not dangerous, and no reader should be handed it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BadInput(f"model file {label} is a truncated or damaged zip archive ({exc})") from None
    if bad is not None:
        raise BadInput(f"model file {label} is a damaged zip archive (record {bad} fails its checksum)")


def _scan_records(data: bytes, label: str) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BadInput(f"model file {label} is a damaged zip archive ({exc})") from None
    names = [i.filename for i in infos]
    if len(names) != len(set(names)):
        raise UnsafeModel(f"model file {label} holds two records of the same name: refused without loading")
    compiled = [n for n in names if n.lower().endswith(_COMPILED) or "/aotinductor/" in n]
    if compiled:
        raise UnsafeModel(f"model file {label} carries compiled code ({compiled[0]}): refused without loading; "
                          "give a pt2 archive of the exported program only")
    if not any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
        return  # a torch.save or TorchScript zip: torch unpickles only the data.pkl/constants.pkl picklescan read
    try:
        configs = {n: archive.read(n) for n in names if _PAYLOAD_CONFIG.search(n)}
        raw = _raw_tensor_records(configs)
        for info in infos:
            if info.filename not in raw:
                _scan_record(archive.read(info), f"{label}:{info.filename}")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BadInput(f"model file {label} is a damaged zip archive ({exc})") from None


def _raw_tensor_records(configs: dict[str, bytes]) -> set[str]:
    """Records the pt2 loader reads as raw tensor bytes (config says use_pickle false); the rest may be unpickled."""
    raw, pickled = set(), set()
    for name, content in configs.items():
        try:
            entries = json.loads(content)["config"]
        except (ValueError, KeyError, TypeError):
            continue
        folder = name.rsplit("/", 1)[0]
        for entry in entries.values() if isinstance(entries, dict) else ():
            path = entry.get("path_name") if isinstance(entry, dict) else None
            if not isinstance(path, str) or "/" in path:
                continue
            if entry.get("use_pickle") is False and path.startswith(_RAW_PREFIXES):
                raw.add(f"{folder}/{path}")
            else:
                pickled.add(f"{folder}/{path}")
    return raw - pickled


def _scan_record(content: bytes, label: str) -> None:
    if _TEXT_RECORD.fullmatch(content):
        return
    try:
        json.loads(content.decode("utf-8"))
        return
    except (UnicodeDecodeError, ValueError):
        pass
    if content.startswith(ZIP_MAGIC):
        scan_bytes_as_model(content, label)
        return
    try:
        result = scan_pickle_bytes(io.BytesIO(content), label)
    except Exception as exc:  # not a pickle either: nothing we can vouch for
        raise UnsafeModel(f"model file {label} could not be scanned ({type(exc).__name__}): refused without "
                          "loading") from None
    if not result.globals and result.scan_err:
        raise UnsafeModel(f"model file {label} is neither a tensor, text nor a readable pickle: refused without "
                          "loading")
    _judge(result, label)
