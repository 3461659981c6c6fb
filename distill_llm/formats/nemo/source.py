"""A NeMo checkpoint's files, wherever they are: a `.nemo` tar (read in place, member by member),
an unpacked `.nemo` directory, or a NeMo 2 directory (`context/` + `weights/`).

Untrusted files stay data: a tar's members are checked before anything is read (no absolute
names, no `..`, no links or devices, no member running past the end of the file), and nothing
is ever extracted by `tarfile` itself. Member names are normalised (`./model_config.yaml` ->
`model_config.yaml`).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, Optional

from distill_llm.errors import ConfigError

NEMO1_CONFIG = "model_config.yaml"
NEMO1_WEIGHTS = "model_weights"
NEMO2_CONTEXT = "context"
NEMO2_WEIGHTS = "weights"
NEMO2_CONFIG = "context/model.yaml"


def _clean_name(name: str, where: str) -> str:
    """`name` relative and normalised; ConfigError for an absolute or escaping name."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ConfigError(f"{where}: member {name!r} has an absolute path; refusing the file")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise ConfigError(f"{where}: member {name!r} escapes the archive ('..'); refusing the file")
    return "/".join(parts)


class NemoSource:
    """Read-only access to the files of one NeMo checkpoint (tar or directory)."""

    def __init__(self, path):
        self.path = Path(path)
        self._tar: Optional[tarfile.TarFile] = None
        self._members: dict = {}
        if self.path.is_dir():
            self.kind = "dir"
        elif self.path.is_file():
            self.kind = "tar"
            self._open_tar()
        else:
            raise ConfigError(f"{self.path} does not exist")

    def _open_tar(self) -> None:
        where = str(self.path)
        size = self.path.stat().st_size
        try:
            tar = tarfile.open(self.path, "r:")
            compressed = False
        except tarfile.ReadError:
            try:
                tar = tarfile.open(self.path, "r:gz")
                compressed = True
            except (tarfile.ReadError, OSError, EOFError) as e:
                raise ConfigError(
                    f"{where} is not a .nemo file (neither a tar nor a tar.gz: {e})"
                ) from None
        try:
            members = tar.getmembers()
        except (tarfile.ReadError, EOFError, OSError) as e:
            raise ConfigError(f"{where}: the tar is truncated or damaged ({e})") from None
        for m in members:
            name = _clean_name(m.name, where)
            if m.issym() or m.islnk():
                raise ConfigError(
                    f"{where}: member {m.name!r} is a link; .nemo files hold plain files only"
                )
            if m.isdir():
                continue
            if not m.isfile():
                raise ConfigError(f"{where}: member {m.name!r} is not a regular file; refusing")
            if not compressed and m.offset_data + m.size > size:
                raise ConfigError(
                    f"{where}: the tar is truncated (member {m.name!r} runs past the end of the "
                    "file); copy it again"
                )
            self._members[name] = m
        self._tar = tar
        self.compressed = compressed

    def exists(self, name: str) -> bool:
        """Whether file `name` (relative, '/'-separated) is in the checkpoint."""
        if self._tar is not None:
            return name in self._members
        return (self.path / name).is_file()

    def is_dir(self, name: str) -> bool:
        """Whether `name` is a directory in the checkpoint (a tar: a prefix of a member)."""
        if self._tar is not None:
            return any(m.startswith(name.rstrip("/") + "/") for m in self._members)
        return (self.path / name).is_dir()

    def names(self, under: str = "") -> list:
        """Every file name below directory `under` ('' = all), relative to the checkpoint."""
        prefix = under.rstrip("/") + "/" if under else ""
        if self._tar is not None:
            return sorted(n for n in self._members if n.startswith(prefix))
        root = self.path / under if under else self.path
        if not root.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(root):
            for f in files:
                out.append(str(Path(dirpath, f).relative_to(self.path).as_posix()))
        return sorted(out)

    def open(self, name: str) -> IO[bytes]:
        """A seekable binary stream of file `name` (read in place for a tar)."""
        if self._tar is not None:
            if name not in self._members:
                raise ConfigError(f"{self.path}: member {name!r} is missing")
            fh = self._tar.extractfile(self._members[name])
            if fh is None:  # pragma: no cover - regular files always give a stream
                raise ConfigError(f"{self.path}: member {name!r} cannot be read")
            return fh
        file = self.path / name
        if not file.is_file():
            raise ConfigError(f"{self.path}: {name} is missing")
        return open(file, "rb")

    def read_bytes(self, name: str) -> bytes:
        """The whole content of file `name`; ConfigError if the archive ends early."""
        with self.open(name) as fh:
            try:
                data = fh.read()
            except (tarfile.ReadError, EOFError, OSError) as e:
                raise ConfigError(
                    f"{self.path}: {name} cannot be read ({e}); the file is damaged"
                ) from None
        return data

    def size(self, name: str) -> int:
        """Bytes in file `name`."""
        if self._tar is not None:
            return self._members[name].size
        return (self.path / name).stat().st_size

    def read_text(self, name: str) -> str:
        """File `name` decoded as UTF-8."""
        return self.read_bytes(name).decode("utf-8")

    def stream(self, data: bytes) -> IO[bytes]:
        """A seekable stream over bytes already read (for readers wanting a file object)."""
        return io.BytesIO(data)


def nemo_kind(path) -> Optional[str]:
    """'nemo2' for a NeMo 2 directory, 'nemo1' for a `.nemo` file or its unpacked directory,
    None for anything else (decided from names only; nothing is parsed)."""
    p = Path(path)
    if p.is_dir():
        if (p / NEMO2_CONTEXT).is_dir() or (p / NEMO2_WEIGHTS).is_dir():
            return "nemo2"  # the reader refuses one half without the other
        if (p / NEMO1_CONFIG).is_file():
            return "nemo1"
        return None
    if p.is_file() and p.suffix == ".nemo":
        return "nemo1"
    return None
