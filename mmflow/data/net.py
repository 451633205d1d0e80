"""Small network facts for the fetcher: whether an address is public, whether a response
forbids AI use (X-Robots-Tag), and error messages that never echo what a server sent."""

from __future__ import annotations

import http.client
import ipaddress
from email.message import Message


def not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of non-public address ``ip`` is; None for a globally routable one."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        return not_public(mapped) or None
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


def describe_error(e: BaseException) -> str:
    """An exception for a message. http.client's parse errors (``BadStatusLine``, ``LineTooLong``
    ...) carry what the server sent: only their type is kept."""
    if isinstance(e, http.client.HTTPException) and not isinstance(e, http.client.InvalidURL):
        return type(e).__name__
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


def is_disallowed(headers: Message, directives: tuple[str, ...], token: str | None) -> bool:
    """True when an ``X-Robots-Tag`` header opts out, for everyone or for our token.

    img2dataset's rule: a value is ``[token:] directive, directive``; it applies when it has no
    token or names ours. Lines aimed at ``img2dataset`` apply too: we are a compatible downloader
    and the site's intent is clear."""
    wanted = {d.strip().lower() for d in directives}
    ours = {t for t in (token and token.strip().lower(), "img2dataset") if t}
    for value in headers.get_all("X-Robots-Tag") or []:
        scope, sep, rest = value.partition(":")
        target, names = (scope.strip().lower(), rest) if sep else (None, value)
        if (target is None or target in ours) and wanted & {
            d.strip().lower() for d in names.split(",")
        }:
            return True
    return False
