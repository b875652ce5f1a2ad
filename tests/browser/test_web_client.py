"""The web client, as a person uses it, in headless Chromium against the real API:
sign up, verify with the mailed link or its pasted code, sign in, make an image and
watch it finish live, cancel one, page through, sign out. A screenshot of the gallery
is left in ``tests/browser/artifacts/``."""

from __future__ import annotations

import uuid
from typing import Any

from playwright.async_api import Browser, Page, expect

from tests.browser.conftest import ARTIFACTS, Site
from tests.fakes.smtp import FakeSMTP

PASSWORD = "correct horse battery staple"
DESKTOP = {"width": 1100, "height": 820}
PHONE = {"width": 390, "height": 844}

THUMBNAIL_LOADED = """(card) => {
    const img = card.querySelector('.thumb img');
    return !!img && img.complete && img.naturalWidth > 0;
}"""


async def open_page(browser: Browser, site: Site, viewport: dict[str, int]) -> Page:
    context = await browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    context.set_default_timeout(10_000)
    page = await context.new_page()
    problems: list[str] = []
    # A CSP violation ("Refused to ...") or a script error shows up here: the client
    # must have none. Answers the client expects (401 before sign-in, 403 unverified)
    # are logged by Chromium as "Failed to load resource": not the client's problem.
    page.on(
        "console",
        lambda m: (
            problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.problems = problems  # type: ignore[attr-defined]
    response = await page.goto(site.url + "/")
    assert response is not None and response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    return page


async def sign_up(page: Page, smtp: FakeSMTP, email: str) -> str:
    """Signs up in the page; returns the link of the verification mail."""
    await page.get_by_label("E-mail", exact=True).nth(1).fill(email)
    await page.locator("#signup-password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign up").click()
    await expect(page.locator("#status")).to_contain_text(f"we sent a link to {email}")
    mail = await smtp.wait_for(email)
    return FakeSMTP.link(mail)


async def sign_in(page: Page, email: str) -> None:
    await page.locator("#signin-email").fill(email)
    await page.locator("#signin-password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#account-email")).to_contain_text(email)


async def create(page: Page, prompt: str) -> Any:
    await page.get_by_label("Prompt", exact=True).fill(prompt)
    await page.get_by_label("Size").select_option("256x256")
    await page.get_by_role("button", name="Generate").click()
    card = page.locator("#gallery > li").filter(has_text=prompt)
    await expect(card).to_have_count(1)
    return card


async def test_sign_up_verify_create_watch_live_cancel(
    browser: Browser, site: Site, smtp: FakeSMTP
) -> None:
    page = await open_page(browser, site, DESKTOP)
    email = f"web-{uuid.uuid4().hex[:8]}@example.com"
    link = await sign_up(page, smtp, email)
    assert link.startswith(f"{site.url}/verify-email#token=gv_"), link

    # Signed in before verifying: the app says what is missing, in words.
    await sign_in(page, email)
    await expect(page.locator("#account-email")).to_contain_text("not verified")
    await page.get_by_label("Prompt", exact=True).fill("too early")
    await page.get_by_role("button", name="Generate").click()
    await expect(page.locator("#status")).to_have_text(
        "Verify your e-mail address first: open the link in the mail we sent you."
    )
    # Paste the code from the mail.
    await page.get_by_label("Code from the mail").fill(link.partition("#token=")[2])
    await page.get_by_role("button", name="Verify").click()
    await expect(page.locator("#status")).to_have_text("Your e-mail address is verified.")
    await expect(page.locator("#account-email")).to_have_text(email)
    await expect(page.locator("#verify-form")).to_be_hidden()

    # A marker on the window: were the page reloaded, it would be gone.
    await page.evaluate("window.__sameDocument = true")
    await expect(page.locator("body")).to_have_attribute("data-live", "yes")

    async with site.worker():
        card = await create(page, "a lighthouse at dusk <b>&amp;</b>")
        await expect(card).to_have_attribute("data-status", "completed")
        await page.wait_for_function(THUMBNAIL_LOADED, arg=await card.element_handle())
    assert await page.evaluate("window.__sameDocument === true")
    # The prompt is shown as text, never parsed as HTML.
    await expect(card.locator(".prompt")).to_have_text("a lighthouse at dusk <b>&amp;</b>")
    assert await card.locator(".prompt b").count() == 0
    await expect(card.locator(".state")).to_have_text("Done")
    # Open the full image: a same-origin link the session cookie unlocks.
    href = await card.get_by_role("link", name="Open the full image").get_attribute("href")
    assert href is not None
    image = await page.request.get(site.url + href)
    assert image.status == 200 and image.headers["content-type"].startswith("image/")

    # No worker now: the next one waits in line until it is cancelled.
    stuck = await create(page, "a slow one that never starts")
    await expect(stuck).to_have_attribute("data-status", "submitted")
    await expect(stuck.get_by_role("button", name="Retry")).to_be_hidden()
    await stuck.get_by_role("button", name="Cancel").click()
    await expect(stuck).to_have_attribute("data-status", "cancelled")
    await expect(stuck.locator(".state")).to_have_text("Cancelled")
    await expect(stuck.get_by_role("button", name="Cancel")).to_be_hidden()
    row = await site.rt.pool.fetchrow(
        "SELECT status FROM generations WHERE id = $1",
        uuid.UUID(await stuck.get_attribute("data-id")),
    )
    assert row is not None and row["status"] == "cancelled"

    # Newest first.
    ids = await page.locator("#gallery > li").evaluate_all("els => els.map(e => e.dataset.id)")
    assert ids == [await stuck.get_attribute("data-id"), await card.get_attribute("data-id")]

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)
    await page.set_viewport_size(PHONE)
    await page.screenshot(path=str(ARTIFACTS / "gallery-phone.png"), full_page=True)
    # One column of two cards on a phone: nothing spills sideways.
    assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert page.problems == []  # type: ignore[attr-defined]
    await page.context.close()


async def test_the_mailed_link_verifies_and_pages_load_more(
    browser: Browser, site: Site, smtp: FakeSMTP
) -> None:
    page = await open_page(browser, site, PHONE)
    # A link that does not work says why.
    await page.goto(site.url + "/?verify=gv_not-a-real-token")
    await expect(page.locator("#status")).to_contain_text("That link or code is not valid")

    email = f"link-{uuid.uuid4().hex[:8]}@example.com"
    link = await sign_up(page, smtp, email)
    await page.goto(link)  # what clicking the mail's link does
    await expect(page.locator("#status")).to_have_text(
        "Your e-mail address is verified. Sign in to start."
    )
    assert page.url == site.url + "/"  # the token left the address bar
    await sign_in(page, email)
    await expect(page.locator("#account-email")).to_have_text(email)

    # More than a page (12) of generations: the rest come with "Load more".
    for i in range(14):
        await page.evaluate(
            """async (i) => {
                const csrf = document.cookie.match(/gengui_csrf=([^;]+)/)[1];
                const r = await fetch('/api/v1/generations', {method: 'POST',
                    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
                    body: JSON.stringify({prompt: 'batch ' + i, width: 256, height: 256})});
                if (r.status !== 202) throw new Error(await r.text());
            }""",
            i,
        )
    # The newest was refused by its provider, as a content filter would.
    await site.rt.pool.execute(
        "UPDATE generations SET status = 'failed', error_code = 'content_rejected',"
        " error_message = 'provider: blocked' WHERE prompt = 'batch 13'"
    )
    await page.reload()
    cards = page.locator("#gallery > li")
    await expect(cards).to_have_count(12)
    failed = cards.first
    await expect(failed).to_contain_text("batch 13")
    await expect(failed).to_have_attribute("data-status", "failed")
    await expect(failed.locator(".error")).to_have_text(
        "The image service refused this prompt. Try describing it differently."
    )
    await failed.get_by_role("button", name="Retry").click()
    await expect(failed).not_to_have_attribute("data-status", "failed")
    await expect(failed.locator(".error")).to_be_hidden()
    await expect(failed.get_by_role("button", name="Cancel")).to_be_visible()
    assert (
        await site.rt.pool.fetchval("SELECT attempt FROM generations WHERE prompt = 'batch 13'")
        == 2
    )
    await page.get_by_role("button", name="Load more").click()
    await expect(cards).to_have_count(14)
    await expect(cards.last).to_contain_text("batch 0")
    await expect(page.get_by_role("button", name="Load more")).to_be_hidden()

    # Keyboard: real buttons, so Enter on a focused one works.
    await page.get_by_role("button", name="Sign out").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#status")).to_have_text("Signed out.")
    await expect(page.locator("#signin-form")).to_be_visible()
    me = await page.request.get(site.url + "/api/v1/auth/me")
    assert me.status == 401
    assert page.problems == []  # type: ignore[attr-defined]
    await page.context.close()
