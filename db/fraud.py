"""Rows and SQL of the `fraud` schema (db/migrations/fraud/0001_fraud.sql).

Each function runs on a connection (or pool) the caller holds; batch writers take whole
batches and use one statement over `unnest` arrays, so the worker's recorder pays one
round trip per Kafka batch, not per payment.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from services.fraud_rules import Rule

MAX_ROWS_PER_WRITE = 10_000
MAX_PAGE = 200
REVIEW_NAMESPACE = uuid.UUID("6f1c7a52-3f5e-4c55-9d55-9a1f3e7f0d11")


def review_id_for(payment_id: str) -> uuid.UUID:
    """A review's id is derived from its payment: a redelivered decision finds it again."""
    return uuid.uuid5(REVIEW_NAMESPACE, payment_id)


def _columns(rows: Sequence[msgspec.Struct], json_fields: tuple[str, ...]) -> list[list[Any]]:
    """Struct rows as column lists for `unnest`; JSON-valued fields as JSON text (asyncpg
    would read a list inside an array argument as another array dimension)."""
    fields = type(rows[0]).__struct_fields__
    json_at = {fields.index(name) for name in json_fields}
    cols = [list(c) for c in zip(*(msgspec.structs.astuple(r) for r in rows), strict=True)]
    for j in json_at:
        cols[j] = [msgspec.json.encode(v).decode() for v in cols[j]]
    return cols


def ms_to_dt(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000.0, UTC)


# ----------------------------------------------------------------------------- rules

class RuleRow(msgspec.Struct, frozen=True):
    id: str
    expression: str
    action: str
    priority: int
    enabled: bool
    description: str
    created_at: datetime
    updated_at: datetime
    updated_by: uuid.UUID | None

    def rule(self) -> Rule:
        return Rule(self.id, self.expression, self.action, self.priority, self.enabled, self.description)


_RULE_COLUMNS = "id, expression, action, priority, enabled, description, created_at, updated_at, updated_by"


async def rules_version(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    version = await conn.fetchval("SELECT version FROM fraud.rules_version")
    assert isinstance(version, int) and version >= 1, version
    return version


async def load_rules(conn: asyncpg.Connection) -> tuple[int, list[RuleRow]]:
    """The version and every rule, read in one snapshot (repeatable read)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        version = await rules_version(conn)
        rows = await conn.fetch(f"SELECT {_RULE_COLUMNS} FROM fraud.rules ORDER BY id")
    return version, [RuleRow(**dict(r)) for r in rows]


async def get_rule(conn: asyncpg.Connection | asyncpg.Pool, rule_id: str) -> RuleRow | None:
    row = await conn.fetchrow(f"SELECT {_RULE_COLUMNS} FROM fraud.rules WHERE id = $1", rule_id)
    return RuleRow(**dict(row)) if row else None


async def insert_rule(conn: asyncpg.Connection, rule: Rule, by: uuid.UUID | None) -> RuleRow | None:
    """The new row, or None when the id exists."""
    row = await conn.fetchrow(
        f"""INSERT INTO fraud.rules (id, expression, action, priority, enabled, description, updated_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING RETURNING {_RULE_COLUMNS}""",
        rule.id, rule.expression, rule.action, rule.priority, rule.enabled, rule.description, by)
    return RuleRow(**dict(row)) if row else None


async def update_rule(conn: asyncpg.Connection, rule: Rule, by: uuid.UUID | None) -> RuleRow | None:
    """The updated row, or None when there is no rule with that id."""
    row = await conn.fetchrow(
        f"""UPDATE fraud.rules SET expression = $2, action = $3, priority = $4, enabled = $5, description = $6,
                   updated_by = $7, updated_at = now()
            WHERE id = $1 RETURNING {_RULE_COLUMNS}""",
        rule.id, rule.expression, rule.action, rule.priority, rule.enabled, rule.description, by)
    return RuleRow(**dict(row)) if row else None


# ----------------------------------------------------------------------------- scores

class ScoreRow(msgspec.Struct, frozen=True):
    payment_id: str
    event_id: str
    payer_wallet_id: str
    payer_user_id: str
    payee_wallet_id: str
    amount_minor: int
    currency: str
    score: int
    decision: str
    rules_fired: list[str]
    top_features: list[dict[str, Any]]
    model_version: str
    decided_at: datetime


async def record_scores(conn: asyncpg.Connection, rows: Sequence[ScoreRow]) -> int:
    """Insert scores (first one per payment wins) and open a review for each new
    `review` decision, in one transaction. Returns how many scores were new."""
    assert len(rows) <= MAX_ROWS_PER_WRITE, len(rows)
    if not rows:
        return 0
    cols = _columns(rows, json_fields=("rules_fired", "top_features"))
    async with conn.transaction():
        inserted = await conn.fetch(
            """INSERT INTO fraud.scores (payment_id, event_id, payer_wallet_id, payer_user_id, payee_wallet_id,
                   amount_minor, currency, score, decision, rules_fired, top_features, model_version, decided_at)
               SELECT p, e, pw, pu, ew, a, c, s, d,
                      ARRAY(SELECT jsonb_array_elements_text(rf::jsonb)), tf::jsonb, mv, t
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
                           $8::smallint[], $9::text[], $10::text[], $11::text[], $12::text[], $13::timestamptz[])
                    AS u(p, e, pw, pu, ew, a, c, s, d, rf, tf, mv, t)
               ON CONFLICT (payment_id) DO NOTHING
               RETURNING payment_id, payer_wallet_id, decision, decided_at""",
            *cols)
        reviews = [r for r in inserted if r["decision"] == "review"]
        if reviews:
            await conn.execute(
                """INSERT INTO fraud.reviews (id, payment_id, payer_wallet_id, opened_at)
                   SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
                   ON CONFLICT (payment_id) DO NOTHING""",
                [review_id_for(r["payment_id"]) for r in reviews], [r["payment_id"] for r in reviews],
                [r["payer_wallet_id"] for r in reviews], [r["decided_at"] for r in reviews])
    return len(inserted)


async def get_score(conn: asyncpg.Connection | asyncpg.Pool, payment_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        """SELECT s.*, r.id AS review_id, r.status AS review_status, r.decided_at AS reviewed_at, r.note AS review_note
           FROM fraud.scores s LEFT JOIN fraud.reviews r USING (payment_id) WHERE s.payment_id = $1""", payment_id)
    return dict(row) if row else None


# ----------------------------------------------------------------------------- reviews

class ReviewRow(msgspec.Struct, frozen=True):
    id: uuid.UUID
    payment_id: str
    payer_wallet_id: str
    status: str
    opened_at: datetime
    decided_at: datetime | None
    decided_by: uuid.UUID | None
    note: str
    event_id: uuid.UUID | None
    published_at: datetime | None
    score: int
    decision: str
    amount_minor: int
    currency: str
    payee_wallet_id: str
    payer_user_id: str
    rules_fired: list[str]
    top_features: list[dict[str, Any]]
    model_version: str


_REVIEW_SELECT = """
    SELECT r.id, r.payment_id, r.payer_wallet_id, r.status, r.opened_at, r.decided_at, r.decided_by, r.note,
           r.event_id, r.published_at, s.score, s.decision, s.amount_minor, s.currency, s.payee_wallet_id,
           s.payer_user_id, s.rules_fired, s.top_features, s.model_version
    FROM fraud.reviews r JOIN fraud.scores s USING (payment_id)"""


async def list_reviews(conn: asyncpg.Connection | asyncpg.Pool, status: str, limit: int,
                       after: tuple[datetime, uuid.UUID] | None) -> list[ReviewRow]:
    """Reviews with `status`, oldest first (a queue), after the cursor (opened_at, id)."""
    assert 1 <= limit <= MAX_PAGE + 1, limit
    rows = await conn.fetch(
        _REVIEW_SELECT + """ WHERE r.status = $1 AND ($2::timestamptz IS NULL OR (r.opened_at, r.id) > ($2, $3))
                            ORDER BY r.opened_at, r.id LIMIT $4""",
        status, after[0] if after else None, after[1] if after else None, limit)
    return [ReviewRow(**dict(r)) for r in rows]


async def get_review(conn: asyncpg.Connection | asyncpg.Pool, review_id: uuid.UUID) -> ReviewRow | None:
    row = await conn.fetchrow(_REVIEW_SELECT + " WHERE r.id = $1", review_id)
    return ReviewRow(**dict(row)) if row else None


class ReviewConflict(Exception):
    """The review is no longer open (another analyst decided it)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


async def resolve_review(conn: asyncpg.Connection, review_id: uuid.UUID, status: str, note: str,
                         by: uuid.UUID, event_id: uuid.UUID) -> ReviewRow | None:
    """Resolve an open review (row lock, so two analysts cannot both decide it).
    None: no such review; ReviewConflict: already decided."""
    assert status in ("approved", "declined"), status
    async with conn.transaction():
        current = await conn.fetchrow("SELECT status FROM fraud.reviews WHERE id = $1 FOR UPDATE", review_id)
        if current is None:
            return None
        if current["status"] != "open":
            raise ReviewConflict(current["status"])
        await conn.execute(
            """UPDATE fraud.reviews SET status = $2, note = $3, decided_by = $4, decided_at = now(), event_id = $5
               WHERE id = $1""", review_id, status, note, by, event_id)
    review = await get_review(conn, review_id)
    assert review is not None and review.status == status
    return review


async def mark_published(conn: asyncpg.Connection | asyncpg.Pool, review_ids: Sequence[uuid.UUID]) -> None:
    await conn.execute("UPDATE fraud.reviews SET published_at = now() WHERE id = ANY($1::uuid[]) "
                       "AND published_at IS NULL AND status <> 'open'", list(review_ids))


async def unpublished_reviews(conn: asyncpg.Connection, limit: int, older_than_s: float) -> list[ReviewRow]:
    """Decided reviews whose decision has not reached Kafka after `older_than_s` (the API
    publishes right after commit; these are the ones it could not)."""
    rows = await conn.fetch(
        _REVIEW_SELECT + """ WHERE r.status <> 'open' AND r.published_at IS NULL AND r.decided_at < $1
                            ORDER BY r.decided_at LIMIT $2""",
        datetime.now(UTC) - timedelta(seconds=older_than_s), limit)
    return [ReviewRow(**dict(r)) for r in rows]


# ----------------------------------------------------------------------------- alerts

class AlertRow(msgspec.Struct, frozen=True):
    id: str
    payment_id: str
    payer_wallet_id: str
    severity: str
    score: int
    decision: str
    rules_fired: list[str]
    body: dict[str, Any]
    raised_at: datetime


async def record_alerts(conn: asyncpg.Connection | asyncpg.Pool, rows: Sequence[AlertRow]) -> None:
    assert len(rows) <= MAX_ROWS_PER_WRITE, len(rows)
    if not rows:
        return
    cols = _columns(rows, json_fields=("rules_fired", "body"))
    await conn.execute(
        """INSERT INTO fraud.alerts (id, payment_id, payer_wallet_id, severity, score, decision, rules_fired, body,
                                     raised_at)
           SELECT i, p, w, sv, s, d, ARRAY(SELECT jsonb_array_elements_text(rf::jsonb)), b::jsonb, t
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::smallint[], $6::text[], $7::text[],
                       $8::text[], $9::timestamptz[]) AS u(i, p, w, sv, s, d, rf, b, t)
           ON CONFLICT (id) DO NOTHING""",
        *cols)


# ----------------------------------------------------------------------------- stats

async def decision_stats(conn: asyncpg.Connection | asyncpg.Pool, since: datetime, bucket_s: int) -> dict[str, Any]:
    """Decisions per bucket since `since`, and the review outcomes of reviews opened since."""
    buckets = await conn.fetch(
        """SELECT date_bin(make_interval(secs => $2), decided_at, timestamptz '2000-01-01') AS bucket,
                  count(*) FILTER (WHERE decision = 'allow') AS allow,
                  count(*) FILTER (WHERE decision = 'review') AS review,
                  count(*) FILTER (WHERE decision = 'block') AS block
           FROM fraud.scores WHERE decided_at >= $1 GROUP BY 1 ORDER BY 1""", since, float(bucket_s))
    reviews = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE status = 'open') AS open,
                  count(*) FILTER (WHERE status = 'approved') AS approved,
                  count(*) FILTER (WHERE status = 'declined') AS declined
           FROM fraud.reviews WHERE opened_at >= $1""", since)
    return {"buckets": [dict(b) for b in buckets], "reviews": dict(reviews)}
