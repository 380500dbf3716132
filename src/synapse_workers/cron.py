"""Standard 5-field cron expressions: parse, and the next time one is due. Pure (no clock, no I/O).

`minute hour day-of-month month day-of-week`, each `*`, a number, a range `a-b`, a step `*/s` or `a-b/s`, or a
comma-separated list of those. Day of week 0-7, where 0 and 7 are both Sunday. As in Vixie cron, when both
day-of-month and day-of-week are restricted (neither is `*`), a day matches if either does. Names (`sun`, `jan`)
and the `@daily` shortcuts are not accepted. Times are naive local times (the machine's or container's `TZ`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
CRON_HELP = (
    "a 5-field cron expression 'minute hour day-of-month month day-of-week' (numbers, *, a-b ranges, */n or a-b/n "
    "steps, comma lists; day of week 0-7 with 0 and 7 Sunday), such as '0 1 * * 0' (Sundays at 01:00)"
)
# How far ahead next_due looks: every valid expression matches within 8 years (29 February: within 8).
HORIZON_DAYS = 8 * 366


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday (7 folded into 0)
    any_day: bool  # day of month is *
    any_weekday: bool  # day of week is *

    def day_matches(self, when: datetime) -> bool:
        dom = when.day in self.days
        dow = (when.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def parse(text: str) -> Cron:
    """A Cron, or ValueError with what was expected."""
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(CRON_HELP)
    sets = [_field(part, name, low, high) for part, (name, low, high) in zip(parts, FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    cron = Cron(" ".join(parts), sets[0], sets[1], sets[2], sets[3], weekdays, parts[2] == "*", parts[4] == "*")
    if next_due(cron, datetime(2000, 1, 1)) is None:
        raise ValueError(f"{CRON_HELP}; {cron.text!r} never matches a real date")
    return cron


def _field(part: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for item in part.split(","):
        spec, slash, step_text = item.partition("/")
        step = _number(step_text, name, 1, high) if slash else 1
        if spec == "*":
            first, last = low, high
        elif "-" in spec:
            a, _, b = spec.partition("-")
            first, last = _number(a, name, low, high), _number(b, name, low, high)
            if first > last:
                raise ValueError(f"{CRON_HELP}; the {name} range {spec!r} runs backwards")
        elif slash:
            raise ValueError(f"{CRON_HELP}; a step needs * or a range before it, not {item!r}")
        else:
            first = last = _number(spec, name, low, high)
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _number(text: str, name: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{CRON_HELP}; the {name} field takes numbers from {low} to {high}, not {text!r}")
    return int(text)


def next_due(cron: Cron, after: datetime) -> datetime | None:
    """The first minute strictly after `after` that the expression matches (None: none within HORIZON_DAYS)."""
    when = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    limit = after + timedelta(days=HORIZON_DAYS)
    while when <= limit:
        if when.month not in cron.months:
            year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
            when = datetime(year, month, 1)
        elif not cron.day_matches(when):
            when = datetime(when.year, when.month, when.day) + timedelta(days=1)
        elif when.hour not in cron.hours:
            when = when.replace(minute=0) + timedelta(hours=1)
        elif when.minute not in cron.minutes:
            when += timedelta(minutes=1)
        else:
            return when
    return None
