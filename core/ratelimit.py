"""Provider rate limits shared by every replica: one token bucket per provider in Redis.

The bucket is refilled and spent by one Lua script, so replicas never race. Taking a
token answers "go now" or "wait this long"; the caller waits (a short wait) or puts
the job back to be tried when the wait is over (a long one). Nothing is dropped.
"""

from __future__ import annotations

from typing import Any

from core.keys import Keys
from core.streams import SharedRedis

# KEYS[1] bucket hash; ARGV: rate per s, burst. The clock is Redis's (TIME), one for
# every replica. A refused take spends nothing; it says how long until a token is there.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait_ms
"""


class TokenBucket:
    """Token buckets in Redis, one per key, shared by every replica."""

    def __init__(self, redis: SharedRedis) -> None:
        self._script: Any = redis.register_script(_TAKE)

    async def take(self, key: str, rate_per_s: float, burst: float) -> float:
        """Seconds to wait before a token is there; 0.0: this take got one."""
        wait_ms = await self._script(keys=[key], args=[rate_per_s, burst])
        return int(wait_ms) / 1000


class RateLimiter:
    """``take(provider)`` -> seconds to wait before trying again; 0.0 means go."""

    def __init__(self, redis: SharedRedis, keys: Keys, limits: dict[str, float]) -> None:
        self.redis = redis
        self.keys = keys
        self.limits = limits
        self._bucket = TokenBucket(redis)

    async def take(self, provider: str) -> float:
        rate = self.limits.get(provider)
        if rate is None:
            return 0.0
        # At most one second's worth at once.
        return await self._bucket.take(self.keys.rate(provider), rate, max(1.0, rate))
