"""A local SMTP server (aiosmtpd) on a real port that keeps every mail it receives.

It runs in the test's own event loop (no thread): the app under test delivers to it
over a real socket with aiosmtplib, exactly as it would to a mail provider. A test
waits for a mail with ``wait_for(to)``, bounded, never by sleeping.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from email.message import EmailMessage
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_LINK = re.compile(r"https?://\S+")


class FakeSMTP:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []  # (MAIL FROM, RCPT TOs)
        self._arrived = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # aiosmtpd handler hook: one call per accepted message.
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        async with self._arrived:
            self.messages.append(message)
            self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
            self._arrived.notify_all()
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]

    async def wait_for(
        self, address: str, *, count: int = 1, timeout_s: float = 10
    ) -> EmailMessage:
        """The ``count``-th mail to ``address``, once it has arrived."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.to(address)) >= count)
        return self.to(address)[count - 1]

    @staticmethod
    def body(message: EmailMessage) -> str:
        part = message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())  # type: ignore[attr-defined]

    @classmethod
    def link(cls, message: EmailMessage) -> str:
        found = _LINK.findall(cls.body(message))
        assert len(found) == 1, found
        return str(found[0])

    async def start(self) -> FakeSMTP:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="fake-smtp.test", loop=loop), self.host, 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def settings(self) -> dict[str, Any]:
        """Settings overrides that send the app's mail here."""
        return {"smtp_host": self.host, "smtp_port": self.port, "smtp_security": "none"}

    async def __aenter__(self) -> FakeSMTP:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
