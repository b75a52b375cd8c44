"""Untrusted text made safe to show: file names, job ids, manifest keys and program output reach log
lines, result.yaml, CLI tables and the dashboard, and must never act on what shows them.

A name may carry terminal escape sequences (which retitle or clear a terminal), newlines (which forge
whole log lines), bidirectional overrides (which make text read differently from what it is), and
bytes that are not UTF-8 (which Python keeps as lone surrogates, and which YAML, JSON and SQLite then
refuse to encode). `printable` replaces each with a visible escape, so what is shown is one line of
plain text that still says what the name was.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL; line and paragraph separators; bidi embeddings, overrides and isolates;
# lone surrogates (undecodable bytes under the surrogateescape error handler)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # the original byte, as surrogateescape kept it
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control, separator, bidi control and undecodable byte shown as an escape."""
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text
