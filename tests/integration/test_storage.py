"""Storage backends: one behavioural suite run against LocalStorage and S3Storage (moto)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from moto.moto_server.werkzeug_app import MotoRequestHandler
from moto.server import ThreadedMotoServer

from core.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    generation_prefix,
    original_key,
    thumbnail_key,
    validate_key,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

BAD_KEY = "storage key"  # every rejection message starts with this
BAD_KEYS = ["../x", "/abs", "a/../../b", "", "a\\b", "a\x00b", "a//b", "a/./b", "a/"]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    original_send_header = MotoRequestHandler.send_header

    def send_header(self: MotoRequestHandler, keyword: str, value: str) -> None:
        # Werkzeug sends "Server: Werkzeug/..." and moto adds its own "server"; in
        # debug mode (PYTHONASYNCIODEBUG=1, -X dev) aiohttp rejects the duplicate.
        if keyword != "Server":
            original_send_header(self, keyword, value)

    # Port 0 lets the server's own bind pick a free port: no probe-then-bind race,
    # and a taken port cannot leave start() waiting forever on its ready event.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MotoRequestHandler, "send_header", send_header)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


async def make_s3(
    endpoint: str,
    *,
    bucket: str | None = None,
    public: str | None = None,
    region: str = "us-east-1",
) -> S3Storage:
    return await S3Storage.create(
        bucket=bucket or f"gengui-test-{uuid.uuid4().hex[:16]}",
        endpoint_url=endpoint,
        public_endpoint_url=public,
        region=region,
        access_key_id="test",
        secret_access_key="test",
        create_bucket=True,
    )


@pytest_asyncio.fixture(loop_scope="session", params=["local", "local-fsync", "s3"])
async def storage(
    request: pytest.FixtureRequest, tmp_path: Path, moto_endpoint: str
) -> AsyncIterator[Storage]:
    store: Storage
    if request.param == "local":
        store = LocalStorage(tmp_path / "store")  # group commit (core.fsync)
    elif request.param == "local-fsync":
        store = LocalStorage(tmp_path / "store", sync="file")
    else:
        store = await make_s3(moto_endpoint)
    try:
        yield store
    finally:
        await store.close()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def key() -> str:
    return original_key(uuid.uuid4(), uuid.uuid4(), 1, "png")


# --- pure helpers ---------------------------------------------------------------
# Async only because the module-wide asyncio mark rejects plain functions.


async def test_key_builders_accept_uuid_and_str() -> None:
    user = uuid.UUID("00000000-0000-0000-0000-000000000001")
    gen = uuid.UUID("00000000-0000-0000-0000-0000000000ff")
    assert original_key(user, gen, 2, "jpg") == (
        "users/00000000-0000-0000-0000-000000000001/generations/"
        "00000000-0000-0000-0000-0000000000ff/2-original.jpg"
    )
    assert thumbnail_key("u1", "g1", 1) == "users/u1/generations/g1/1-thumb-128.webp"


@pytest.mark.parametrize("bad", BAD_KEYS)
async def test_validate_key_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=BAD_KEY):
        validate_key(bad)


async def test_validate_key_accepts_normal_keys() -> None:
    good = "users/u1/generations/g1/original.png"
    assert validate_key(good) == good
    assert validate_key("a..b/c.d") == "a..b/c.d"


# --- both backends --------------------------------------------------------------


async def test_put_get_round_trip(storage: Storage, key: str) -> None:
    data = bytes(range(256)) * 64
    await storage.put(key, data, "image/png")
    assert await storage.get(key) == data


async def test_put_overwrites(storage: Storage, key: str) -> None:
    await storage.put(key, b"first version", "image/png")
    await storage.put(key, b"second", "image/png")
    assert await storage.get(key) == b"second"
    # No leftovers (e.g. local temp files) show up as extra keys.
    assert await storage.list_keys("") == [key]


async def test_get_missing_raises_object_not_found(storage: Storage, key: str) -> None:
    with pytest.raises(ObjectNotFound) as info:
        await storage.get(key)
    assert info.value.key == key
    assert isinstance(info.value, KeyError)


async def test_exists(storage: Storage, key: str) -> None:
    assert await storage.exists(key) is False
    await storage.put(key, b"x", "image/png")
    assert await storage.exists(key) is True
    # A "directory" is only a prefix of other keys, never an object itself.
    parent = key.rpartition("/")[0]
    assert await storage.exists(parent) is False
    with pytest.raises(ObjectNotFound):
        await storage.get(parent)


async def test_delete_is_idempotent(storage: Storage, key: str) -> None:
    await storage.delete(key)  # missing: no error
    await storage.put(key, b"x", "image/png")
    await storage.delete(key)
    assert await storage.exists(key) is False
    await storage.delete(key)
    with pytest.raises(ObjectNotFound):
        await storage.get(key)


async def test_delete_of_prefix_keeps_objects(storage: Storage, key: str) -> None:
    await storage.put(key, b"x", "image/png")
    await storage.delete(key.rpartition("/")[0])
    assert await storage.get(key) == b"x"


async def test_list_keys_by_prefix(storage: Storage) -> None:
    keys = [
        original_key("u1", "g1", 1, "png"),
        thumbnail_key("u1", "g1", 1),
        original_key("u1", "g2", 1, "jpg"),
        original_key("u10", "g3", 1, "png"),
        original_key("u2", "g4", 1, "png"),
    ]
    for k in keys:
        await storage.put(k, k.encode(), "application/octet-stream")
    assert await storage.list_keys("users/u1/") == sorted(keys[:3])
    # A plain string prefix, as in S3: "users/u1" also matches "users/u10/...".
    assert await storage.list_keys("users/u1") == sorted(keys[:4])
    assert await storage.list_keys("users/u1/generations/g1/1-thumb") == [keys[1]]
    assert await storage.list_keys("") == sorted(keys)
    assert await storage.list_keys("users/nobody/") == []


@pytest.mark.parametrize("bad", BAD_KEYS)
async def test_every_method_rejects_bad_keys(storage: Storage, bad: str) -> None:
    with pytest.raises(ValueError, match=BAD_KEY):
        await storage.put(bad, b"x", "image/png")
    with pytest.raises(ValueError, match=BAD_KEY):
        await storage.get(bad)
    with pytest.raises(ValueError, match=BAD_KEY):
        await storage.exists(bad)
    with pytest.raises(ValueError, match=BAD_KEY):
        await storage.delete(bad)
    with pytest.raises(ValueError, match=BAD_KEY):
        await storage.presigned_url(bad, 60)
    with pytest.raises(ValueError, match=BAD_KEY):
        storage.local_path(bad)
    assert await storage.list_keys("") == []


@pytest.mark.parametrize("bad", ["../", "/abs", "a/../"])
async def test_list_keys_rejects_bad_prefix(storage: Storage, bad: str) -> None:
    with pytest.raises(ValueError, match=BAD_KEY):
        await storage.list_keys(bad)


async def test_close_is_idempotent(storage: Storage) -> None:
    await storage.close()
    await storage.close()


# --- local backend --------------------------------------------------------------


async def test_local_url_is_none_and_path_points_at_file(tmp_path: Path, key: str) -> None:
    store = LocalStorage(tmp_path)
    await store.put(key, b"local bytes", "image/png")
    assert await store.presigned_url(key, 60) is None
    path = store.local_path(key)
    assert path == store.root / key
    assert path.read_bytes() == b"local bytes"


async def test_local_never_escapes_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    # A symlink inside the root must not become a way out of it.
    (root / "link").symlink_to(outside, target_is_directory=True)
    store = LocalStorage(root)
    with pytest.raises(ValueError, match=BAD_KEY):
        await store.put("link/escaped.png", b"x", "image/png")
    with pytest.raises(ValueError, match=BAD_KEY):
        await store.put("a/../../outside/escaped.png", b"x", "image/png")
    with pytest.raises(ValueError, match=BAD_KEY):
        store.local_path("link/escaped.png")
    assert names(outside) == []
    assert names(tmp_path) == ["outside", "root"]
    # Nor may listing reveal what lies behind the link.
    (outside / "secret.png").write_bytes(b"s")
    assert await store.list_keys("") == []
    assert await store.list_keys("link/") == []


async def test_local_failed_put_keeps_old_object_and_no_temp(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path)
    await store.put(key, b"old", "image/png")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        await store.put(key, b"new and longer", "image/png")
    monkeypatch.undo()

    assert await store.get(key) == b"old"
    # The temp file was removed, so the directory holds only the real object.
    assert names((tmp_path / key).parent) == [key.rsplit("/", 1)[1]]


async def test_local_temp_name_keys_rejected(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    with pytest.raises(ValueError, match=BAD_KEY):
        await store.put("a/.tmp-x", b"x", "image/png")


# --- S3 backend -----------------------------------------------------------------


async def test_s3_presigned_url_serves_bytes(moto_endpoint: str, key: str) -> None:
    public = moto_endpoint.replace("127.0.0.1", "localhost")
    store = await make_s3(moto_endpoint, public=public)
    try:
        data = b"\x89PNG fake image bytes"
        await store.put(key, data, "image/png")
        assert store.local_path(key) is None
        url = await store.presigned_url(key, 300)
        assert url is not None
        # Signed for the public host, not the one the server talks to.
        assert url.startswith(f"{public}/{store.bucket}/")
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == data
            assert resp.headers["Content-Type"] == "image/png"
    finally:
        await store.close()


# us-east-1 re-creates silently; other regions answer BucketAlreadyOwnedByYou.
@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
async def test_s3_create_bucket_is_idempotent(moto_endpoint: str, key: str, region: str) -> None:
    bucket = f"gengui-test-{uuid.uuid4().hex[:16]}"
    first = await make_s3(moto_endpoint, bucket=bucket, region=region)
    try:
        await first.put(key, b"kept", "image/png")
        second = await make_s3(moto_endpoint, bucket=bucket, region=region)
        try:
            assert await second.get(key) == b"kept"
        finally:
            await second.close()
    finally:
        await first.close()


async def test_discard_partials_removes_only_half_written_files(storage: Storage, key: str) -> None:
    await storage.put(key, b"whole", "image/png")
    prefix = key.rpartition("/")[0] + "/"
    expected = 0
    if isinstance(storage, LocalStorage):
        # What a writer killed between write and rename leaves behind.
        partial = storage.root / prefix / ".tmp-killed"
        partial.write_bytes(b"half")
        expected = 1
    assert await storage.discard_partials(prefix) == expected
    assert await storage.list_keys(prefix) == [key]
    assert await storage.get(key) == b"whole"
    if isinstance(storage, LocalStorage):
        assert not (storage.root / prefix / ".tmp-killed").exists()


async def test_discard_partials_clears_every_prefix_named_and_no_other(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    owner = uuid.uuid4()
    gens = [uuid.uuid4() for _ in range(3)]
    partials = []
    for i, gid in enumerate(gens):
        await storage.put(original_key(owner, gid, 1, "png"), b"whole", "image/png")
        # The first in a directory per attempt, as keys were laid out before.
        parent = tmp_path / generation_prefix(owner, gid) / ("1" if i == 0 else "")
        parent.mkdir(exist_ok=True)
        partials.append(parent / ".tmp-killed")
        partials[-1].write_bytes(b"half")
    named = [generation_prefix(owner, gid) for gid in gens[:2]]
    assert await storage.discard_partials(*named) == 2
    assert await storage.discard_partials() == 0
    assert [p.exists() for p in partials] == [False, False, True]


@pytest.mark.parametrize("named", [1, 40])  # on the loop, and on a thread (over 16)
async def test_discard_partials_follows_no_symlink_out_of_the_root(
    tmp_path: Path, named: int
) -> None:
    """A generation directory, or a directory above it, that is a symlink to somewhere
    else is not read: the temp-looking files there are not the storage's."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    storage = LocalStorage(root)
    outside.mkdir()
    bait = outside / ".tmp-not-ours"
    bait.write_bytes(b"keep")
    owner, linked_owner = uuid.uuid4(), uuid.uuid4()
    gens = [uuid.uuid4() for _ in range(named)]
    for gid in gens:
        await storage.put(original_key(owner, gid, 1, "png"), b"whole", "image/png")
        (root / generation_prefix(owner, gid) / ".tmp-killed").write_bytes(b"half")
    # The generation directory itself a link...
    linked_gen = uuid.uuid4()
    (root / generation_prefix(owner, linked_gen)).symlink_to(outside, target_is_directory=True)
    # ...and a user's generations directory a link.
    (root / "users" / str(linked_owner)).mkdir(parents=True)
    (root / "users" / str(linked_owner) / "generations").symlink_to(outside)
    (outside / str(gens[0])).mkdir()
    deeper_bait = outside / str(gens[0]) / ".tmp-not-ours"
    deeper_bait.write_bytes(b"keep")
    prefixes = [generation_prefix(owner, gid) for gid in gens]
    prefixes += [generation_prefix(owner, linked_gen), generation_prefix(linked_owner, gens[0])]
    assert await storage.discard_partials(*prefixes) == named
    assert bait.read_bytes() == deeper_bait.read_bytes() == b"keep"
    assert not any(p.name.startswith(".tmp-") for p in root.rglob("*") if not p.is_symlink())


async def test_discard_partials_of_the_whole_store(tmp_path: Path) -> None:
    """The empty prefix names the root: every partial under it goes, objects stay."""
    storage = LocalStorage(tmp_path)
    key = original_key(uuid.uuid4(), uuid.uuid4(), 1, "png")
    await storage.put(key, b"whole", "image/png")
    (tmp_path / ".tmp-at-root").write_bytes(b"half")
    (tmp_path / key).with_name(".tmp-deep").write_bytes(b"half")
    assert await storage.discard_partials("") == 2
    assert await storage.list_keys("") == [key]
    assert not [n for _, _, files in os.walk(tmp_path) for n in files if n.startswith(".tmp-")]
