"""Secrets out of URIs before they are printed, logged or written to MLflow.

``redact_uri`` takes any string (one URI, or a command line holding several) and replaces,
in every ``scheme://`` URI in it:

- the password of ``user:password@host`` (``postgresql://me:pw@db/x`` ->
  ``postgresql://me:***@db/x``); a user without a password is kept: it names, it does not
  authenticate;
- the value of query parameters that carry credentials (``?token=``, ``X-Amz-Signature``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, Azure's ``sig``, ``api_key``, ``password``...).

Everything else is returned unchanged, so it is safe to apply to any text.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://authority (RFC 3986: the authority ends at the first /, ? or #)
_URI = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<authority>[^/?#\s]*)(?P<rest>\S*)")
# A query parameter whose name says it is a credential.
_SECRET_NAME = re.compile(
    r"token|secret|passw(?:or)?d|^pwd$|signature|^sig$|credential|api[-_]?key|^key$"
    r"|access[-_]?key|^auth|session",
    re.IGNORECASE,
)
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;#])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def _redact_authority(authority: str) -> str:
    if "@" not in authority:
        return authority
    userinfo, host = authority.rsplit("@", 1)  # a password may hold an unescaped '@'
    if ":" not in userinfo:
        return authority
    user = userinfo.split(":", 1)[0]
    return f"{user}:{MASK}@{host}"


def _redact_query(rest: str) -> str:
    """Mask credential parameters in the query and fragment (``#access_token=`` of OAuth)."""
    start = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if start < 0:
        return rest

    def param(m: re.Match) -> str:
        if m["value"] and _SECRET_NAME.search(m["name"]):
            return f"{m['sep']}{m['name']}={MASK}"
        return m[0]

    return rest[:start] + _QUERY_PARAM.sub(param, rest[start:])


def redact_uri(uri: str) -> str:
    """``uri`` (or any text holding URIs) with passwords and credential parameters masked."""
    if "://" not in uri:
        return uri

    def one(m: re.Match) -> str:
        return m["scheme"] + _redact_authority(m["authority"]) + _redact_query(m["rest"])

    return _URI.sub(one, uri)
