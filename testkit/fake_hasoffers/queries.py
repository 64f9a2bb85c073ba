"""What the fake's read methods share: filters, report aggregation, sorting, paging.

Pure functions of parsed parameters (see server.parse_params) and the network's data.
A request the real API would refuse raises QueryError, answered as status -1.

Filter syntaxes, as HasOffers accepts them:
- Report.getStats: `filters[Stat.date][conditional]=BETWEEN&filters[Stat.date][values][]=...`
  (values as a scalar, `values[]=` or `values[0]=`);
- find*: `filters[status]=active`, `filters[id][]=1&filters[id][]=2` (IN),
  `filters[id][GREATER_THAN]=5`;
- both: a bare scalar or list means EQUAL_TO. All filters are ANDed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from testkit.fake_hasoffers.network import StatRow

CONDITIONALS = ("EQUAL_TO", "NOT_EQUAL_TO", "LESS_THAN", "LESS_THAN_OR_EQUAL_TO", "GREATER_THAN",
                "GREATER_THAN_OR_EQUAL_TO", "BETWEEN", "LIKE", "NOT_LIKE", "NULL", "NOT_NULL")

# Report.getStats: dimensions are grouped by, measures are summed.
STAT_DIMENSIONS = ("offer_id", "affiliate_id", "goal_id", "date", "hour")
STAT_COUNTS = ("clicks", "gross_clicks", "conversions")
STAT_MONEY = ("payout", "revenue", "profit")
STAT_MEASURES = STAT_COUNTS + STAT_MONEY


class QueryError(Exception):
    """A parameter the API would refuse; the message is the API's error text."""


Predicate = Callable[[Any], bool]


def as_values(value: Any) -> list[Any]:
    """`values` as a scalar, `values[]=` (list) or `values[0]=` (dict keyed by index)."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=lambda k: int(k) if str(k).isdigit() else 0)]
    return [value]


def conditions(filters: Any) -> list[tuple[str, str, list[Any]]]:
    """(field, conditional, values) for every filter, in either syntax."""
    if filters in (None, "", []):
        return []
    if not isinstance(filters, dict):
        raise QueryError("Invalid filters")
    found: list[tuple[str, str, list[Any]]] = []
    for name, spec in filters.items():
        if name in ("OR", "AND"):
            raise QueryError(f"Unsupported filter {name}")
        if isinstance(spec, dict) and "conditional" in spec:
            found.append((name, str(spec["conditional"]).upper(), as_values(spec.get("values"))))
        elif isinstance(spec, dict) and spec and all(str(k).upper() in CONDITIONALS for k in spec):
            for conditional, values in spec.items():
                found.append((name, str(conditional).upper(), as_values(values)))
        elif isinstance(spec, dict) and spec and all(str(k).isdigit() for k in spec):
            found.append((name, "EQUAL_TO", as_values(spec)))
        elif isinstance(spec, (list, str, int, float)):
            found.append((name, "EQUAL_TO", as_values(spec)))
        else:
            raise QueryError(f"Invalid filter on {name}")
    for name, conditional, values in found:
        if conditional not in CONDITIONALS:
            raise QueryError(f"Invalid conditional {conditional} for {name}")
        if conditional == "BETWEEN" and len(values) != 2:
            raise QueryError(f"BETWEEN on {name} needs two values")
        if conditional not in ("NULL", "NOT_NULL") and not values:
            raise QueryError(f"Filter on {name} has no values")
    return found


def predicate(conditional: str, values: Sequence[Any], convert: Callable[[Any], Any]) -> Predicate:
    """A test of one field value. `convert` turns request strings into the field's type."""
    if conditional == "NULL":
        return lambda v: v is None or v == ""
    if conditional == "NOT_NULL":
        return lambda v: v is not None and v != ""
    if conditional in ("LIKE", "NOT_LIKE"):
        pattern = re.compile("^" + ".*".join(re.escape(p).replace("_", ".") for p in str(values[0]).split("%"))
                             + "$", re.IGNORECASE | re.DOTALL)
        wanted = conditional == "LIKE"
        return lambda v: v is not None and bool(pattern.match(str(v))) == wanted
    try:
        typed = [convert(v) for v in values]
    except (TypeError, ValueError):
        raise QueryError(f"Invalid value in filter: {values[0]!r}") from None
    if conditional == "EQUAL_TO":
        allowed = set(typed)
        return lambda v: v in allowed
    if conditional == "NOT_EQUAL_TO":
        refused = set(typed)
        return lambda v: v is not None and v not in refused
    if conditional == "BETWEEN":
        low, high = typed
        return lambda v: v is not None and low <= v <= high
    x = typed[0]
    return {
        "LESS_THAN": lambda v: v is not None and v < x,
        "LESS_THAN_OR_EQUAL_TO": lambda v: v is not None and v <= x,
        "GREATER_THAN": lambda v: v is not None and v > x,
        "GREATER_THAN_OR_EQUAL_TO": lambda v: v is not None and v >= x,
    }[conditional]


def loose(value: Any) -> Any:
    """Record fields are strings; compare them as numbers when they are numbers."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    text = str(value)
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
            return number if math.isfinite(number) else text
        except ValueError:
            return text


# -- Report.getStats -------------------------------------------------------------------


def stat_name(field: str) -> str:
    """`Stat.clicks` -> `clicks`; other models are not part of the fake's reports."""
    model, _, name = str(field).partition(".")
    if model != "Stat" or name not in STAT_DIMENSIONS + STAT_MEASURES:
        raise QueryError(f"Invalid field {field}")
    return name


def _stat_convert(name: str) -> Callable[[Any], Any]:
    if name == "date":
        return lambda v: str(v)
    if name in ("offer_id", "affiliate_id", "goal_id", "hour") + STAT_COUNTS:
        return lambda v: int(str(v))
    return lambda v: float(str(v))


def report(stats: Iterable[StatRow], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of the report, sorted, as numbers (formatting comes later).

    Dimension filters select raw rows; measure filters apply to the sums (HAVING).
    The grouping is `groups[]` plus any dimension asked for in `fields[]`.
    """
    fields = [stat_name(f) for f in as_values(params.get("fields"))]
    if not fields:
        raise QueryError("Missing required argument: fields")
    groups = [stat_name(g) for g in as_values(params.get("groups"))]
    for g in groups:
        if g not in STAT_DIMENSIONS:
            raise QueryError(f"Invalid group Stat.{g}")
    keys = list(dict.fromkeys(groups + [f for f in fields if f in STAT_DIMENSIONS]))
    measures = [f for f in dict.fromkeys(fields) if f in STAT_MEASURES]

    row_tests: list[tuple[str, Predicate]] = []
    sum_tests: list[tuple[str, Predicate]] = []
    for field, conditional, values in conditions(params.get("filters")):
        name = stat_name(field)
        test = predicate(conditional, values, _stat_convert(name))
        (row_tests if name in STAT_DIMENSIONS else sum_tests).append((name, test))
        if name in STAT_MEASURES and name not in measures:
            measures.append(name)

    sums: dict[tuple[Any, ...], list[float]] = {}
    for row in stats:
        if not all(test(getattr(row, name)) for name, test in row_tests):
            continue
        key = tuple(getattr(row, k) for k in keys)
        total = sums.get(key)
        if total is None:
            total = sums[key] = [0] * len(measures)
        for i, m in enumerate(measures):
            total[i] += getattr(row, m)
    rows = [{**dict(zip(keys, key)), **dict(zip(measures, total))} for key, total in sums.items()]
    rows = [r for r in rows if all(test(r[name]) for name, test in sum_tests)]
    rows.sort(key=lambda r: tuple(r[k] for k in keys))
    return sort_rows(rows, params.get("sort"), stat_name)


def sort_rows(rows: list[dict[str, Any]], sort: Any, name_of: Callable[[str], str]) -> list[dict[str, Any]]:
    """`sort[field]=asc|desc`; the first field given is the primary key."""
    if not sort:
        return rows
    if not isinstance(sort, dict):
        raise QueryError("Invalid sort")
    for field, direction in reversed(list(sort.items())):
        name = name_of(field)
        if str(direction).lower() not in ("asc", "desc"):
            raise QueryError(f"Invalid sort direction {direction}")
        rows.sort(key=lambda r: (r.get(name) is None, loose(r.get(name))), reverse=str(direction).lower() == "desc")
    return rows


def format_stat(row: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """One report row as the API sends it: `{"Stat": {...}}`, every number a string."""
    out: dict[str, str] = {}
    for name in fields:
        value = row.get(name, 0)
        out[name] = f"{round(value, 2) + 0.0:.2f}" if name in STAT_MONEY else str(value)
    return {"Stat": out}


def report_fields(params: dict[str, Any]) -> list[str]:
    """The names a report row carries: the fields asked for, then the groups."""
    names = [stat_name(f) for f in as_values(params.get("fields"))]
    names += [stat_name(g) for g in as_values(params.get("groups"))]
    return list(dict.fromkeys(names))


def totals(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    measures = [f for f in fields if f in STAT_MEASURES]
    return format_stat({m: sum(r.get(m, 0) for r in rows) for m in measures}, measures)


# -- find* ------------------------------------------------------------------------------


def find(records: dict[int, dict[str, Any]], model: str, params: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Records (id -> {model: {field: str}}) that pass the filters, sorted (by id unless asked)."""
    tests: list[tuple[str, Predicate]] = []
    for field, conditional, values in conditions(params.get("filters")):
        name = field.split(".", 1)[1] if field.startswith(f"{model}.") else field
        tests.append((name, predicate(conditional, values, loose)))
    for name, _ in tests:
        if records and not any(name in r[model] for r in records.values()):
            raise QueryError(f"Invalid filter field {name}")
    kept = [(i, r) for i, r in sorted(records.items())
            if all(test(loose(r[model].get(name))) for name, test in tests)]
    if params.get("sort"):
        order = sort_rows([{**r[model], "_id": i} for i, r in kept], params.get("sort"),
                          lambda f: f.split(".", 1)[1] if f.startswith(f"{model}.") else f)
        by_id = dict(kept)
        kept = [(row["_id"], by_id[row["_id"]]) for row in order]
    wanted = [f.split(".", 1)[1] if f.startswith(f"{model}.") else f for f in as_values(params.get("fields"))]
    if wanted:
        kept = [(i, {**r, model: {k: v for k, v in r[model].items() if k in wanted}}) for i, r in kept]
    return kept


def page_of(items: Sequence[Any], params: dict[str, Any]) -> tuple[list[Any], dict[str, Any]] | None:
    """The page asked for and the paging fields, or None when no `limit` was given."""
    if params.get("limit") in (None, ""):
        return None
    try:
        limit = int(params["limit"])
        page = int(params.get("page") or 1)
    except (TypeError, ValueError):
        raise QueryError("Invalid limit or page") from None
    if limit <= 0:
        raise QueryError("Invalid limit")
    page = max(page, 1)
    chunk = list(items[(page - 1) * limit: page * limit])
    # `current` is the page size asked for (the documented answers: "current": 50 with
    # "count": 1), 0 for an empty result.
    return chunk, {"page": page, "current": limit if items else 0, "count": len(items),
                   "pageCount": math.ceil(len(items) / limit)}
