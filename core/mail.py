"""Outgoing e-mail over SMTP (aiosmtplib).

With no ``GENGUI_SMTP_HOST`` nothing is sent: the mail's one link is logged instead,
so ``gengui dev`` works without a mail server. That dev line is the only place a
token is ever logged.

Account mails are sent in the background (``send_soon``), not while the request
waits: an SMTP round trip takes long enough to tell an observer whether an address
has an account (a reset for a real account would be slower than for an unknown
one), and a slow mail server must not slow sign-up. The mailer keeps every task it
starts and waits for them, bounded, when it is closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr

import aiosmtplib

from core.logging import get_logger
from core.settings import Settings

log = get_logger("gengui.mail")


@dataclass(frozen=True)
class Mail:
    to: str
    subject: str
    text: str
    link: str | None = None  # what a developer needs when no SMTP server is configured


class Mailer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        sender = parseaddr(settings.smtp_from)[1]
        # make_msgid() would otherwise ask DNS for this host's FQDN on every mail.
        self._msgid_domain = sender.rpartition("@")[2] or "localhost"

    @property
    def configured(self) -> bool:
        return self.settings.smtp_host is not None

    def message(self, mail: Mail) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.settings.smtp_from
        msg["To"] = mail.to
        msg["Subject"] = mail.subject
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self._msgid_domain)
        msg.set_content(mail.text)
        return msg

    async def send(self, mail: Mail) -> None:
        """Deliver now (raises when the server refuses), or log the link without SMTP."""
        s = self.settings
        if s.smtp_host is None:
            log.warning(
                "mail.not_sent",
                reason="GENGUI_SMTP_HOST is not set",
                to=mail.to,
                subject=mail.subject,
                link=mail.link,
            )
            return
        await aiosmtplib.send(
            self.message(mail),
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            use_tls=s.smtp_security == "tls",
            start_tls=s.smtp_security == "starttls",
            timeout=s.smtp_timeout_s,
        )
        log.info("mail.sent", subject=mail.subject)

    def send_soon(self, mail: Mail) -> None:
        """Deliver in the background; a failure is logged (the user can ask again)."""
        task = asyncio.create_task(self._deliver(mail))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, mail: Mail) -> None:
        try:
            await self.send(mail)
        except Exception as exc:  # CancelledError is not an Exception: it propagates
            log.error("mail.failed", subject=mail.subject, error=repr(exc))

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for mails in flight, at most ``timeout_s``; cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("mail.abandoned", count=len(pending))

    async def aclose(self, timeout_s: float = 10.0) -> None:
        await self.drain(timeout_s)
