"""The local model cache: ``$CAIKIT_CACHE/models/<alias>`` (default ``~/.cache/caikit``).

A run file may name a model by a cache alias (e.g. ``smollm2-135m-instruct``);
:func:`resolve_alias` turns a fetched alias into its folder and leaves any other
name (a hub id) unchanged. Filling the cache is a plugin's job: the ``hf``
plugin's ``caikit models fetch`` (:mod:`caikit_hf.models`).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path

from caikit_core.errors import PluginError

__all__ = [
    "PICKLE_SUFFIXES",
    "TOKENIZER_FILES",
    "cache_dir",
    "check_weights",
    "could_be_hub_id",
    "local_checkpoint",
    "looks_local",
    "missing_model_folder",
    "resolve_alias",
]

log = logging.getLogger("caikit.models")

#: weight files read with pickle, which can run code when loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

#: Files any of which marks a folder as holding a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "tekken.json",
)


def cache_dir() -> Path:
    """Where caikit keeps fetched models."""
    root = os.environ.get("CAIKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "caikit"
    return base / "models"


def resolve_alias(name: str) -> str:
    """The cached folder for alias ``name`` if it was fetched, else ``name`` itself."""
    folder = cache_dir() / name
    if (folder / "config.json").is_file():
        return str(folder)
    return name


#: one part of a hub repo id (``name`` or ``namespace``): letters, digits, ``_``, ``-``
#: and ``.``, neither starting nor ending with ``-`` or ``.``
_HUB_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def could_be_hub_id(model: str) -> bool:
    """Whether ``model`` is a well-formed hub repo id (``name`` or ``namespace/name``, at
    most 96 characters, no ``--`` or ``..``, not ending in ``.git``): the rules
    huggingface_hub's ``validate_repo_id`` checks, so anything else is certainly not one."""
    parts = model.split("/")
    return (
        0 < len(model) <= 96
        and len(parts) <= 2
        and all(_HUB_PART.fullmatch(part) for part in parts)
        and "--" not in model
        and ".." not in model
        and not model.endswith(".git")
    )


def looks_local(model: str) -> bool:
    """Whether ``model`` names a local folder rather than a hub id (``org/name``): it
    exists, is written as a path, cannot be a hub id, or its first component is a
    folder here (``models/smolm2`` where ``models/`` exists)."""
    if Path(model).expanduser().exists():
        return True
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or not could_be_hub_id(model)
        or ("/" in model and Path(model.split("/", 1)[0]).is_dir())
        or (os.sep != "/" and os.sep in model)
    )


def missing_model_folder(model: str, base_dir: Path) -> str | None:
    """Why a run file's ``model`` (relative to the run file's folder ``base_dir``) is
    certainly a local folder that does not exist, or ``None`` when it is a folder, a
    fetched cache alias or may be a hub id. It is a path when it starts with ``/``,
    ``./``, ``../`` or ``~``, when its first component is a folder in ``base_dir``
    (``models/smolm2`` beside a ``models/`` folder), or when it cannot be a hub id
    (:func:`could_be_hub_id`); so a misspelt path fails without asking the hub. The
    message names the closest existing folder beside it, if any."""
    path = Path(model).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    if path.is_dir() or resolve_alias(model) != model:
        return None
    if path.exists():
        return f"{path} is a file, not a model folder"
    first = model.split("/", 1)[0]
    written_as_path = model.startswith(("/", "./", "../", "~")) or (
        "/" in model and (base_dir / first).is_dir()
    )
    if not written_as_path and could_be_hub_id(model):
        return None
    siblings = [d.name for d in path.parent.iterdir() if d.is_dir()] if path.parent.is_dir() else []
    closest = difflib.get_close_matches(path.name, siblings, n=1)
    hint = f" (the closest folder there is {path.parent / closest[0]})" if closest else ""
    return f"no such model folder: {path}{hint}"


def check_weights(
    folder: Path, who: str, *, allow_pickle: bool = False, key: str | None = None
) -> None:
    """Refuse a model folder whose weights are only pickle files (``pytorch_model.bin``,
    ``*.pt``, ``*.ckpt``, ``*.pkl``, ...) and no ``*.safetensors``, naming the file,
    unless ``allow_pickle`` (then say so in the log). ``key`` is the run-file key that
    allows it (e.g. ``policy_optimiser.allow_pickle``), named in the error; without
    one the error says "in the plugin's table".

    :raises PluginError: the folder holds pickle weights only and ``allow_pickle`` is off.
    """
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not pickles:
        return
    shown = ", ".join(pickles[:4]) + (" ..." if len(pickles) > 4 else "")
    if allow_pickle:
        log.warning(
            "%s: loading pickle weights %s from %s (allow_pickle = true)", who, shown, folder
        )
        return
    where = f"{key} = true in" if key else "allow_pickle = true in the plugin's table of"
    raise PluginError(
        f"{who}: {folder} holds its weights only as pickle ({shown}), which can run code "
        f"when loaded; convert it to safetensors, or set {where} the run file for a "
        "checkpoint you trust"
    )


def local_checkpoint(model: str, who: str, *, allow_pickle: bool = False) -> Path | None:
    """The folder ``model`` names, checked to exist, hold a tokenizer and hold weights
    other than pickle only (:func:`check_weights`), or ``None`` for a hub id; what a
    generator plugin checks before loading (``who`` starts the error, e.g.
    ``"hf generator"``).

    :raises PluginError: the folder is missing, holds no tokenizer, or holds pickle
        weights only and ``allow_pickle`` is off; or (with ``HF_HUB_OFFLINE`` or
        ``TRANSFORMERS_OFFLINE`` set) ``model`` is neither a folder nor a hub id in the
        local Hugging Face cache.
    """
    if not looks_local(model):
        offline = [
            v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
            if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        ]  # fmt: skip
        from caikit_core.store import hub_revision

        if offline and hub_revision(model) is None:
            raise PluginError(
                f"{who}: model folder does not exist: {model} (nor is it a hub id in the "
                f"local Hugging Face cache, and {offline[0]} is set, so nothing is downloaded)"
            )
        return None
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise PluginError(f"{who}: model folder does not exist: {model}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PluginError(
            f"{who}: no tokenizer in {model} (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    check_weights(folder, who, allow_pickle=allow_pickle)
    return folder
