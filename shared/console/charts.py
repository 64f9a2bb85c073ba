"""The chart of one trigger for one pair: SVG rendered on the server, no script.

It draws the checks' values over time (a line and a dot per check, each with a tooltip),
the threshold each check was evaluated with (a step line: the threshold as recorded,
whatever it is now) and its recovery value where one was set (hysteresis: a PROBLEM goes
back to OK only past it), the periods the pair spent in PROBLEM (shaded, from the recorded
state changes) and a mark at every state change (a tooltip says from what to what, the
value and the threshold). Every text is escaped: trigger names come from operators,
and nothing else from the network appears in a chart.

When the checks are gone (dropped with their partition after the retention period)
but the state changes remain, it draws those alone and says so; with neither, it says
there is no data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from markupsafe import Markup, escape

from shared.console.queries import CheckPoint, StateChange

WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP, BOTTOM = 72, 24, 34, 46
PLOT_W = WIDTH - LEFT - RIGHT
PLOT_H = HEIGHT - TOP - BOTTOM

SCOPE_LABELS = {
    "offer_affiliate": "offer × affiliate", "affiliate": "affiliate", "offer": "offer",
    "offer_category": "offer category", "general": "general",
}
OPERATOR_SYMBOLS = {"lt": "<", "le": "≤", "gt": ">", "ge": "≥", "eq": "=", "ne": "≠"}

MINUTE, HOUR, DAY = 60, 3600, 86400
TIME_STEPS = [MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE, 30 * MINUTE, HOUR, 2 * HOUR, 3 * HOUR,
              6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY, 14 * DAY]
MONTH_STEPS = [1, 2, 3, 6, 12]
MAX_TIME_TICKS = 8
MONDAY_OFFSET = 4 * DAY  # 1970-01-01 was a Thursday; weekly ticks fall on Mondays


@dataclass(frozen=True)
class Chart:
    svg: Markup
    points: int      # checks drawn
    changes: int     # state-change marks drawn
    note: str | None  # why the chart is empty or partial


def render_chart(chart_id: str, title: str, checks: Sequence[CheckPoint], changes: Sequence[StateChange],
                 before: StateChange | None) -> Chart:
    """checks: oldest first; changes: the state changes from the first check on (all of
    them when there is no check), oldest first; before: the last change before them."""
    if checks:
        return _render(chart_id, title, checks, changes, before, None)
    if changes:
        note = (f"The checks are older than the retention period: only the {len(changes)} recorded "
                f"state change{'s' if len(changes) != 1 else ''} remain.")
        return _render(chart_id, title, [], changes, before, note)
    return Chart(_empty(title, "No checks recorded for this pair and trigger."), 0, 0,
                 "no data")


def _render(chart_id: str, title: str, checks: Sequence[CheckPoint], changes: Sequence[StateChange],
            before: StateChange | None, note: str | None) -> Chart:
    times = [c.measured_at for c in checks] or [c.measured_at for c in changes]
    start, end = min(times), max(times)
    if checks:
        changes = [c for c in changes if start <= c.measured_at <= end]
    t0, t1 = _time_domain(start, end)
    values = [c.value for c in checks] + [c.threshold for c in checks]
    values += [c.recovery for c in checks if c.recovery is not None]
    values += [v for c in changes for v in (c.value, c.threshold) if v is not None]
    v0, v1, value_ticks, step = _value_domain([v for v in values if math.isfinite(v)])

    def x(at: datetime) -> float:
        return LEFT + (at - t0).total_seconds() / (t1 - t0).total_seconds() * PLOT_W

    def y(value: float) -> float:
        clipped = min(max(value, v0), v1)
        return TOP + (v1 - clipped) / (v1 - v0) * PLOT_H

    out: list[str] = []
    clip = f"clip-{chart_id}"
    out.append(f'<defs><clipPath id="{clip}"><rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}"/>'
               f'</clipPath></defs>')
    out.append(f'<rect class="plot-bg" x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}"/>')

    # PROBLEM periods, from the recorded changes (a check's status alone is not the state).
    for band_start, band_end in problem_periods(before, changes, start, end):
        x0, x1 = x(band_start), x(band_end)
        out.append(
            f'<rect class="problem-band" x="{x0:.1f}" y="{TOP}" width="{max(x1 - x0, 2):.1f}" height="{PLOT_H}">'
            f'<title>{escape(f"PROBLEM from {_when(band_start)} to {_when(band_end)}")}</title></rect>'
        )

    # Grid and axes.
    for tick in value_ticks:
        ty = y(tick)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{ty:.1f}" y2="{ty:.1f}"/>')
        out.append(f'<text class="tick tick-y" x="{LEFT - 8}" y="{ty + 4:.1f}" text-anchor="end">'
                   f'{escape(format_value(tick, step))}</text>')
    for at, first_line, second_line in time_ticks(t0, t1):
        tx = x(at)
        out.append(f'<line class="grid grid-x" x1="{tx:.1f}" x2="{tx:.1f}" y1="{TOP}" y2="{TOP + PLOT_H}"/>')
        label = f'<tspan x="{tx:.1f}">{escape(first_line)}</tspan>'
        if second_line:
            label += f'<tspan class="tick-sub" x="{tx:.1f}" dy="14">{escape(second_line)}</tspan>'
        out.append(f'<text class="tick tick-x" x="{tx:.1f}" y="{TOP + PLOT_H + 18}" text-anchor="middle">'
                   f'{label}</text>')
    out.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{TOP + PLOT_H}" y2="{TOP + PLOT_H}"/>')
    out.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + PLOT_H}"/>')
    out.append(f'<text class="tick axis-unit" x="{LEFT + PLOT_W}" y="{HEIGHT - 4}" text-anchor="end">UTC</text>')

    # The threshold as each check recorded it (a step at every change), or as the state
    # changes recorded it when the checks are gone.
    steps = [(c.measured_at, c.threshold) for c in checks] or [
        (c.measured_at, c.threshold) for c in changes if c.threshold is not None]
    if steps:
        out.append(f'<path class="threshold-line" clip-path="url(#{clip})" d="{_step_path(steps, end, x, y)}"/>')
    # The recovery value, where the checks recorded one (a gap where they did not).
    with_recovery = any(c.recovery is not None for c in checks)
    if with_recovery:
        recovery = [(c.measured_at, math.nan if c.recovery is None else c.recovery) for c in checks]
        out.append(f'<path class="recovery-line" clip-path="url(#{clip})" d="{_step_path(recovery, end, x, y)}"/>')

    if checks:
        line = " ".join(f"{x(c.measured_at):.1f},{y(c.value):.1f}" for c in checks if math.isfinite(c.value))
        out.append(f'<polyline class="value-line" clip-path="url(#{clip})" points="{line}"/>')
        radius = 3.2 if len(checks) <= 60 else 2.4 if len(checks) <= 200 else 1.6
        out.append('<g class="points">')
        for c in checks:
            if not math.isfinite(c.value):
                continue
            scope = SCOPE_LABELS.get(c.threshold_scope or "", c.threshold_scope or "")
            tip = (f"{_when(c.measured_at)}\nvalue {format_number(c.value)} · threshold "
                   f"{OPERATOR_SYMBOLS.get(c.operator, c.operator)} {format_number(c.threshold)}"
                   f"{f' ({scope})' if scope else ''}"
                   f"{f' · recovery {format_number(c.recovery)}' if c.recovery is not None else ''}"
                   f"\ncheck: {c.status}")
            status_class = " pt-problem" if c.status == "PROBLEM" else ""
            out.append(f'<circle class="pt{status_class}" cx="{x(c.measured_at):.1f}" cy="{y(c.value):.1f}" '
                       f'r="{radius}"><title>{escape(tip)}</title></circle>')
        out.append("</g>")
    else:
        out.append('<g class="points">')
        for c in changes:
            if c.value is not None and math.isfinite(c.value):
                out.append(f'<circle class="pt-event" cx="{x(c.measured_at):.1f}" cy="{y(c.value):.1f}" r="3">'
                           f'<title>{escape(f"{_when(c.measured_at)}: value {format_number(c.value)}")}</title>'
                           f'</circle>')
        out.append("</g>")

    out.append('<g class="changes">')
    for c in changes:
        cx = x(c.measured_at)
        kind = "change-problem" if c.status == "PROBLEM" else "change-ok"
        tip = (f"{c.previous_status or 'no state'} → {c.status}\n{_when(c.measured_at)}"
               f"\nvalue {format_number(c.value)} · threshold {format_number(c.threshold)}")
        out.append(
            f'<g class="change {kind}"><title>{escape(tip)}</title>'
            f'<line class="change-line" x1="{cx:.1f}" x2="{cx:.1f}" y1="{TOP}" y2="{TOP + PLOT_H}"/>'
            f'<path class="change-mark" d="M{cx - 6:.1f},{TOP - 9} L{cx + 6:.1f},{TOP - 9} L{cx:.1f},{TOP + 1} Z"/>'
            f'</g>'
        )
    out.append("</g>")

    if note:
        out.append(f'<text class="chart-note" x="{LEFT + PLOT_W}" y="18" text-anchor="end">'
                   f'checks older than retention: state changes only<title>{escape(note)}</title></text>')
    out.append(_legend(bool(checks), with_recovery))
    drawn_points = sum(1 for c in checks if math.isfinite(c.value))
    return Chart(_svg(title, "".join(out), drawn_points, len(changes)), drawn_points, len(changes), note)


def problem_periods(before: StateChange | None, changes: Iterable[StateChange], start: datetime,
                    end: datetime) -> list[tuple[datetime, datetime]]:
    """The intervals within [start, end] in which the pair was in PROBLEM."""
    periods = []
    status = before.status if before else None
    since = start
    for change in changes:
        if change.status == status:
            continue
        if change.status == "PROBLEM":
            since = max(change.measured_at, start)
        elif status == "PROBLEM":
            periods.append((since, min(change.measured_at, end)))
        status = change.status
    if status == "PROBLEM":
        periods.append((since, end))
    return [(a, b) for a, b in periods if b >= a]


def _step_path(steps: list[tuple[datetime, float]], end: datetime, x, y) -> str:
    """A step line; a value that is not finite (NaN: none recorded) leaves a gap."""
    parts = []
    pen_up = True
    for i, (at, value) in enumerate(steps):
        if not math.isfinite(value):
            pen_up = True
            continue
        until = steps[i + 1][0] if i + 1 < len(steps) else end
        parts.append(f"{'M' if pen_up else 'L'}{x(at):.1f},{y(value):.1f} L{x(until):.1f},{y(value):.1f}")
        pen_up = False
    return " ".join(parts)


def _legend(with_checks: bool, with_recovery: bool = False) -> str:
    items = []
    cx = LEFT
    entries = [("value", "legend-value"), ("threshold", "legend-threshold"), ("recovery", "legend-recovery"),
               ("PROBLEM", "legend-band"), ("state change", "legend-change")]
    if not with_recovery:
        entries = [e for e in entries if e[1] != "legend-recovery"]
    if not with_checks:
        entries = entries[1:]
    for label, kind in entries:
        if kind == "legend-value":
            swatch = (f'<line class="legend-value" x1="{cx}" x2="{cx + 18}" y1="14" y2="14"/>'
                      f'<circle class="legend-pt" cx="{cx + 9}" cy="14" r="2.6"/>')
        elif kind in ("legend-threshold", "legend-recovery"):
            swatch = f'<line class="{kind}" x1="{cx}" x2="{cx + 18}" y1="14" y2="14"/>'
        elif kind == "legend-band":
            swatch = f'<rect class="legend-band" x="{cx}" y="8" width="18" height="12"/>'
        else:
            swatch = f'<path class="legend-change" d="M{cx + 3},8 L{cx + 15},8 L{cx + 9},19 Z"/>'
        items.append(f'{swatch}<text class="legend-label" x="{cx + 24}" y="18">{escape(label)}</text>')
        cx += 34 + 7 * len(label)
    return f'<g class="legend">{"".join(items)}</g>'


def _svg(title: str, body: str, points: int, changes: int) -> Markup:
    return Markup(
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" data-points="{points}" data-changes="{changes}">'
        f'<title>{escape(title)}</title>{body}</svg>'
    )


def _empty(title: str, message: str) -> Markup:
    body = (f'<rect class="plot-bg" x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}"/>'
            f'<text class="chart-note chart-empty" x="{LEFT + PLOT_W / 2:.1f}" y="{TOP + PLOT_H / 2:.1f}" '
            f'text-anchor="middle">{escape(message)}</text>')
    return _svg(title, body, 0, 0)


# --- scales -----------------------------------------------------------------------------


def _time_domain(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    span = (end - start).total_seconds()
    if span <= 0:
        return start - timedelta(minutes=30), end + timedelta(minutes=30)
    pad = timedelta(seconds=span * 0.02)
    return start - pad, end + pad


def _value_domain(values: list[float]) -> tuple[float, float, list[float], float]:
    if not values:
        values = [0.0, 1.0]
    low, high = min(values), max(values)
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    span = high - low
    # A little air around the data, but no negative axis for a metric that never is.
    low, high = (low - span * 0.06 if low - span * 0.06 >= 0 or low < 0 else 0.0), high + span * 0.06
    step = nice_step((high - low) / 5)
    first, last = math.floor(low / step), math.ceil(high / step)
    ticks = [i * step for i in range(first, last + 1)]
    return first * step, last * step, ticks, step


def nice_step(raw: float) -> float:
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * magnitude * 1.0000001:
            return multiple * magnitude
    return 10 * magnitude


def format_value(value: float, step: float) -> str:
    """A tick label with as many decimals as the step needs (0.005, 0.0075, 120, 1.5M)."""
    if abs(value) < step / 1e6:
        return "0"
    if abs(value) >= 1e6 or step < 1e-6:
        return f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step / 10 ** -decimals, 6) % 1:
        decimals += 1
    return f"{value:.{decimals}f}"


def format_number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.6g}"


def time_ticks(t0: datetime, t1: datetime) -> list[tuple[datetime, str, str]]:
    """Tick times in [t0, t1] with a label of one or two lines (time, then the date when
    it changes; or the date, then the year when it changes), in UTC."""
    span = (t1 - t0).total_seconds()
    step = next((s for s in TIME_STEPS if span / s <= MAX_TIME_TICKS), None)
    if step is None:
        months = next((m for m in MONTH_STEPS if span / (m * 30 * DAY) <= MAX_TIME_TICKS), 24)
        ticks = _month_ticks(t0, t1, months)
    else:
        offset = MONDAY_OFFSET if step >= 7 * DAY else 0
        first = math.ceil((t0.timestamp() - offset) / step) * step + offset
        ticks = []
        at = first
        while at <= t1.timestamp():
            ticks.append(datetime.fromtimestamp(at, timezone.utc))
            at += step
    labels = []
    previous: datetime | None = None
    for at in ticks:
        if step is not None and step < DAY:
            first_line = at.strftime("%H:%M")
            second = at.strftime("%b %d") if previous is None or previous.date() != at.date() else ""
        else:
            first_line = at.strftime("%b %d")
            second = at.strftime("%Y") if previous is None or previous.year != at.year else ""
        labels.append((at, first_line, second))
        previous = at
    return labels


def _month_ticks(t0: datetime, t1: datetime, months: int) -> list[datetime]:
    t0, t1 = t0.astimezone(timezone.utc), t1.astimezone(timezone.utc)
    year, month = t0.year, t0.month
    ticks = []
    while True:
        month += 1
        if month > 12:
            year, month = year + 1, 1
        at = datetime(year, month, 1, tzinfo=timezone.utc)
        if at > t1:
            return ticks
        if (month - 1) % months == 0:
            ticks.append(at)


def _when(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
