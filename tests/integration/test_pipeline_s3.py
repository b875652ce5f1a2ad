"""The whole path with images on S3 (a local moto server): the API redirects to a
presigned URL that serves the owner's image."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from consumers.runner import consumer_loops
from core.api.app import create_app
from core.runtime import Runtime
from providers.local.engines import load_engine
from providers.local.worker import worker_loops
from tests.conftest import UserAuth, running, wait_for_status
from tests.integration.test_storage import make_s3, moto_endpoint  # noqa: F401  (fixture)


@pytest_asyncio.fixture
async def s3_client(rt: Runtime, moto_endpoint: str) -> AsyncIterator[TestClient]:  # noqa: F811
    storage = await make_s3(moto_endpoint)
    s3_rt = dataclasses.replace(rt, storage=storage)
    loops = {**consumer_loops(s3_rt), **worker_loops(s3_rt, load_engine("placeholder"))}
    async with running(loops), TestClient(TestServer(create_app(rt.settings, s3_rt))) as client:
        yield client
    await storage.close()


async def test_images_on_s3_are_served_by_presigned_redirect(
    s3_client: TestClient, alice: UserAuth, bob: UserAuth
) -> None:
    resp = await s3_client.post(
        "/api/v1/generations",
        json={"prompt": "s3", "width": 256, "height": 256},
        headers=alice.headers,
    )
    gid = (await resp.json())["id"]
    done = await wait_for_status(s3_client, alice, gid, {"completed"}, need_thumbnail=True)

    redirect = await s3_client.get(done["image_url"], headers=alice.headers, allow_redirects=False)
    assert redirect.status == 302
    url = redirect.headers["Location"]
    assert "X-Amz-Signature=" in url and "/1-original.png" in url
    async with aiohttp.ClientSession() as http, http.get(url) as image:
        assert image.status == 200
        assert Image.open(io.BytesIO(await image.read())).size == (256, 256)

    thumb = await s3_client.get(done["thumbnail_url"], headers=alice.headers, allow_redirects=False)
    assert thumb.status == 302 and "thumb-128.webp" in thumb.headers["Location"]
    assert (
        await s3_client.get(done["image_url"], headers=bob.headers, allow_redirects=False)
    ).status == 404
