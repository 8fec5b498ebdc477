"""Files, one place: atomic writes (temp file in the same folder, then rename), exclusive locks between processes,
content digests, and reading config YAML the way RecBole writes it (safely). No causalrec imports but ``errors``."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import yaml

_log = logging.getLogger(__name__)


def digest(value: Any, *, ascii_only: bool = False) -> str:
    """SHA-256 (hex) of a JSON rendering of ``value`` (keys sorted; non-JSON values by ``str``).

    ``ascii_only`` renders non-ASCII text as ``\\u`` escapes: the keys of ``compare`` cells and ``tune`` studies
    were made that way, stage keys without; each keeps its rendering so that no cached result is orphaned."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=ascii_only, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, waiting: str) -> Iterator[None]:
    """An exclusive advisory lock on the file ``path`` (POSIX ``flock``; a no-op where ``fcntl`` is missing), held
    for the block: one process builds what another waits for. ``waiting`` is logged when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: atomic renames still keep each file whole
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.info("waiting for another process %s (%s)", waiting, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path`` to write into; renamed onto ``path`` when the block succeeds and
    removed when it fails, so a reader sees the old file or the new one, never half of one. The file gets the
    umask's permissions, as ``open()`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as indented JSON (non-JSON values by ``str``; no newline at the end), written atomically."""
    write_atomic(path, json.dumps(payload, indent=2, default=str))


# ------------------------------------------------------------------------------ config YAML (B11)
class RecBoleYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float, as RecBole's own (unsafe) loader does.

    Plain YAML 1.1 needs a dot in a float (``1.0e-3``); RecBole's YAML files and users write ``1e-3``.
    causalrec reads every config file with this loader, and RecBole's ``Config`` uses it too (B11).
    """


RecBoleYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no Python objects), with RecBole's float syntax."""
    return yaml.load(text, Loader=RecBoleYamlLoader)  # noqa: S506 - a SafeLoader subclass


def literal_value(value: Any) -> Any:
    """What RecBole's ``Config`` makes of a string value, without running it: a Python literal
    (``"[10, 20]"`` -> ``[10, 20]``, ``"1e-3"`` -> ``0.001``), ``true``/``false``, or the string itself."""
    if not isinstance(value, str):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = value.lower()
        return True if lowered == "true" else False if lowered == "false" else value
    return parsed if parsed is None or isinstance(parsed, (str, int, float, list, tuple, dict, bool)) else value


def read_yaml_file(path: str | os.PathLike, what: str = "config file") -> Any:
    """The YAML in ``path`` (``load_yaml``), or a ConfigError naming ``what`` and the file when it cannot be read or
    is not valid YAML."""
    from causalrec.errors import ConfigError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
