"""User-provided text inside the Markdown that messages are written in."""

from __future__ import annotations

import html
import re


def md(text: object) -> str:
    """User text made safe inside Markdown: HTML shown as text, Markdown syntax literal."""
    escaped = html.escape(str(text), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", escaped)
