"""Object storage behind one small interface: a local folder or an S3-compatible bucket.

Keys are relative POSIX paths ("models/<id>/model.onnx"). Writes are all-or-nothing: a reader never
sees a half-written object (local: write to a temporary name, then rename; S3: an upload becomes
visible only when complete).
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

CHUNK = 1024 * 1024


class ObjectMissing(Exception):
    pass


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def adopt_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, dest: Path) -> Path: ...
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def ping(self) -> None: ...


def tenant_prefix(tenant_id: str) -> str:
    """Where a tenant's uploads lie: one folder per tenant, so its objects can be listed, sized or
    removed as one."""
    return f"tenants/{tenant_id}/"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def adopt_file(self, key: str, path: Path) -> None:
        """put_file for a temporary file the caller is done with: renamed into place when it lies on
        the same file system (an upload part is then written once, not twice), else copied; `path`
        is gone afterwards either way."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(path, target)
        except OSError:  # another file system (EXDEV): the ordinary copy
            self.put_file(key, path)
            Path(path).unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise ObjectMissing(key)
        shutil.copyfile(source, dest)
        return dest

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        source = self._path(key)
        if not source.is_file():
            raise ObjectMissing(key)
        with open(source, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def size(self, key: str) -> int:
        source = self._path(key)
        if not source.is_file():
            raise ObjectMissing(key)
        return source.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        folder = self._path(prefix.rstrip("/"))
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"storage folder {self.root} is not writable")


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "us-east-1"):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )

    def presigned_get(self, key: str, *, filename: str, expires_s: int) -> str:
        """A URL that GETs the object without credentials for `expires_s` seconds, served as an
        attachment named `filename` (the download then goes from S3, not through the API)."""
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=expires_s,
            Params={"Bucket": self.bucket, "Key": self._key(key),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"'})

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def adopt_file(self, key: str, path: Path) -> None:
        self.put_file(key, path)
        Path(path).unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> Path:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(dest))
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectMissing(key) from exc
            raise
        return dest

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectMissing(key) from exc
            raise
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectMissing(key) from exc
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except ObjectMissing:
            return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/")) + "/"):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def open_store(url: str, *, endpoint_url: str = "", region: str = "us-east-1") -> ObjectStore:
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url, region=region)
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalStore(Path(url))
