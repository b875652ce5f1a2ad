"""``providers.download``: every refusal, against a real local file server."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from core.errors import ProviderRejected, ProviderRetryable
from providers.download import download, fetch, host_allowed, is_public
from providers.mock.state import png
from tests.providers.conftest import serve

IMAGE = png(16, 16, 3, 64)
BIG = b"x" * 10_000


@dataclass
class Files:
    url: str
    port: int
    hosts_seen: list[str] = field(default_factory=list)


def files_app(release: asyncio.Event, hosts_seen: list[str]) -> web.Application:
    async def image(request: web.Request) -> web.Response:
        hosts_seen.append(request.headers.get("Host", ""))
        return web.Response(body=IMAGE, content_type="image/png")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG, content_type="image/png")

    async def stream(request: web.Request) -> web.StreamResponse:
        # Chunked, no Content-Length: only counting the bytes can stop it.
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"y" * 1000)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=IMAGE)

    async def redirect(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise web.HTTPFound("/image.png" if n <= 1 else f"/redirect/{n - 1}")

    async def to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    app = web.Application()
    app.router.add_get("/image.png", image)
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/redirect/{n}", redirect)
    app.router.add_get("/to", to)

    async def on_shutdown(app: web.Application) -> None:
        release.set()

    app.on_shutdown.append(on_shutdown)
    return app


@pytest_asyncio.fixture
async def files() -> AsyncIterator[Files]:
    seen: list[str] = []
    runner, url = await serve(files_app(asyncio.Event(), seen))
    yield Files(url, int(url.rsplit(":", 1)[1]), seen)
    await runner.cleanup()


def get(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "allowed_hosts": ("127.0.0.1",),
        "allow_http": True,
        "max_bytes": 1_000_000,
        "timeout_s": 5.0,
    }
    options.update(kw)
    return download(http, url, **options)


async def test_downloads_an_image(http: aiohttp.ClientSession, files: Files) -> None:
    assert await get(http, f"{files.url}/image.png") == (IMAGE, "image/png")


async def refused(coro: Any) -> ProviderRejected:
    with pytest.raises(ProviderRejected) as info:
        await coro
    return info.value


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1/", "data:,x"]
)
async def test_refuses_other_schemes(http: aiohttp.ClientSession, url: str) -> None:
    assert (await refused(get(http, url))).code == "download_scheme_refused"


async def test_refuses_http_unless_allowed(http: aiohttp.ClientSession, files: Files) -> None:
    exc = await refused(get(http, f"{files.url}/image.png", allow_http=False))
    assert exc.code == "download_scheme_refused"


async def test_refuses_hosts_off_the_allowlist(http: aiohttp.ClientSession, files: Files) -> None:
    url = f"http://localhost:{files.port}/image.png"  # same server, another name
    assert (await refused(get(http, url))).code == "download_host_refused"
    assert (await refused(get(http, "http://u:p@127.0.0.1/x"))).code == "download_host_refused"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("replicate.delivery", True),
        ("pbxt.replicate.delivery", True),
        ("a.b.replicate.delivery", True),
        ("REPLICATE.DELIVERY.", True),
        ("evilreplicate.delivery", False),
        ("replicate.delivery.evil.com", False),
        ("delivery", False),
        ("example.com", False),
    ],
)
def test_host_allowlist(host: str, allowed: bool) -> None:
    assert host_allowed(host, ("replicate.delivery", "*.replicate.delivery")) is allowed


def test_wildcard_does_not_match_the_bare_suffix() -> None:
    assert not host_allowed("replicate.delivery", ("*.replicate.delivery",))


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "169.254.169.254", "10.0.0.7"])
async def test_refuses_ip_literals_in_production(http: aiohttp.ClientSession, host: str) -> None:
    bare = host.strip("[]")
    exc = await refused(get(http, f"https://{host}/x.png", allowed_hosts=(bare,), allow_http=False))
    assert exc.code == "download_address_refused"


async def test_refuses_names_that_resolve_inside(http: aiohttp.ClientSession) -> None:
    """``localhost`` is on the allowlist here, but it resolves to loopback."""
    exc = await refused(
        get(http, "https://localhost:9/x.png", allowed_hosts=("localhost",), allow_http=False)
    )
    assert exc.code == "download_address_refused"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("224.0.0.1", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(address) is public


async def test_refuses_a_declared_oversize_body(http: aiohttp.ClientSession, files: Files) -> None:
    exc = await refused(get(http, f"{files.url}/big", max_bytes=4096))
    assert exc.code == "download_too_large"


async def test_stops_reading_an_oversize_stream(http: aiohttp.ClientSession, files: Files) -> None:
    exc = await refused(get(http, f"{files.url}/stream", max_bytes=4096))
    assert exc.code == "download_too_large"
    data, _ = await get(http, f"{files.url}/stream", max_bytes=10_000)
    assert data == b"y" * 10_000  # exactly at the cap is fine


async def test_follows_three_redirects_not_four(http: aiohttp.ClientSession, files: Files) -> None:
    assert (await get(http, f"{files.url}/redirect/3"))[0] == IMAGE
    exc = await refused(get(http, f"{files.url}/redirect/4"))
    assert exc.code == "download_redirect_refused"


async def test_rechecks_each_redirect(http: aiohttp.ClientSession, files: Files) -> None:
    off_list = f"http://localhost:{files.port}/image.png"
    exc = await refused(get(http, f"{files.url}/to?url={off_list}"))
    assert exc.code == "download_host_refused"
    exc = await refused(get(http, f"{files.url}/to?url=file:///etc/passwd"))
    assert exc.code == "download_scheme_refused"


async def test_timeout_is_retryable(http: aiohttp.ClientSession, files: Files) -> None:
    with pytest.raises(ProviderRetryable) as info:
        await get(http, f"{files.url}/slow", timeout_s=0.2)
    assert info.value.code == "download_timeout"


async def test_http_errors_are_retryable(http: aiohttp.ClientSession, files: Files) -> None:
    with pytest.raises(ProviderRetryable) as info:
        await get(http, f"{files.url}/gone")
    assert info.value.code == "download_failed"


async def test_unreachable_is_retryable(http: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ProviderRetryable) as info:
        await get(http, f"http://127.0.0.1:{port}/x.png")
    assert info.value.code == "download_unreachable"


# -- the pinned path: connect to the checked address, keep the name for Host and TLS ---


def _certificate(name: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_pinned_https_keeps_the_name_for_tls_and_host(tmp_path: Any) -> None:
    """In production the request goes to the address that passed the check; TLS still
    verifies the certificate against the URL's name, and ``Host`` still carries it."""
    cert_pem, key_pem = _certificate("images.test")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())

    seen: list[str] = []
    release = asyncio.Event()
    runner = web.AppRunner(files_app(release, seen), access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    resolved: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        resolved.append((host, port))
        return ["127.0.0.1"]  # what a public-address check would have returned

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx)) as http:
            data, content_type = await fetch(
                http,
                f"https://images.test:{port}/redirect/2",
                allowed_hosts=("images.test",),
                allow_http=False,
                max_bytes=1_000_000,
                timeout_s=5.0,
                resolve=resolve,
            )
    finally:
        await runner.cleanup()
    assert (data, content_type) == (IMAGE, "image/png")
    assert seen == [f"images.test:{port}"]
    # Each hop of the redirect chain was resolved and checked again.
    assert resolved == [("images.test", port)] * 3
