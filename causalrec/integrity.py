"""Is this file whole? Torch files (zip or legacy format) and safetensors files inspected from their bytes, before
anything is loaded from them. Used by the RecBole checkpoint reader, the stage cache's resume checkpoints and the
backbone loader, so "damaged" means the same everywhere. No causalrec imports but ``errors``; torch is not
imported (pickles are walked, never run).
"""

from __future__ import annotations

import copy
import os
import pickletools
import tarfile
import warnings
import zipfile

# What a file is, read from its bytes: torch's zip format (data.pkl + one record per storage) or its legacy format
# (five pickles, then the raw records). Pickles are walked with ``pickletools.genops``, which decodes opcodes and
# executes none, so inspecting an untrusted file is safe.
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch file
_CHUNK = 1 << 20
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}


class _Bounded:
    """``size`` bytes of a binary stream for ``pickletools``, whose reads never ask for more than is left (a
    pickle's length fields come from the file, and a damaged one may say anything)."""

    def __init__(self, handle, size: int):
        self.handle, self.left, self.pos = handle, size, 0

    def _took(self, data: bytes) -> bytes:
        self.left -= len(data)
        self.pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        return self._took(self.handle.read(self.left if n is None or n < 0 else min(n, self.left)))

    def readline(self) -> bytes:
        return self._took(self.handle.readline(self.left)) if self.left > 0 else b""

    def tell(self) -> int:
        return self.pos

    def skip(self, n: int) -> bool:
        """Skip ``n`` bytes; False when fewer are left."""
        if n > self.left:
            return False
        self.handle.seek(n, os.SEEK_CUR)
        self.left -= n
        self.pos += n
        return True


def _walk_pickle(stream: _Bounded) -> list:
    """The strings, integers and globals (``("global", "module name")``) one pickle pushes, in order and through its
    memo, up to its STOP. Raises ``ValueError`` for an unknown opcode or a pickle cut short."""
    atoms: list = []
    memo: dict = {}
    last = None
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if name in ("PROTO", "FRAME", "STOP"):
            continue
        if name in _STRING_OPS or name in _INT_OPS:
            value = arg
        elif name == "GLOBAL":
            value = ("global", str(arg))
        elif name == "STACK_GLOBAL":  # pops the module and name strings pushed before it
            value = ("global", " ".join(str(a) for a in atoms[-2:]))
            del atoms[-2:]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
        else:
            value = None
        atoms.append(value)
        last = value
    return atoms


def _element_size(storage_global: str) -> int | None:
    module, _, name = storage_global.partition(" ")
    if module != "torch" or not name.endswith("Storage"):
        return None
    if name == "UntypedStorage":
        return 1
    import torch

    with warnings.catch_warnings():  # the legacy storage classes warn that TypedStorage is deprecated
        warnings.simplefilter("ignore")
        dtype = getattr(getattr(torch, name, None), "dtype", None)
    return torch._utils._element_size(dtype) if isinstance(dtype, torch.dtype) else None


def _storage_refs(atoms: list) -> dict[str, tuple[int | None, int]]:
    """``key -> (element size or None, number of elements)`` of the storages a checkpoint's pickle refers to: its
    persistent ids ``("storage", torch.<X>Storage, key, location, numel, ...)``."""
    refs = {}
    for i in range(len(atoms) - 4):
        kind, key, numel = atoms[i + 1], atoms[i + 2], atoms[i + 4]
        if (
            atoms[i] == "storage"
            and isinstance(kind, tuple)
            and isinstance(key, str)
            and isinstance(atoms[i + 3], str)
            and isinstance(numel, int)
            and not isinstance(numel, bool)
            and kind[1].startswith("torch ")
        ):
            refs[key] = (_element_size(kind[1]), numel)
    return refs


def _crc_checked(info: zipfile.ZipInfo, crc: bool) -> zipfile.ZipInfo:
    """``info``, or a copy without a CRC-32 (zipfile then reads the member unchecked) when it is not to be checked or
    the file has none (0: torch wrote it with ``torch.serialization.set_crc32_options(False)``)."""
    if crc and info.CRC != 0:
        return info
    unchecked = copy.copy(info)
    del unchecked.CRC
    return unchecked


def _zip_problem(path: str, crc: bool) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if not pickles:
                return "it is a zip archive without data.pkl, not a torch checkpoint"
            prefix = pickles[0].filename[: -len("data.pkl")]
            with archive.open(_crc_checked(pickles[0], crc)) as handle:
                try:
                    atoms = _walk_pickle(_Bounded(handle, pickles[0].file_size))
                except ValueError as err:
                    return f"its {pickles[0].filename} is not a whole pickle ({err})"
            sizes = {i.filename: i.file_size for i in infos}
            for key, (size, numel) in _storage_refs(atoms).items():
                record = f"{prefix}data/{key}"
                if record not in sizes:
                    return f"its data record {record} is missing"
                if size is not None and sizes[record] < size * numel:
                    return f"its data record {record} holds {sizes[record]} of {size * numel} bytes"
            if crc:
                for info in infos:
                    with archive.open(_crc_checked(info, crc)) as member:  # zipfile compares the CRC-32 at the end
                        while member.read(_CHUNK):
                            pass
    except zipfile.BadZipFile as err:
        return f"its zip archive is corrupt ({err})"
    except EOFError:
        return "its zip archive is cut short"
    return None


def _legacy_problem(path: str) -> str | None:
    with open(path, "rb") as handle:
        stream = _Bounded(handle, os.fstat(handle.fileno()).st_size)
        if handle.read(4) == b"PK\x03\x04":
            return "it is a zip archive (torch's format) without its central directory: cut short or corrupt"
        handle.seek(0)
        try:
            magic = _walk_pickle(stream)
        except ValueError:
            return "it is neither a zip archive (torch's format) nor a pickle stream"
        if magic != [_TORCH_MAGIC]:
            return "it is a pickle but not a torch checkpoint"
        try:
            for _ in range(2):  # protocol version, system info
                _walk_pickle(stream)
            refs = _storage_refs(_walk_pickle(stream))
            keys = [k for k in _walk_pickle(stream) if isinstance(k, str)]
        except ValueError as err:
            return f"its pickle stream is cut short or corrupt ({err})"
        for key in keys:  # each record: its number of elements (int64), then the elements
            size = refs.get(key, (None, 0))[0]
            head = stream.read(8)
            if len(head) < 8:
                return f"its data records are cut short (record {key!r} is missing)"
            numel = int.from_bytes(head, "little", signed=True)
            if numel < 0:
                return f"its data record {key!r} is corrupt"
            if size is None:  # a storage type this check does not know: leave the rest to torch
                return None
            if not stream.skip(numel * size):
                return f"its data record {key!r} is cut short"
    return None


def torch_file_problem(path: str | os.PathLike, *, crc: bool = True) -> str | None:
    """Why the ``torch.save`` file at ``path`` is damaged (a phrase: "it is empty", "its zip archive is corrupt
    (...)", ...), or None when it is whole. Nothing is unpickled.

    Checked: the file exists and is torch's zip format or its legacy format; a zip's central directory, its
    ``data.pkl`` (a whole pickle), a record for every storage it refers to, big enough, and with ``crc`` each
    member's CRC-32 (one read of the file); a legacy file's five pickles and the lengths of its data records.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "it is empty"
        if zipfile.is_zipfile(path):
            return _zip_problem(path, crc)
        if tarfile.is_tarfile(path):  # torch's oldest format (before 0.4): left to torch
            return None
        return _legacy_problem(path)
    except FileNotFoundError:
        return "it does not exist"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file at ``path`` is damaged, or None: its header must parse and its tensors must cover
    the file exactly (a truncated file fails this). The data is not read: a flipped bit inside it goes unnoticed
    (safetensors has no checksum)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            handle.keys()
    except FileNotFoundError:
        return "it does not exist"
    except (SafetensorError, OSError) as err:
        return f"it is not a whole safetensors file ({str(err).strip() or type(err).__name__})"
    return None
