"""Show chat text as text: HTML in a message is displayed literally, never rendered.

The chat page renders Markdown (model replies use lists, emphasis and code blocks), and
Gradio's Markdown renderer would also render raw HTML (sanitised, but still markup). So
before a message is shown, every ``<`` outside code is written as the entity ``&lt;``:
the browser then displays the character ``<`` and no tag can start. Inside fenced code
blocks and inline code spans Markdown already shows text literally, so code is left
untouched (entities there would be shown as ``&lt;``). Gradio's HTML sanitiser stays on
behind this, for anything this module's reading of Markdown gets wrong.

``display_text(s)`` is what the page shows; ``typed_text(display_text(s)) == s`` for every
``s`` that does not itself contain the characters ``&lt;`` outside code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

# A fenced code block (``` or ~~~, up to three spaces of indent, running to its closing
# fence or to the end of the text, as Markdown does), or an inline code span (a run of
# backticks closed by a run of the same length).
_CODE = re.compile(
    r"(?P<fence>^[ ]{0,3}(?P<mark>`{3,}|~{3,})[^\n]*"
    r"(?:\n[\s\S]*?\n[ ]{0,3}(?P=mark)[`~]*[ \t]*(?=\n|\Z)|[\s\S]*\Z))"
    r"|(?P<span>(?P<ticks>`+)(?!`)[\s\S]*?(?<!`)(?P=ticks)(?!`))",
    re.MULTILINE,
)


def _outside_code(text: str, fix: Callable[[str], str]) -> str:
    out: list[str] = []
    pos = 0
    for match in _CODE.finditer(text):
        out.append(fix(text[pos:match.start()]))
        out.append(match.group(0))
        pos = match.end()
    out.append(fix(text[pos:]))
    return "".join(out)


@lru_cache(maxsize=4096)  # every streamed update re-shows the whole chat
def display_text(text: str) -> str:
    """``text`` as the chat page shows it: ``<`` outside code becomes ``&lt;``."""
    return _outside_code(text, lambda part: part.replace("<", "&lt;"))


def typed_text(shown: str) -> str:
    """Undo ``display_text`` on text coming back from the page (an edited message)."""
    return _outside_code(shown, lambda part: part.replace("&lt;", "<"))
