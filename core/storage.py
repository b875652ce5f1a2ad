"""Object storage for generated images: a local directory or S3 (AWS, MinIO, R2)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import aioboto3
import botocore.config
from botocore.exceptions import ClientError

from core.fsync import GroupSync, syncfs_available

# Local temp files live beside their target so os.replace stays a same-filesystem rename.
_TMP_PREFIX = ".tmp-"
# Directories LocalStorage remembers as checked (a generation's adds one); then it forgets.
_DIRS_REMEMBERED = 4096
# discard_partials reads up to this many directories on the loop, more on a thread.
_SCANS_ON_LOOP = 16
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class ObjectNotFound(KeyError):
    """No object is stored under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"object not found: {self.key!r}"


@runtime_checkable
class Storage(Protocol):
    """A flat key -> bytes store; keys are '/'-separated relative paths."""

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` atomically, replacing any object under `key`."""

    async def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFound when missing."""

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    async def list_keys(self, prefix: str) -> list[str]:
        """Every key starting with `prefix` (plain string prefix), sorted."""

    async def discard_partials(self, *prefixes: str) -> int:
        """Delete half-written objects under each prefix (a writer killed mid-put);
        returns how many. Backends whose puts are atomic have none."""

    async def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A time-limited public GET URL, or None when the API must stream it."""

    def local_path(self, key: str) -> Path | None:
        """The file backing `key` for direct streaming, or None if not on disk."""

    async def close(self) -> None: ...


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise ValueError."""
    if not key:
        raise ValueError("storage key is empty")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"storage key has a NUL or backslash: {key!r}")
    if key.startswith("/"):
        raise ValueError(f"storage key is absolute: {key!r}")
    # Empty and '.' segments are rejected too: S3 would keep them verbatim while a
    # filesystem collapses them, so the two backends would disagree on the key.
    if any(seg in ("", ".", "..") for seg in key.split("/")):
        raise ValueError(f"storage key has an empty, '.' or '..' segment: {key!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    # A prefix may be "" or end with "/" (a "directory"); otherwise it obeys key rules.
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def generation_prefix(user_id: uuid.UUID | str, generation_id: uuid.UUID | str) -> str:
    """Every object of one generation, all attempts, lives under this prefix."""
    return f"users/{user_id}/generations/{generation_id}/"


async def sweep(storage: Storage, prefix: str, keep: set[str]) -> list[str]:
    """Delete every object under ``prefix`` but ``keep``; returns the deleted keys.

    An attempt whose worker stored its image but whose report was lost (a Redis
    restart, a crash between upload and report) leaves an object nothing refers to;
    the attempt that wins sweeps it."""
    stale = [key for key in await storage.list_keys(prefix) if key not in keep]
    for key in stale:
        await storage.delete(key)
    return stale


async def clear_generation(
    storage: Storage, user_id: uuid.UUID | str, generation_id: uuid.UUID | str
) -> int:
    """A generation that ended without an image (failed, cancelled) keeps no object:
    not an image whose report was lost, not a half-written file."""
    prefix = generation_prefix(user_id, generation_id)
    partials = await storage.discard_partials(prefix)
    return partials + len(await sweep(storage, prefix, keep=set()))


# Keys carry the attempt: a late result of an older attempt can never overwrite the
# image of a newer one, and the status consumer deletes such a refused object by key.
# The attempt is a name prefix, not a directory: on a local disk each directory is an
# inode and a block of its own, and the two mkdirs per image that a directory per
# attempt took were a fifth of the worker's CPU (bench/README.md). Rows keep the key
# they were stored under, so images stored as ``<attempt>/original.<ext>`` still serve.
def original_key(
    user_id: uuid.UUID | str, generation_id: uuid.UUID | str, attempt: int, ext: str
) -> str:
    """Key of a generation's full-size image."""
    return validate_key(f"{generation_prefix(user_id, generation_id)}{attempt}-original.{ext}")


def thumbnail_key(user_id: uuid.UUID | str, generation_id: uuid.UUID | str, attempt: int) -> str:
    """Key of a generation's 128px WebP thumbnail."""
    return validate_key(f"{generation_prefix(user_id, generation_id)}{attempt}-thumb-128.webp")


class LocalStorage:
    """Objects as files under `root`; blocking I/O runs in worker threads (but for
    ``discard_partials`` of a few directories, cheaper than a thread hop).

    ``sync="group"`` (where ``syncfs`` exists) makes concurrent writes durable together,
    one ``syncfs`` for all of them (``core.fsync``); ``"file"`` fsyncs each file and its
    directory."""

    def __init__(self, root: Path, *, sync: Literal["group", "file"] = "group") -> None:
        self.root = root.resolve()
        self._root = str(self.root)
        self._group: GroupSync | None = None
        if sync == "group" and syncfs_available():
            self._group = GroupSync(self.root)
        # Key prefix -> its real directory, checked to be inside root (``_dir``,
        # ``_existing_dir``; a symlink put in place of one after that is not noticed).
        self._dirs: dict[str, str] = {}

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.rsplit("/", 1)[-1].startswith(_TMP_PREFIX):
            raise ValueError(f"storage key collides with temp file names: {key!r}")
        # resolve() follows symlinks, so a link inside root pointing out is caught too.
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def _dir(self, prefix: str) -> str:
        """The real directory of a key prefix ("a/b"), made if missing; ValueError if
        it is, through a symlink, outside root. Remembered once made or checked, so a
        write costs one ``mkdir`` for its generation's new directory and nothing for
        the ones above it, where a ``realpath`` took an ``lstat`` per component (a
        symlink put in place of a directory after that is not noticed)."""
        known = self._dirs.get(prefix)
        if known is not None:
            return known
        head, _, name = prefix.rpartition("/")
        path = os.path.join(self._dir(head) if head else self._made_root(), name)
        try:
            os.mkdir(path)
        except FileExistsError:
            if os.path.islink(path) or not os.path.isdir(path):
                real = os.path.realpath(path)
                if not os.path.isdir(real) or not self._inside(real):
                    raise ValueError(f"storage key escapes the storage root: {prefix!r}") from None
                path = real
        self._remember(prefix, path)
        return path

    def _existing_dir(self, prefix: str) -> str | None:
        """The real directory of a key prefix if it exists inside root (None otherwise),
        remembered as ``_dir`` remembers the ones it made; never makes one."""
        if not prefix:
            return self._root
        known = self._dirs.get(prefix)
        if known is not None:
            return known
        real = os.path.realpath(os.path.join(self._root, prefix))
        if not self._inside(real) or not os.path.isdir(real):
            return None
        self._remember(prefix, real)
        return real

    def _remember(self, prefix: str, path: str) -> None:
        if len(self._dirs) >= _DIRS_REMEMBERED:
            self._dirs.clear()
        self._dirs[prefix] = path

    def _inside(self, real: str) -> bool:
        """Whether a resolved path is the root or below it."""
        return os.path.commonpath([real, self._root]) == self._root

    def _made_root(self) -> str:
        if "" not in self._dirs:
            os.makedirs(self._root, exist_ok=True)
            self._dirs[""] = self._root
        return self._root

    def write_file(self, key: str, data: bytes) -> str:
        """Blocking: write the object's file (a temp file renamed over the key) and return
        its path. With group sync it is not durable until ``durable(path)`` returns;
        otherwise the file and its directory are fsynced here. For a caller already off
        the event loop (the local worker stores on its engine thread)."""
        validate_key(key)
        prefix, _, name = key.rpartition("/")
        if name.startswith(_TMP_PREFIX):
            raise ValueError(f"storage key collides with temp file names: {key!r}")
        for retry in (False, True):
            directory = self._dir(prefix) if prefix else self._made_root()
            tmp = os.path.join(directory, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
            try:
                fd = _create(tmp)
                break
            except FileNotFoundError:
                # A remembered directory was removed meanwhile: make it again, once.
                # Only here: a temp file gone before its rename was cleared by the
                # generation's winning report (``discard_partials``); that writer is
                # stale, and its rename fails.
                if retry:
                    raise
                self._dirs.clear()
        path = os.path.join(directory, name)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self._group is None:
                    # Without fsync a crash after the rename can leave an empty file.
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self._group is None:
            # Persist the rename itself (the directory entry).
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path

    async def durable(self, path: str) -> None:
        """Return once the file ``write_file`` returned, its rename and any new directory
        are on disk (with group sync, together with the other writers'). Until then
        nobody is told of the object, so a crash before it loses only an object no
        report names (swept when its generation completes). If the sync fails the file
        is deleted (not durable: not kept) and the error raised."""
        if self._group is None:
            return
        try:
            await self._group.wait()
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        # content_type is not stored: the API derives it from the key's extension.
        # One hop for the whole write: resolving the path also touches the filesystem.
        await self.durable(await asyncio.to_thread(self.write_file, key, data))

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def unlink() -> None:
            # A directory is only a key prefix, never an object: nothing to delete.
            if not path.is_dir():
                path.unlink(missing_ok=True)

        await asyncio.to_thread(unlink)

    async def list_keys(self, prefix: str) -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest directory the prefix names, not the whole tree.
        base = self.root / prefix.rpartition("/")[0]

        def walk() -> list[str]:
            # os.walk follows a symlinked top dir; never list names from outside root.
            if not base.resolve().is_relative_to(self.root):
                return []
            keys: list[str] = []
            for dirpath, _dirs, files in os.walk(base):
                rel = Path(dirpath).relative_to(self.root)
                for name in files:
                    if name.startswith(_TMP_PREFIX):
                        continue
                    key = (rel / name).as_posix()
                    if key.startswith(prefix):
                        keys.append(key)
            return sorted(keys)

        return await asyncio.to_thread(walk)

    async def discard_partials(self, *prefixes: str) -> int:
        # The directory each prefix names ("a/b/" -> "a/b"; "" is the root).
        dirs = [_validate_prefix(p).rpartition("/")[0] for p in prefixes]
        if len(dirs) > _SCANS_ON_LOOP:
            # Many prefixes, one thread hop: the status consumer clears a batch at once.
            return await asyncio.to_thread(self._discard_all, dirs)
        # A few directory reads cost less than the hop to a thread and back (on the
        # 2-core VM of bench/README.md: 13 us a directory, 150 us of CPU a hop).
        return self._discard_all(dirs)

    def _discard_all(self, dirs: list[str]) -> int:
        removed = 0
        for prefix in dirs:
            head, _, name = prefix.rpartition("/")
            parent = self._existing_dir(head)
            if parent is None:
                continue  # missing, or a symlink out of the root
            try:
                # The root was resolved when opened; below it no symlink is followed.
                fd = os.open(os.path.join(parent, name) if name else parent, _DIR_NOFOLLOW)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue  # the directory itself is a symlink: not followed
                raise
            removed += _discard_in(fd)
        return removed

    async def presigned_url(self, key: str, expires_s: int) -> str | None:
        validate_key(key)
        return None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def close(self) -> None:
        if self._group is not None:
            self._group.close()


def _discard_in(fd: int) -> int:
    """Delete the temp files in the directory open as ``fd`` and below it, never
    following a symlink; closes ``fd``."""
    removed = 0
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    try:
                        sub = os.open(entry.name, _DIR_NOFOLLOW, dir_fd=fd)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # gone, or replaced meanwhile
                    removed += _discard_in(sub)
                elif entry.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
                        removed += 1
    finally:
        os.close(fd)
    return removed


def _create(path: str) -> int:
    """A new file for writing, 0644 less the umask: objects read like any other file."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage:
    """Objects in one S3 bucket through a single long-lived aioboto3 client."""

    def __init__(
        self, bucket: str, client: Any, presigner: Any, stack: contextlib.AsyncExitStack
    ) -> None:
        self.bucket = bucket
        self._client = client
        self._presigner = presigner
        self._stack = stack

    @classmethod
    async def create(
        cls,
        bucket: str,
        endpoint_url: str | None,
        public_endpoint_url: str | None,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        create_bucket: bool = False,
    ) -> S3Storage:
        """Open the clients (and the bucket, if asked); call close() when done."""
        session = aioboto3.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        config = botocore.config.Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # botocore >=1.36 sends CRC checksums that MinIO/R2 versions may reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                session.client("s3", endpoint_url=endpoint_url, config=config)
            )
            presigner = client
            # The host is signed, so URLs for browsers need a client on the public host.
            if public_endpoint_url and public_endpoint_url != endpoint_url:
                presigner = await stack.enter_async_context(
                    session.client("s3", endpoint_url=public_endpoint_url, config=config)
                )
            storage = cls(bucket, client, presigner, stack)
            if create_bucket:
                await storage._create_bucket(region)
        except BaseException:
            await stack.aclose()
            raise
        return storage

    async def _create_bucket(self, region: str) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        # us-east-1 is the default location and rejects an explicit constraint.
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        # A PUT is atomic in S3: readers see the old object or the new one.
        await self._client.put_object(
            Bucket=self.bucket, Key=validate_key(key), Body=data, ContentType=content_type
        )

    async def get(self, key: str) -> bytes:
        try:
            obj = await self._client.get_object(Bucket=self.bucket, Key=validate_key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            raise
        async with obj["Body"] as body:
            data: bytes = await body.read()
        return data

    async def exists(self, key: str) -> bool:
        try:
            await self._client.head_object(Bucket=self.bucket, Key=validate_key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise
        return True

    async def delete(self, key: str) -> None:
        await self._client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    async def list_keys(self, prefix: str) -> list[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        keys: list[str] = []
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=_validate_prefix(prefix)):
            keys.extend(str(item["Key"]) for item in page.get("Contents", []))
        return sorted(keys)

    async def discard_partials(self, *prefixes: str) -> int:
        for prefix in prefixes:
            _validate_prefix(prefix)
        return 0  # an S3 PUT is atomic: there is no half-written object

    async def presigned_url(self, key: str, expires_s: int) -> str | None:
        url: str = await self._presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": validate_key(key)},
            ExpiresIn=expires_s,
        )
        return url

    def local_path(self, key: str) -> Path | None:
        validate_key(key)
        return None

    async def close(self) -> None:
        await self._stack.aclose()
