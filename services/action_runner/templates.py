"""Email templates: macros, escaping, header safety. Pure functions, no I/O.

Subject and body are operator-written templates (operations.subject / operations.body,
NULL = the built-in default of the kind) with the macros of DESIGN.md section 4. The body
is HTML: the template's own markup is trusted (an operator wrote it), every substituted
value is not (an offer name comes from the network) and is HTML-escaped. The subject is a
header: it never contains a line break, whatever the template or the values hold.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser

MACROS = (
    "trigger-name", "metric", "value", "threshold", "status", "previous-status",
    "offer-id", "offer-name", "affiliate-id", "measured-at",
)
# Only known macro names are replaced, so literal braces (CSS, JSON in a body) survive.
_MACRO = re.compile(r"\{(" + "|".join(re.escape(m) for m in MACROS) + r")\}")
# Every control character (CR, LF and their cousins that str.splitlines() or a mail reader
# may take for the end of a header line) and the Unicode line separators.
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_SPACES = re.compile(r"\s+")
MAX_SUBJECT = 250

DEFAULT_SUBJECT = "[KPI] {trigger-name} is {status}: offer {offer-id} ({offer-name}), affiliate {affiliate-id}"
_DETAILS = (
    "<ul>"
    "<li>Trigger: {trigger-name} ({metric})</li>"
    "<li>Status: {previous-status} &rarr; {status}</li>"
    "<li>Value: {value} (threshold {threshold})</li>"
    "<li>Offer: {offer-name} (#{offer-id})</li>"
    "<li>Affiliate: #{affiliate-id}</li>"
    "<li>Measured at: {measured-at}</li>"
    "</ul>"
)
DEFAULT_BODIES = {
    "email_affiliate": "<p>Hello,</p><p>Your traffic on offer {offer-name} (#{offer-id}) "
                       "changed status on <b>{trigger-name}</b>.</p>" + _DETAILS,
    "email_affiliate_manager": "<p>Hello,</p><p>Affiliate #{affiliate-id}, whom you manage, "
                               "changed status on <b>{trigger-name}</b>.</p>" + _DETAILS,
    "email_administrators": "<p>Affiliate #{affiliate-id} on offer {offer-name} (#{offer-id}) "
                            "changed status on <b>{trigger-name}</b>.</p>" + _DETAILS,
}


@dataclass(frozen=True)
class MacroValues:
    """What the macros stand for, as the event and the reference data give them."""

    trigger_name: str
    metric: str
    value: float | None  # None: an event recorded before values were kept with it
    threshold: float | None
    status: str
    previous_status: str | None
    offer_id: int
    offer_name: str | None
    affiliate_id: int
    measured_at: datetime

    def as_text(self) -> dict[str, str]:
        return {
            "trigger-name": self.trigger_name,
            "metric": self.metric,
            "value": format_number(self.value),
            "threshold": format_number(self.threshold),
            "status": self.status,
            "previous-status": self.previous_status or "none",
            "offer-id": str(self.offer_id),
            "offer-name": self.offer_name if self.offer_name is not None else "(unknown offer)",
            "affiliate-id": str(self.affiliate_id),
            "measured-at": self.measured_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }


def format_number(value: float | None) -> str:
    if value is None:
        return "n/a"
    # 10 significant digits: 0.1 + 0.2 shows as 0.3, and money keeps its cents.
    return format(value, ".10g")


def substitute(template: str, values: Mapping[str, str], escape: Callable[[str], str] = lambda s: s) -> str:
    """Replace the known macros in one pass, so a value that looks like a macro stays literal."""
    return _MACRO.sub(lambda m: escape(values[m.group(1)]), template)


def header_safe(text: str, limit: int = MAX_SUBJECT) -> str:
    """One line: every line break (in the template or in a value) becomes a space."""
    flat = _SPACES.sub(" ", _LINE_BREAKS.sub(" ", text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def render_subject(template: str | None, values: MacroValues) -> str:
    return header_safe(substitute(template or DEFAULT_SUBJECT, values.as_text()))


def render_html(template: str | None, kind: str, values: MacroValues) -> str:
    body = template if template is not None else DEFAULT_BODIES[kind]
    return substitute(body, values.as_text(), lambda v: html.escape(v, quote=True))


class _TextExtractor(HTMLParser):
    _BREAKS = {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table"}
    _HIDDEN = {"script", "style", "head", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BREAKS and tag != "li":  # the next item starts its own line
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The plain-text alternative of a rendered HTML body: markup dropped, entities decoded.

    text/plain is never interpreted as markup, so a value that was escaped in the HTML
    part reads as the literal text it is here.
    """
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
