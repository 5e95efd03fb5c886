-- 1. Idempotency-Key for analysts' review decisions (api/idempotency.py; same columns as
--    payments.idempotency_keys).
-- 2. rules_version moves only when a rule row really changed: 0001's statement trigger
--    also fired for statements that changed nothing (an INSERT .. ON CONFLICT DO NOTHING,
--    an UPDATE of a missing id), making workers reload for nothing. The row trigger that
--    records the history now bumps the version too.
CREATE TABLE fraud.idempotency_keys (
    owner_id              uuid        NOT NULL,
    route                 text        NOT NULL CHECK (length(route) <= 200),
    key                   text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_hash          bytea       NOT NULL,
    effect_id             uuid        NOT NULL,
    status                text        NOT NULL CHECK (status IN ('in_flight', 'done')),
    lock_token            uuid,
    locked_until          timestamptz,
    response_status       smallint,
    response_body         bytea,
    response_content_type text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    expires_at            timestamptz NOT NULL,
    PRIMARY KEY (owner_id, route, key),
    CONSTRAINT idempotency_keys_kept_a_day CHECK (expires_at >= created_at + interval '24 hours'),
    CHECK ((status = 'done') = (response_status IS NOT NULL)),
    CHECK ((status = 'in_flight') = (lock_token IS NOT NULL))
);
CREATE INDEX idempotency_keys_by_expiry ON fraud.idempotency_keys (expires_at);

DROP TRIGGER rules_bump_version ON fraud.rules;
DROP FUNCTION fraud.rules_changed();

CREATE OR REPLACE FUNCTION fraud.rule_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fraud.rule_changes (rule_id, operation, before, after, changed_by)
    VALUES (coalesce(NEW.id, OLD.id), TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.updated_by ELSE OLD.updated_by END);
    UPDATE fraud.rules_version SET version = version + 1;
    RETURN NULL;
END $$;
