"""The artifact store: data sets, model folders and other blobs by key, on a local folder or S3 (fsspec)."""

import hashlib
import shutil
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem


class ArtifactStore:
    """Blobs and folders under `url` (a local path, `file://...` or `s3://bucket/prefix`), by key."""

    def __init__(self, url: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def uri(self, key: str) -> str:
        """The URI of `key`: a plain path for a local store, `protocol://...` otherwise."""
        path = f"{self.root}/{key.strip('/')}"
        return path if self.is_local else f"{self.protocol}://{path}"

    def _path(self, uri: str) -> str:
        return self.fs._strip_protocol(uri)

    def exists(self, uri: str) -> bool:
        """Whether something is stored at `uri`."""
        return self.fs.exists(self._path(uri))

    def put_file(self, local_path: Path, key: str) -> str:
        """Copy one local file to `key` (written beside, then moved, so readers never see half a file)."""
        target = self.uri(key)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{target}.partial")
            shutil.copyfile(local_path, partial)
            partial.replace(target)
        else:
            self.fs.put_file(str(local_path), self._path(target))
        return target

    def put_dir(self, local_dir: Path, key: str) -> str:
        """Copy a local folder to `key`, replacing what was there; returns its URI."""
        target = self.uri(key)
        if self.is_local:
            staging = Path(f"{target}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(local_dir, staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)
        else:
            if self.fs.exists(self._path(target)):
                self.fs.rm(self._path(target), recursive=True)
            self.fs.put(f"{str(local_dir).rstrip('/')}/", self._path(target), recursive=True)
        return target

    def put_text(self, text: str, key: str) -> str:
        """Store a small text at `key`, whole or not at all for a reader; returns its URI."""
        target = self.uri(key)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{target}.partial")
            partial.write_text(text)
            partial.replace(target)
        else:
            self.fs.pipe_file(self._path(target), text.encode())
        return target

    def read_text(self, uri: str) -> str | None:
        """The text stored at `uri`, or None when there is none."""
        try:
            return self.fs.cat_file(self._path(uri)).decode()
        except FileNotFoundError:
            return None

    def get_dir(self, uri: str, local_dir: Path) -> Path:
        """Copy the stored folder `uri` to `local_dir`, replacing what was there."""
        shutil.rmtree(local_dir, ignore_errors=True)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.is_local:
            shutil.copytree(self._path(uri), local_dir)
        else:
            self.fs.get(f"{self._path(uri)}/", str(local_dir), recursive=True)
        return local_dir

    def list_names(self, uri: str) -> list[str]:
        """The names of the entries of the stored folder `uri` (none when it does not exist)."""
        path = self._path(uri)
        if not self.fs.exists(path):
            return []
        return sorted(Path(entry).name for entry in self.fs.ls(path, detail=False))

    def list_files(self, uri: str) -> list[str]:
        """The paths, relative to the stored folder `uri`, of every file under it (none when it does not exist)."""
        path = self._path(uri).rstrip("/")
        if not self.fs.exists(path):
            return []
        return sorted(found[len(path) + 1 :] for found in self.fs.find(path) if not found.endswith(".partial"))

    def open(self, uri: str, mode: str = "rb") -> IO[bytes]:
        """Open a stored file."""
        return self.fs.open(self._path(uri), mode)

    def delete(self, uri: str) -> None:
        """Remove a stored file or folder; a missing one is not an error."""
        path = self._path(uri)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def local_file(self, uri: str, cache: Path) -> Path:
        """A local path to a stored file: itself for a local store, a cached download otherwise."""
        if self.is_local:
            return Path(self._path(uri))
        target = cache / "store" / hashlib.sha256(uri.encode()).hexdigest()[:32] / Path(uri).name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.partial")
            self.fs.get_file(self._path(uri), str(partial))
            partial.replace(target)
        return target

    def local_dir(self, uri: str, cache: Path) -> Path:
        """A local path to a stored folder: itself for a local store, a cached download otherwise."""
        if self.is_local:
            return Path(self._path(uri))
        target = cache / "store" / hashlib.sha256(uri.encode()).hexdigest()[:32] / Path(uri).name
        if not target.exists():
            staging = target.with_name(f"{target.name}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(f"{self._path(uri)}/", str(staging), recursive=True)
            staging.replace(target)
        return target
