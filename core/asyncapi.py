"""AsyncAPI 3.0 document of gengui's Redis streams and the per-user pub/sub channel.

Built from the same sources the code runs on: addresses from ``core.keys.Keys`` (under
the configured prefix), payloads from the ``core.events`` models. ``STREAMS`` is the one
table of who writes and who reads each stream; a test checks that every stream ``Keys``
names has a row here, so a new stream without documentation fails the suite.

On the wire each stream entry has one field, ``__data__``, holding the message JSON
(FastStream's layout); the user channel carries the JSON as the pub/sub payload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from core import keys as k
from core.events import (
    DeadLetter,
    GenerationRequested,
    JobStatus,
    LocalJob,
    ProviderCancel,
    ProviderResult,
    ThumbnailRequested,
    UserEvent,
)
from core.keys import Keys

REF = "#/components/schemas/{model}"

# Queue providers: the API (a create) or dispatch appends their jobs to ``jobs:{provider}``.
QUEUE_PROVIDERS = ("local", "gemini", "openai")


@dataclass(frozen=True)
class StreamDoc:
    channel: str  # the AsyncAPI channel id
    address: Callable[[Keys], str]
    message: type[BaseModel]
    producers: str
    group: str | None  # the consumer group, None for the dead-letter stream
    consumers: str
    parameters: dict[str, dict[str, Any]] | None = None


STREAMS: tuple[StreamDoc, ...] = (
    StreamDoc(
        "generationRequested",
        lambda keys: keys.requested,
        GenerationRequested,
        "API (a create for a remote provider, or any with GENGUI_API_DISPATCH off; a retry), "
        "reconciler (requeue of a queued row past its grace period)",
        k.GROUP_DISPATCHERS,
        "`gengui consumers --only dispatch`: claims the attempt and submits it to the provider",
    ),
    StreamDoc(
        "jobs",
        lambda keys: keys.jobs("{provider}"),
        LocalJob,
        "API (a new generation for a queue provider, GENGUI_API_DISPATCH), dispatchers "
        "(retries, requeues)",
        f"{k.GROUP_GPU_WORKERS} (local) / {k.GROUP_HOSTED} (gemini, openai)",
        "`gengui worker` (local GPU workers) and the hosted runners (gemini, openai)",
        {
            "provider": {
                "enum": list(QUEUE_PROVIDERS),
                "description": "The queue provider whose runners read this stream.",
            }
        },
    ),
    StreamDoc(
        "jobStatus",
        lambda keys: keys.job_status,
        JobStatus,
        "GPU workers, hosted runners, provider webhooks and polls",
        k.GROUP_STATUS,
        "`gengui consumers --only status`: applies the report to the generation (CAS on attempt)",
    ),
    StreamDoc(
        "providerResults",
        lambda keys: keys.results,
        ProviderResult,
        "provider webhooks and the reconciler's polls, for an image at a URL (Replicate)",
        k.GROUP_RESULTS,
        "result fetchers: download the image with size and host limits, then store it",
    ),
    StreamDoc(
        "providerCancels",
        lambda keys: keys.cancels,
        ProviderCancel,
        "API (cancel), reconciler (deadline)",
        k.GROUP_CANCELS,
        "cancellers: stop the job at the provider",
    ),
    StreamDoc(
        "thumbnails",
        lambda keys: keys.thumbnails,
        ThumbnailRequested,
        "status processors (on completed), reconciler (completed without thumbnail)",
        k.GROUP_THUMBNAILERS,
        "`gengui consumers --only thumbnails`: makes the WebP thumbnail",
    ),
    StreamDoc(
        "deadLetters",
        lambda keys: keys.dead,
        DeadLetter,
        "any consumer, after max deliveries or for a message that does not parse",
        None,
        "people: `gengui dlq list`, `gengui dlq replay ID`",
    ),
)


def _version() -> str:
    try:
        return metadata.version("gengui")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _message(model: type[BaseModel], ref: dict[str, Any]) -> dict[str, Any]:
    doc = (model.__doc__ or "").strip()
    out: dict[str, Any] = {
        "name": model.__name__,
        "title": model.__name__,
        "contentType": "application/json",
        "payload": ref,
    }
    if doc:
        out["summary"] = doc.splitlines()[0]
        out["description"] = doc
    return out


def build_asyncapi(keys: Keys, *, redis_host: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document for streams under ``keys.prefix``."""
    models: list[type[BaseModel]] = [s.message for s in STREAMS] + [UserEvent]
    refs, defs = models_json_schema(
        [(m, "serialization") for m in dict.fromkeys(models)], ref_template=REF
    )
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for s in STREAMS:
        name = s.message.__name__
        messages[name] = _message(s.message, refs[(s.message, "serialization")])
        description = (
            f"Redis stream. Each entry has one field, `__data__`, holding a `{name}` as "
            f"JSON.\n\nWritten by: {s.producers}.\n\nRead by: {s.consumers}"
            + (f" (consumer group `{s.group}`)." if s.group else ".")
        )
        channel: dict[str, Any] = {
            "address": s.address(keys),
            "title": s.channel,
            "description": description,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        if s.parameters:
            channel["parameters"] = s.parameters
        channels[s.channel] = channel
        ref = {"$ref": f"#/channels/{s.channel}"}
        message_refs = [{"$ref": f"#/channels/{s.channel}/messages/{name}"}]
        cap = s.channel[0].upper() + s.channel[1:]
        operations[f"send{cap}"] = {
            "action": "send",
            "channel": ref,
            "summary": f"XADD by {s.producers}",
            "messages": message_refs,
        }
        operations[f"receive{cap}"] = {
            "action": "receive",
            "channel": ref,
            "summary": (
                f"XREADGROUP by group `{s.group}`: {s.consumers}" if s.group else s.consumers
            ),
            "messages": message_refs,
        }

    messages["UserEvent"] = _message(UserEvent, refs[(UserEvent, "serialization")])
    channels["userEvents"] = {
        "address": keys.user_channel("{userId}"),
        "title": "userEvents",
        "description": (
            "Redis pub/sub channel, one per user: the payload is a `UserEvent` as JSON. "
            "Status and thumbnail consumers publish; every API replica subscribes and "
            "forwards the events to that user's real-time clients. Pub/sub is "
            "fire-and-forget: a client that missed events reads the generation again."
        ),
        "parameters": {"userId": {"description": "The user's id (UUID)."}},
        "messages": {"UserEvent": {"$ref": "#/components/messages/UserEvent"}},
    }
    user_ref = {"$ref": "#/channels/userEvents"}
    user_messages = [{"$ref": "#/channels/userEvents/messages/UserEvent"}]
    operations["sendUserEvents"] = {
        "action": "send",
        "channel": user_ref,
        "summary": "PUBLISH by status and thumbnail consumers, the API and reconciler",
        "messages": user_messages,
    }
    operations["receiveUserEvents"] = {
        "action": "receive",
        "channel": user_ref,
        "summary": "SUBSCRIBE by each API replica, for its connected clients",
        "messages": user_messages,
    }
    document: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "gengui events",
            "version": _version(),
            "description": (
                "The Redis streams that carry a generation from request to image, and the "
                "pub/sub channel that tells clients. Delivery is at-least-once: every "
                "message carries the generation's `attempt`, and consumers apply it with "
                "a compare-and-set, so duplicates and late messages change nothing. "
                "Messages are versioned (`v`); a consumer dead-letters versions it does "
                "not know."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": defs.get("$defs", {})},
    }
    if redis_host:
        document["servers"] = {
            "redis": {"host": redis_host, "protocol": "redis", "description": "Redis or Valkey."}
        }
    return document
