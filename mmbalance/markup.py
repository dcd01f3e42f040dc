"""Text from records made safe for the report formats (markdown and LaTeX).

Method and dataset labels come from run folders (a plugin's label, a user's ``name`` option, a
folder name), so they may hold any character. In a markdown table a ``|`` starts a new cell
and ``<b>`` is HTML; in LaTeX ``&``, ``%`` or ``\\`` break the document. Every label is passed
through these functions where it is written, never sanitised where it is read, so the CSV keeps
the text as recorded.
"""

from __future__ import annotations

import re

# Characters markdown (GitHub's flavour) or its HTML would read as markup. '&' first matters
# only for readability: one pass over the text replaces each character once.
_MD = {
    "&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "\\": "\\\\", "`": "\\`", "*": "\\*",
    "_": "\\_", "~": "\\~", "$": "\\$",
    "\n": " ", "\r": " ", "\t": " ",
}
_MD_RE = re.compile("|".join(re.escape(c) for c in _MD))


def md_escape(text: object) -> str:
    """``text`` as literal markdown text, safe inside a table cell (no cell break, no HTML,
    no emphasis, math, link or code span, no line break). Brackets stay as they are ('mfeat
    [fac+mor]'): without a ``(`` right after ``]`` they form no link, and that one is escaped."""
    return _MD_RE.sub(lambda m: _MD[m.group(0)], str(text)).replace("](", "]\\(")


def md_code(text: object) -> str:
    """``text`` as an inline code span whatever backticks it holds (a fence one longer than its
    longest backtick run), on one line. For running text; inside a table cell use md_escape."""
    body = re.sub(r"[\r\n\t]", " ", str(text))
    runs = [len(r) for r in re.findall(r"`+", body)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}"


# LaTeX: the ten special characters, '<', '>' and '|' (wrong glyphs in OT1), and the
# non-ASCII symbols the reports use (pdflatex has no glyph for them in text mode).
_TEX = {
    "\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
    "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
    "<": "\\textless{}", ">": "\\textgreater{}", "|": "\\textbar{}",
    "±": "$\\pm$", "×": "$\\times$", "·": "$\\cdot$", "−": "$-$", "–": "--", "—": "---",
    "α": "$\\alpha$", "λ": "$\\lambda$", "ω": "$\\omega$", "γ": "$\\gamma$", "β": "$\\beta$",
    "χ": "$\\chi$", "²": "$^2$", "Δ": "$\\Delta$", "≤": "$\\leq$", "≥": "$\\geq$",
    "†": "\\dag{}", "‡": "\\ddag{}", "→": "$\\rightarrow$", "\n": " ", "\r": " ",
}
_TEX_RE = re.compile("|".join(re.escape(c) for c in _TEX))


def latex_escape(text: object) -> str:
    """``text`` as literal LaTeX text: every special character replaced once, in one pass (so
    the backslash's replacement is not escaped again)."""
    return _TEX_RE.sub(lambda m: _TEX[m.group(0)], str(text))


def markdown_to_plain(text: str) -> str:
    """A caption written in markdown (``**bold**``, ``code``) as plain text, for LaTeX."""
    return re.sub(r"`+([^`]*)`+", r"\1", text.replace("**", ""))
