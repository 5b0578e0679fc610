"""Display names for uploaded files (storage always uses generated names, never these)."""

from __future__ import annotations

import re
import unicodedata

MAX_NAME = 120
FALLBACK = "model"
_DRIVE = re.compile(r"^[A-Za-z]:")
_EXT = re.compile(r"\.[A-Za-z0-9_]{1,16}\Z")


def sanitize_filename(name: str) -> str:
    """A safe, short display name for ``name``: its last path component, printable, <= 120 chars.

    Strips directories ("../", "..\\\\", absolute and drive paths), NUL, control and invisible
    formatting characters (bidi overrides such as U+202E can disguise an extension), keeps the
    extension when shortening, and never returns "" (falls back to "model").
    """
    text = unicodedata.normalize("NFC", str(name or ""))
    # Drop control (Cc), format (Cf: bidi overrides, zero-width), and separators other than space.
    text = "".join(
        ch
        for ch in text
        if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
    )
    text = text.replace("\\", "/")
    text = text.rsplit("/", 1)[-1]
    text = _DRIVE.sub("", text)
    text = " ".join(text.split())  # collapse runs of whitespace, trim the ends
    text = text.strip(". ") if set(text) <= {".", " "} else text.strip()
    if not text or text in (".", ".."):
        return FALLBACK
    if len(text) > MAX_NAME:
        match = _EXT.search(text)
        ext = match.group(0) if match and match.start() > 0 else ""
        stem = text[: len(text) - len(ext)]
        text = stem[: MAX_NAME - len(ext)].rstrip() + ext
    return text or FALLBACK


def extension(name: str) -> str:
    """The lower-case extension of ``name`` after sanitizing ("" when it has none)."""
    clean = sanitize_filename(name)
    match = _EXT.search(clean)
    if not match or match.start() == 0:
        return ""
    return match.group(0).lower()
