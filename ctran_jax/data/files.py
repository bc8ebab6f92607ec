"""Original dataset files read where they lie: an extracted folder, a zip, or a tar / tgz.

Datasets arrive as archives of many GB; the builders read them in place instead of
extracting them to disk.  Folders and zips allow random access; a tar (gzip or not) is
read as one stream, since gzip cannot seek: every pass over it reads the whole file, so
callers ask for everything they want from one pass (`Files.read_all`).  Names are
"/"-separated paths relative to the folder, or member names of the archive ("./" dropped).
Paths may be local or any filesystem ``etils.epath`` reads (``gs://``).
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from etils import epath

_TAR_MODES = {".tar": "r|", ".tgz": "r|gz", ".tar.gz": "r|gz"}


def _tar_mode(path: epath.Path) -> str | None:
  name = path.name.lower()
  return next((mode for suffix, mode in _TAR_MODES.items() if name.endswith(suffix)), None)


class Files:
  """The files of one folder or archive (chosen by the name: ``.zip``, ``.tar``, ``.tgz``,
  ``.tar.gz``; anything else is a folder).

  ``url`` (where to download the archive again) ends the message when it is unreadable.
  Archives are opened on first use; `close` (or ``with``) releases a zip.
  """

  def __init__(self, path, url: str | None = None):
    self.path = epath.Path(path)
    self.url = url
    self._tar_mode = _tar_mode(self.path)
    self.is_zip = self.path.name.lower().endswith(".zip")
    self.is_folder = not self.is_zip and self._tar_mode is None
    self._zip: zipfile.ZipFile | None = None
    self._handle: BinaryIO | None = None  # the zip's file
    self._names: list[str] | None = None  # a tar's members, known after one whole pass

  def __enter__(self) -> Files:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()
      self._handle.close()
      self._zip = self._handle = None

  def describe(self, name: str) -> str:
    """Where ``name`` is, for messages."""
    return str(self.path.joinpath(*name.split("/"))) if self.is_folder else f"{self.path}: {name}"

  def _unreadable(self, error: Exception) -> ValueError:
    kind = "zip file" if self.is_zip else "tar archive"
    again = f"download it again from {self.url}" if self.url else "download it again"
    return ValueError(f"{self.path}: not a readable {kind} ({error}); the download may be "
                      f"incomplete, {again}")

  def _zipfile(self) -> zipfile.ZipFile:
    if self._zip is None:
      handle = self.path.open("rb")
      try:
        self._zip = zipfile.ZipFile(handle)
      except zipfile.BadZipFile as e:
        handle.close()
        raise self._unreadable(e) from None
      self._handle = handle
    return self._zip

  # ----------------------------------------------------------------------------- listing

  def names(self) -> list[str]:
    """Every file's name: a folder's sorted, an archive's in archive order."""
    if self.is_folder:
      return sorted(str((directory / f).relative_to(self.path)) for directory, _, files
                    in self.path.walk() for f in files)
    if self.is_zip:
      return [info.filename for info in self._zipfile().infolist() if not info.is_dir()]
    if self._names is None:
      for _ in self.read_all(()):
        pass
    return self._names

  def missing(self, names: Iterable[str]) -> list[str]:
    """The ``names`` that are not files here, in the given order."""
    if self.is_folder:
      return [n for n in names if not self.path.joinpath(*n.split("/")).is_file()]
    present = set(self.names())
    return [n for n in names if n not in present]

  # ----------------------------------------------------------------------------- reading

  def open(self, name: str) -> BinaryIO:
    """One file as a binary stream (folders and zips); FileNotFoundError when absent."""
    if self.is_folder:
      return self.path.joinpath(*name.split("/")).open("rb")
    if self.is_zip:
      try:
        return self._zipfile().open(name)
      except KeyError:
        raise FileNotFoundError(f"{self.path} has no member {name!r}") from None
    raise TypeError(f"{self.path}: a tar is read as a stream; use read_all")

  def read(self, name: str) -> bytes:
    """One file's bytes (folders and zips); FileNotFoundError when absent."""
    with self.open(name) as f:
      return f.read()

  def read_all(self, wanted: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the ``wanted`` files that exist: folders and zips in name order, a
    tar in archive order, in one pass that also lists its members (for `names`)."""
    wanted = set(wanted)
    if self._tar_mode is None:
      for name in sorted(wanted.difference(self.missing(wanted))):
        yield name, self.read(name)
      return
    names = []
    try:
      with self.path.open("rb") as f, tarfile.open(fileobj=f, mode=self._tar_mode) as tar:
        for member in tar:
          if member.isfile():
            name = member.name[2:] if member.name.startswith("./") else member.name
            names.append(name)
            if name in wanted:
              yield name, tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
      raise self._unreadable(e) from e
    self._names = names
