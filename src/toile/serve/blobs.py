"""Where uploads and result images live: a :class:`BlobStore`, by name.

The implementation is a folder (:class:`LocalBlobStore`): the data folder's ``uploads/`` and
``images/``. One machine: a local disk. Several machines: the same folder on a shared mount
(NFS, CephFS...), given to every API process and worker as ``--data-dir``; the names are
unique (job and image ids), so processes never write the same file. Files are written to a
temporary name, fsynced, then renamed, so a reader on any machine sees a whole file or none.

Why paths rather than bytes: writers (``uploads.write_durably``, the worker's PNG writer) and
the API's file responses work on files, and a shared mount is the deployment this serves; an
object store would implement the same names with a local cache behind ``upload_path`` and
``image_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

TEMPORARY = ".*.tmp-*"  # what a crash mid-write leaves (see uploads.write_durably, save_png)


class BlobStore(Protocol):
    """Uploads (``<job id>-<field><suffix>``) and result images (``<image id>.png``)."""

    def upload_path(self, name: str) -> Path: ...

    def upload_bytes(self, name: str) -> bytes | None: ...

    def remove_upload(self, name: str) -> None: ...

    def remove_uploads(self, job_id: str) -> None: ...

    def upload_names(self) -> list[str]: ...

    def image_path(self, name: str) -> Path: ...

    def remove_image(self, name: str) -> None: ...

    def sweep(self) -> None: ...


class LocalBlobStore:
    """A :class:`BlobStore` in a folder (local, or a shared mount). Folders 0700, files 0600:
    they hold every client's inputs and results."""

    def __init__(self, uploads_dir: Path, images_dir: Path) -> None:
        self.uploads_dir = uploads_dir
        self.images_dir = images_dir

    def create(self) -> LocalBlobStore:
        for folder in (self.uploads_dir, self.images_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        return self

    @staticmethod
    def _name(name: str) -> str:
        """Only a plain file name: a stored name must never point outside the folder."""
        return Path(name).name

    def upload_path(self, name: str) -> Path:
        return self.uploads_dir / self._name(name)

    def upload_bytes(self, name: str) -> bytes | None:
        path = self.upload_path(name)
        return path.read_bytes() if path.is_file() else None

    def remove_upload(self, name: str) -> None:
        self.upload_path(name).unlink(missing_ok=True)

    def remove_uploads(self, job_id: str) -> None:
        for path in self.uploads_dir.glob(f"{self._name(job_id)}-*"):
            path.unlink(missing_ok=True)

    def upload_names(self) -> list[str]:
        return [path.name for path in self.uploads_dir.iterdir()]

    def image_path(self, name: str) -> Path:
        return self.images_dir / self._name(name)

    def remove_image(self, name: str) -> None:
        self.image_path(name).unlink(missing_ok=True)

    def sweep(self) -> None:
        """Remove the temporary files a crash left half-written. Only where one process owns
        the folder (the embedded server): on a shared mount another machine may be writing
        them right now."""
        for folder in (self.images_dir, self.uploads_dir):
            for path in folder.glob(TEMPORARY):
                path.unlink(missing_ok=True)
