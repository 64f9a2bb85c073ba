"""The domain's words, each defined once: the schema (shared.db) builds its CHECK
constraints from them, the message contracts (shared.events) validate with them, and the
rules (trigger_checker, event_detector, action_runner) decide with them.

The strings are public: operators write them in SQL (DESIGN.md section 3), and they
travel in messages (section 2).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Literal, get_args

# A pair's status under a trigger.
Status = Literal["OK", "PROBLEM"]
STATUSES: tuple[Status, ...] = get_args(Status)

# `{value} {operator} {threshold}` holds = PROBLEM.
Operator = Literal["lt", "le", "gt", "ge", "eq", "ne"]
OPERATORS: tuple[Operator, ...] = get_args(Operator)
# eq and ne compare exactly: values and thresholds are both double precision, and a
# tolerance would be a policy nobody asked for.
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "eq": operator.eq,
    "ne": operator.ne,
}

# The targets of trigger_thresholds rows.
ThresholdScope = Literal["offer_category", "offer", "affiliate", "offer_affiliate"]
THRESHOLD_SCOPES: tuple[ThresholdScope, ...] = get_args(ThresholdScope)
# Which threshold a check used, most specific first: a threshold's scope, or the
# trigger's own general threshold.
CheckScope = Literal["offer_affiliate", "affiliate", "offer", "offer_category", "general"]
CHECK_SCOPES: tuple[CheckScope, ...] = get_args(CheckScope)

OperationKind = Literal[
    "email_affiliate",
    "email_affiliate_manager",
    "email_administrators",
    "approve_affiliate",
    "reject_affiliate",
]
OPERATION_KINDS: tuple[OperationKind, ...] = get_args(OperationKind)
EMAIL_KINDS: tuple[OperationKind, ...] = ("email_affiliate", "email_affiliate_manager", "email_administrators")

# operation_runs.status: pending until final; the final ones are announced.
# What doing an operation came to (operations.perform).
RunOutcome = Literal["succeeded", "failed", "skipped"]
# What a run is recorded as, and announced as once it is not pending: besides the
# outcomes, `silenced` (a silence matched its event), `held` (a reject over the hourly
# cap, until an operator releases or discards it) and `discarded`.
AnnouncedStatus = Literal["succeeded", "failed", "skipped", "silenced", "held", "discarded"]
RunStatus = Literal["pending", "succeeded", "failed", "skipped", "silenced", "held", "discarded"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)

# load_runs.status: requested (claimed by the schedule) -> running -> succeeded | failed.
LoadStatus = Literal["requested", "running", "succeeded", "failed"]
LOAD_STATUSES: tuple[LoadStatus, ...] = get_args(LoadStatus)

# The metrics of DESIGN.md section 5 (seeded into `metrics` by the first migration), and
# what a load request names to refresh the reference data instead.
METRIC_KEYS = ("cr", "pacc", "gtr", "clicks_zero_conv", "cap_fill")
REFERENCE = "reference"

# Offer, affiliate, category and the other ids from HasOffers are `integer` columns: an id
# above this can never be stored or checked, so it is invalid wherever it arrives.
INT4_MAX = 2**31 - 1
