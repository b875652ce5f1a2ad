"""Downloading a provider's output URL without letting it reach anywhere else (SSRF).

A Replicate output URL comes from a webhook body, so it is treated as hostile:

- https only (http too when ``allow_http``: tests and ``gengui mock-providers``);
- the host must be on the allowlist: ``replicate.delivery`` matches itself,
  ``*.replicate.delivery`` any subdomain (not the bare name);
- unless ``allow_http``: no IP-literal hosts, and every address the name resolves
  to must be public (no loopback, private, link-local, CGNAT, metadata ranges). The
  request then goes to the address we checked (the URL's host stays in ``Host`` and
  TLS SNI), so a DNS answer that changes between check and connect (rebinding)
  cannot steer it inside;
- redirects are followed by hand, at most ``MAX_REDIRECTS``, each target checked
  the same way;
- the body is read with a byte cap, under one total timeout.

Refusals of the URL are permanent (``ProviderRejected``): the same URL will be
refused again. Transport trouble and HTTP errors are retryable: a new attempt gets a
new prediction and a new URL.

    download_scheme_refused, download_host_refused, download_address_refused,
    download_redirect_refused, download_too_large            permanent
    download_failed (HTTP status), download_timeout, download_unreachable   retryable
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import aiohttp
from yarl import URL

from core.errors import ProviderRejected, ProviderRetryable

MAX_REDIRECTS: Final = 3
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})

# host, port -> the addresses to connect to (already checked). None: connect by name.
Resolver = Callable[[str, int], Awaitable[list[str]]]


def host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    """Exact names, or ``*.suffix`` for any name strictly under ``suffix``."""
    host = host.lower().rstrip(".")
    for pattern in allowed_hosts:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".example.com"
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == pattern:
            return True
    return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_public(address: str) -> bool:
    """Globally routable, and not an IPv4 address in IPv6 clothing pointing inside."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def public_addresses(host: str, port: int) -> list[str]:
    """Resolve ``host``; refuse it unless every address is public."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProviderRetryable(
            f"download: cannot resolve {host}: {exc}", code="download_unreachable"
        ) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses or not all(is_public(a) for a in addresses):
        raise ProviderRejected(
            f"download: {host} resolves to a non-public address", code="download_address_refused"
        )
    return addresses


def check_url(url: URL, *, allowed_hosts: Iterable[str], allow_http: bool) -> None:
    """Scheme, credentials and host policy; raises ``ProviderRejected``."""
    if url.scheme != "https" and not (url.scheme == "http" and allow_http):
        raise ProviderRejected(
            f"download: scheme {url.scheme!r} is not allowed", code="download_scheme_refused"
        )
    host = url.raw_host
    if not host or url.user is not None or url.password is not None:
        raise ProviderRejected("download: the URL has no usable host", code="download_host_refused")
    if not host_allowed(host, allowed_hosts):
        raise ProviderRejected(
            f"download: host {host} is not allowed", code="download_host_refused"
        )
    if _is_ip(host) and not allow_http:
        raise ProviderRejected(
            "download: IP-literal hosts are not allowed", code="download_address_refused"
        )


async def download(
    session: aiohttp.ClientSession,
    url: str,
    *,
    allowed_hosts: Iterable[str],
    allow_http: bool,
    max_bytes: int,
    timeout_s: float,
) -> tuple[bytes, str | None]:
    """GET ``url`` under the policy above; returns (body, content type or None)."""
    return await fetch(
        session,
        url,
        allowed_hosts=tuple(allowed_hosts),
        allow_http=allow_http,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        resolve=None if allow_http else public_addresses,
    )


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    *,
    allowed_hosts: tuple[str, ...],
    allow_http: bool,
    max_bytes: int,
    timeout_s: float,
    resolve: Resolver | None,
) -> tuple[bytes, str | None]:
    """``download`` with the address policy as a parameter (``resolve``)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _follow(
                session, URL(url), allowed_hosts, allow_http, max_bytes, timeout_s, resolve
            )
    except TimeoutError as exc:
        raise ProviderRetryable(
            f"download: no complete answer within {timeout_s:g} s", code="download_timeout"
        ) from exc


async def _follow(
    session: aiohttp.ClientSession,
    url: URL,
    allowed_hosts: tuple[str, ...],
    allow_http: bool,
    max_bytes: int,
    timeout_s: float,
    resolve: Resolver | None,
) -> tuple[bytes, str | None]:
    for hop in range(MAX_REDIRECTS + 1):
        check_url(url, allowed_hosts=allowed_hosts, allow_http=allow_http)
        status, location, body, content_type = await _get(
            session, url, max_bytes, timeout_s, resolve
        )
        if status in _REDIRECTS and location:
            if hop == MAX_REDIRECTS:
                break
            url = url.join(URL(location))
            continue
        if not 200 <= status < 300:
            raise ProviderRetryable(f"download: HTTP {status}", code="download_failed")
        return body, content_type
    raise ProviderRejected(
        f"download: more than {MAX_REDIRECTS} redirects", code="download_redirect_refused"
    )


async def _get(
    session: aiohttp.ClientSession,
    url: URL,
    max_bytes: int,
    timeout_s: float,
    resolve: Resolver | None,
) -> tuple[int, str | None, bytes, str | None]:
    """One GET (no redirects): (status, Location, body when 2xx, content type)."""
    target, headers, server_hostname = url, {}, None
    if resolve is not None:
        host = url.raw_host
        assert host is not None and url.port is not None
        address = (await resolve(host, url.port))[0]
        target = url.with_host(address)
        headers["Host"] = host if url.is_default_port() else f"{host}:{url.port}"
        if url.scheme == "https":
            server_hostname = host  # certificate checked against the name, not the IP
    try:
        async with session.get(
            target,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            server_hostname=server_hostname,
        ) as resp:
            if resp.status in _REDIRECTS or not 200 <= resp.status < 300:
                return resp.status, resp.headers.get("Location"), b"", None
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise _too_large(max_bytes)
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)  # stop reading; the connection is dropped
                chunks.append(chunk)
            content_type = resp.headers.get("Content-Type")
            mime = content_type.split(";", 1)[0].strip() if content_type else None
            return resp.status, None, b"".join(chunks), mime or None
    except (ProviderRejected, ProviderRetryable):
        raise
    except TimeoutError:
        raise
    except (aiohttp.ClientError, OSError) as exc:
        raise ProviderRetryable(
            f"download: {type(exc).__name__}: {exc}"[:300], code="download_unreachable"
        ) from exc


def _too_large(max_bytes: int) -> ProviderRejected:
    return ProviderRejected(
        f"download: the file is over {max_bytes} bytes", code="download_too_large"
    )
