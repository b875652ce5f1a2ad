"""Provider rate limits: one token bucket in Redis, shared by every replica."""

from __future__ import annotations

import asyncio

from core.ratelimit import RateLimiter
from core.runtime import Runtime


async def test_bucket_is_shared_across_limiters(rt: Runtime) -> None:
    """Two replicas (two limiters) together get the burst, not each of them."""
    a = RateLimiter(rt.redis, rt.settings.keys, {"openai": 5.0})
    b = RateLimiter(rt.redis, rt.settings.keys, {"openai": 5.0})
    waits = await asyncio.gather(*(lim.take("openai") for lim in [a, b] * 10))
    granted = [w for w in waits if w == 0]
    # A burst of 5, plus at most a token refilled while the 20 calls ran.
    assert 5 <= len(granted) <= 6
    assert all(0 < w <= 1.0 for w in waits if w)


async def test_a_refused_caller_gets_a_token_after_its_wait(rt: Runtime) -> None:
    lim = RateLimiter(rt.redis, rt.settings.keys, {"runpod": 20.0})
    for _ in range(20):
        await lim.take("runpod")
    wait_s = await lim.take("runpod")
    assert wait_s > 0
    await asyncio.sleep(wait_s + 0.01)
    assert await lim.take("runpod") == 0


async def test_unlimited_provider_is_never_refused(rt: Runtime) -> None:
    lim = RateLimiter(rt.redis, rt.settings.keys, {"openai": 1.0})
    assert [await lim.take("local") for _ in range(50)] == [0.0] * 50
    assert not await rt.redis.exists(rt.settings.keys.rate("local"))
