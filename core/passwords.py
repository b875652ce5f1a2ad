"""Password hashing: argon2id, off the event loop.

argon2-cffi's defaults are RFC 9106's second recommended profile (argon2id, t=3,
m=64 MiB, p=4): tens of milliseconds of CPU and 64 MiB per hash. That work must not
run on the event loop, and it must not run unbounded either: hashes go to a small
dedicated thread pool, one thread per core, so a burst of sign-ins costs at most
cores x 64 MiB and queues instead of exhausting memory or the default executor.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from core.errors import InvalidInput

T = TypeVar("T")

MIN_LENGTH = 10
# Long enough for any passphrase or manager-generated secret; short enough that a
# megabyte "password" cannot make the server hash megabytes.
MAX_LENGTH = 1024

_hasher = PasswordHasher()
_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="argon2")
_dummy_hash: str | None = None


def check_policy(password: str) -> None:
    """Length only (NIST SP 800-63B): no composition rules, any characters."""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise InvalidInput(
            f"the password must be {MIN_LENGTH} to {MAX_LENGTH} characters long",
            code="weak_password",
            details=[{"field": "password", "min_length": MIN_LENGTH, "max_length": MAX_LENGTH}],
        )


async def _run(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


async def hash_password(password: str) -> str:
    return await _run(_hasher.hash, password)


def _verify(stored: str, password: str) -> tuple[bool, bool]:
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False, False
    return True, _hasher.check_needs_rehash(stored)


async def verify_password(stored: str | None, password: str) -> tuple[bool, bool]:
    """``(matches, needs_rehash)``. With no stored hash (an unknown e-mail, an account
    without a password) a dummy hash is still verified, so the answer takes about as
    long as for a real account and its timing does not tell whether the account exists."""
    global _dummy_hash
    if stored is None:
        if _dummy_hash is None:
            _dummy_hash = await hash_password("not the password of anyone at all")
        await _run(_verify, _dummy_hash, password)
        return False, False
    return await _run(_verify, stored, password)
