"""Secrets out of sight: URL passwords and secret command-line values masked for logs.

Torch-free and dependency-free: the settings dump, the CLI and the dev tools' process logs
all mask through here, so one pattern decides what a log may show.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

MASK = "**********"  # what pydantic prints for a SecretStr

# A URL's scheme, then its userinfo up to the last "@" before the next URL (comma-separated
# lists such as bootstrap servers) or whitespace: an unencoded "@" or "/" in a password
# must not cut the match short and leak the rest.
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_URL_USERINFO = re.compile(rf"(?P<scheme>{_SCHEME})(?P<userinfo>(?:(?!{_SCHEME})\S)*)@")


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it masked: ``redis://u:**********@h/0``.

    The user name stays (it is no secret, and it tells which ACL user is configured); a
    userinfo without ``:`` is masked whole, since a lone userinfo is often a token.
    """

    def mask(match: re.Match[str]) -> str:
        user, colon, _password = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"

    return _URL_USERINFO.sub(mask, text)


_SECRET_KEY_WORDS = ("password", "secret", "token")


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line as a log or report may show it: secret ``key=value`` values and URL
    passwords masked (``redis.password=**********``, ``redis://u:**********@h/0``)."""
    shown = []
    for arg in argv:
        key, sep, _value = arg.partition("=")
        if sep and any(word in key.lower() for word in _SECRET_KEY_WORDS):
            shown.append(f"{key}={MASK}")
        else:
            shown.append(redact_url(arg))
    return shown


def redact_tree(value: Any) -> Any:
    """Every string in a nested dict/list structure through :func:`redact_url`."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(item) for item in value]
    return value
