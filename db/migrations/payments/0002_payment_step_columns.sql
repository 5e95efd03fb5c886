-- A payment's saga history as columns written by the status change itself, instead of
-- the `steps` jsonb array that every step read, appended to and wrote back whole.
--
-- Each saga status happens at most once per payment (invariant 4), so one timestamp per
-- status holds the whole history: the UPDATE that changes the status sets its column(s)
-- in the same row version it writes anyway, with no array to parse and re-serialise and
-- no extra rows. `initiated` is the row's created_at. The three steps that carry a detail
-- (the risk decision, the review, the failure) keep it in their own column; the request's
-- device, IP and country (the fraud step's context, kept on the `initiated` step before)
-- are plain columns written once at insert. db.payments.Payment.steps rebuilds the
-- history GET /api/v1/payments/{id} returns: {status, at, detail} in saga order.
ALTER TABLE payments.payments
    ADD COLUMN reserved_at     timestamptz,
    ADD COLUMN review_at       timestamptz,
    ADD COLUMN assessed_at     timestamptz,
    ADD COLUMN posted_at       timestamptz,
    ADD COLUMN completed_at    timestamptz,
    ADD COLUMN failed_at       timestamptz,
    ADD COLUMN review_detail   text CHECK (length(review_detail) <= 200),
    ADD COLUMN assessed_detail text CHECK (length(assessed_detail) <= 200),
    ADD COLUMN failed_detail   text CHECK (length(failed_detail) <= 200),
    ADD COLUMN device_id       text NOT NULL DEFAULT '' CHECK (length(device_id) <= 100),
    ADD COLUMN ip              text NOT NULL DEFAULT '' CHECK (length(ip) <= 64),
    ADD COLUMN country         text NOT NULL DEFAULT '' CHECK (length(country) <= 2);

-- Existing payments keep their history (the last occurrence of each status; there is one).
UPDATE payments.payments AS p
SET reserved_at = h.reserved_at, review_at = h.review_at, assessed_at = h.assessed_at, posted_at = h.posted_at,
    completed_at = h.completed_at, failed_at = h.failed_at, review_detail = h.review_detail,
    assessed_detail = h.assessed_detail, failed_detail = h.failed_detail,
    device_id = coalesce(p.steps -> 0 ->> 'device_id', ''), ip = coalesce(p.steps -> 0 ->> 'ip', ''),
    country = coalesce(p.steps -> 0 ->> 'country', '')
FROM (
    SELECT q.id,
           max((s ->> 'at')::timestamptz) FILTER (WHERE s ->> 'status' = 'funds_reserved') AS reserved_at,
           max((s ->> 'at')::timestamptz) FILTER (WHERE s ->> 'status' = 'under_review') AS review_at,
           max((s ->> 'at')::timestamptz) FILTER (WHERE s ->> 'status' = 'risk_assessed') AS assessed_at,
           max((s ->> 'at')::timestamptz) FILTER (WHERE s ->> 'status' = 'posted') AS posted_at,
           max((s ->> 'at')::timestamptz) FILTER (WHERE s ->> 'status' = 'completed') AS completed_at,
           max((s ->> 'at')::timestamptz) FILTER (WHERE s ->> 'status' = 'failed') AS failed_at,
           max(s ->> 'detail') FILTER (WHERE s ->> 'status' = 'under_review') AS review_detail,
           max(s ->> 'detail') FILTER (WHERE s ->> 'status' = 'risk_assessed') AS assessed_detail,
           max(s ->> 'detail') FILTER (WHERE s ->> 'status' = 'failed') AS failed_detail
    FROM payments.payments q, jsonb_array_elements(q.steps) AS s
    GROUP BY q.id
) AS h
WHERE p.id = h.id;

ALTER TABLE payments.payments DROP COLUMN steps;

-- The history agrees with the status: a payment is completed, failed or captured exactly
-- when that step was recorded.
ALTER TABLE payments.payments
    ADD CONSTRAINT payments_completed_step CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    ADD CONSTRAINT payments_failed_step CHECK ((status = 'failed') = (failed_at IS NOT NULL)),
    ADD CONSTRAINT payments_posted_step CHECK ((status IN ('posted', 'completed')) = (posted_at IS NOT NULL));
