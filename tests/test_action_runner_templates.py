"""Email rendering as pure functions: macros, HTML escaping, header safety, the mail itself."""

import email
import email.policy
from datetime import datetime, timedelta, timezone

import pytest

from services.action_runner.mailer import Mail, build_message, clean_recipients
from services.action_runner.templates import (
    DEFAULT_BODIES,
    MACROS,
    MacroValues,
    header_safe,
    html_to_text,
    render_html,
    render_subject,
)

VALUES = MacroValues(
    trigger_name="min CR", metric="cr", value=0.1 + 0.2, threshold=0.05, status="PROBLEM", previous_status="OK",
    offer_id=12, offer_name='Summer <script>alert("x")</script> & Co', affiliate_id=7,
    measured_at=datetime(2026, 11, 28, 12, 30, tzinfo=timezone(timedelta(hours=2))),
)


def test_every_macro_is_replaced():
    template = " ".join("{" + m + "}" for m in MACROS)
    assert render_subject(template, VALUES) == (
        'min CR cr 0.3 0.05 PROBLEM OK 12 Summer <script>alert("x")</script> & Co 7 2026-11-28 10:30:00 UTC'
    )


def test_values_are_html_escaped_in_the_body_but_the_template_markup_is_kept():
    body = render_html("<p>Offer <b>{offer-name}</b> is {status}</p>", "email_affiliate", VALUES)
    assert body == ("<p>Offer <b>Summer &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co</b>"
                    " is PROBLEM</p>")


def test_unknown_macros_and_literal_braces_are_left_alone():
    body = render_html("<style>p {color: red}</style>{nope} {offer-id}", "email_affiliate", VALUES)
    assert body == "<style>p {color: red}</style>{nope} 12"


def test_a_value_that_looks_like_a_macro_is_not_expanded_again():
    values = MacroValues(**{**VALUES.__dict__, "offer_name": "{trigger-name}"})
    assert render_html("{offer-name}", "email_affiliate", values) == "{trigger-name}"


@pytest.mark.parametrize("template", [
    "Hi\r\nBcc: evil@x", "Hi\nBcc: evil@x", "Hi\rBcc: evil@x", "Hi\u2028Bcc: evil@x", "Hi\x0bBcc: evil@x",
    "Hi\x1cBcc: evil@x", "Hi\x00Bcc: evil@x", "Hi\r\n\tBcc: evil@x",
])
def test_a_subject_template_never_yields_a_line_break(template):
    subject = render_subject(template, VALUES)
    assert subject == "Hi Bcc: evil@x"


def test_a_value_with_line_breaks_cannot_break_the_subject():
    values = MacroValues(**{**VALUES.__dict__, "trigger_name": "x\r\nBcc: evil@x\r\n\r\nbody"})
    subject = render_subject("[KPI] {trigger-name}", values)
    assert "\r" not in subject and "\n" not in subject
    assert subject == "[KPI] x Bcc: evil@x body"


def test_long_subjects_are_cut():
    assert len(header_safe("x" * 1000)) == 250


def test_defaults_exist_for_every_email_kind_and_render():
    for kind in DEFAULT_BODIES:
        body = render_html(None, kind, VALUES)
        assert "&lt;script&gt;" in body and "<script>" not in body
        assert "{" not in body
    assert render_subject(None, VALUES).startswith("[KPI] min CR is PROBLEM: offer 12")


def test_missing_previous_status_and_offer_name_read_naturally():
    values = MacroValues(**{**VALUES.__dict__, "previous_status": None, "offer_name": None})
    assert render_subject("{previous-status} -> {status}: {offer-name}", values) == "none -> PROBLEM: (unknown offer)"


def test_plain_text_alternative_reads_the_escaped_values_as_text():
    body = render_html("<p>Offer {offer-name}</p><ul><li>a</li><li>b</li></ul><script>x()</script>",
                       "email_affiliate", VALUES)
    assert html_to_text(body) == 'Offer Summer <script>alert("x")</script> & Co\n\n- a\n- b\n'


def test_the_message_carries_both_parts_and_a_clean_subject():
    html = render_html(None, "email_affiliate", VALUES)
    mail = Mail(recipients=("a@x.example", "b@x.example"), subject=render_subject("Hi\r\nBcc: evil@x", VALUES),
                html=html, text=html_to_text(html), message_id="<kpi-1@kpi.example>", run_id=1)
    raw = build_message(mail, "kpi@kpi.example")
    assert b"\nBcc:" not in raw
    assert raw.count(b"\n") == raw.count(b"\r\n")  # SMTP's line ends: smtplib sends bytes as they are
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["To"] == "a@x.example, b@x.example"
    assert message.get_body(("html",)).get_content() == html
    assert message.get_body(("plain",)).get_content().startswith("Hello,")


def test_recipient_addresses_are_cleaned():
    usable, unusable = clean_recipients([
        "a@x.example", "A@X.example", None, " ", "b@x.example\r\nBcc: evil@x", "c@x.example, d@x.example",
        "not-an-address", " e@x.example ",
    ])
    assert usable == ["a@x.example", "e@x.example"]
    assert unusable == ["b@x.example\r\nBcc: evil@x", "c@x.example, d@x.example", "not-an-address"]


def test_a_line_break_that_reaches_a_header_is_refused():
    mail = Mail(recipients=("a@x.example",), subject="Hi\r\nBcc: evil@x", html="<p>x</p>", text="x",
                message_id="<kpi-1@kpi.example>", run_id=1)
    with pytest.raises(ValueError, match="Subject"):
        build_message(mail, "kpi@kpi.example")


def test_a_non_ascii_subject_and_sender_name_are_encoded_and_read_back():
    mail = Mail(recipients=("a@x.example",), subject="Offre Été: taux bas", html="<p>é</p>", text="é",
                message_id="<kpi-1@kpi.example>", run_id=7)
    message = email.message_from_bytes(build_message(mail, "Équipe KPI <kpi@kpi.example>"),
                                       policy=email.policy.default)
    assert message["Subject"] == "Offre Été: taux bas"
    assert message["From"].addresses[0].display_name == "Équipe KPI"
    assert message["From"].addresses[0].addr_spec == "kpi@kpi.example"
    assert message["X-KPI-Operation-Run"] == "7"
    assert message.get_body(("plain",)).get_content().strip() == "é"
