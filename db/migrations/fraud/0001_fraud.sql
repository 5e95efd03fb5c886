-- Fraud: rules (edited by admins at runtime, polled by workers through rules_version),
-- the history of every rule edit, scores (one per payment: the first decision the scorer
-- published), the review queue (analysts approve or decline; each review resolves once)
-- and alerts. docs/FRAUD.md describes who writes what.

CREATE TABLE fraud.rules (
    id          text        PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    expression  text        NOT NULL CHECK (length(expression) BETWEEN 1 AND 500),
    action      text        NOT NULL CHECK (action IN ('allow', 'review', 'block')),
    priority    integer     NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000000),
    enabled     boolean     NOT NULL DEFAULT true,
    description text        NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  uuid
);

-- One row; every change to fraud.rules bumps it in the same transaction, so a worker
-- polling it reloads exactly when something changed (and sees whole edits only).
CREATE TABLE fraud.rules_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint  NOT NULL CHECK (version >= 1)
);
INSERT INTO fraud.rules_version (version) VALUES (1);

-- Who changed which rule, from what to what: append-only.
CREATE TABLE fraud.rule_changes (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id    text        NOT NULL,
    operation  text        NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    before     jsonb,
    after      jsonb,
    changed_by uuid,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION fraud.rules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE fraud.rules_version SET version = version + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER rules_bump_version AFTER INSERT OR UPDATE OR DELETE ON fraud.rules
    FOR EACH STATEMENT EXECUTE FUNCTION fraud.rules_changed();

CREATE FUNCTION fraud.rule_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fraud.rule_changes (rule_id, operation, before, after, changed_by)
    VALUES (coalesce(NEW.id, OLD.id), TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.updated_by ELSE OLD.updated_by END);
    RETURN NULL;
END $$;
CREATE TRIGGER rules_history AFTER INSERT OR UPDATE OR DELETE ON fraud.rules
    FOR EACH ROW EXECUTE FUNCTION fraud.rule_history();

CREATE FUNCTION fraud.append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fraud.% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER rule_changes_append_only BEFORE UPDATE OR DELETE ON fraud.rule_changes
    FOR EACH ROW EXECUTE FUNCTION fraud.append_only();

-- The default rules (services/fraud.py DEFAULT_RULES; a unit test checks they agree).
INSERT INTO fraud.rules (id, expression, action, priority, description) VALUES
    ('card-testing', 'small_then_large >= 3', 'block', 10,
     'three or more small payments within the hour, then a large one'),
    ('failed-attempts-burst', 'failed_1h >= 8', 'block', 20,
     'eight or more failed attempts within the hour'),
    ('mule-fan-in', 'payee_fanin_1h >= 8 and new_payee', 'review', 10,
     'first payment to a wallet that eight or more payers paid within the hour'),
    ('takeover-burst', 'new_device and new_ip and payer_count_1h >= 3 and amount_z > 1', 'review', 20,
     'several payments within the hour from a new device and IP, above the usual amount');

-- One row per scored payment: the first model decision published for it (a redelivered
-- request can be scored again; the saga and this table both keep the first answer).
CREATE TABLE fraud.scores (
    payment_id      text        PRIMARY KEY CHECK (length(payment_id) BETWEEN 1 AND 100),
    event_id        text        NOT NULL,
    payer_wallet_id text        NOT NULL,
    payer_user_id   text        NOT NULL DEFAULT '',
    payee_wallet_id text        NOT NULL DEFAULT '',
    amount_minor    bigint      NOT NULL DEFAULT 0 CHECK (amount_minor >= 0),
    currency        text        NOT NULL DEFAULT '',
    score           smallint    NOT NULL CHECK (score BETWEEN 0 AND 100),
    decision        text        NOT NULL CHECK (decision IN ('allow', 'review', 'block')),
    rules_fired     text[]      NOT NULL DEFAULT '{}',
    top_features    jsonb       NOT NULL DEFAULT '[]',
    model_version   text        NOT NULL DEFAULT '',
    decided_at      timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX scores_decided_at ON fraud.scores (decided_at);
CREATE INDEX scores_payer ON fraud.scores (payer_wallet_id, decided_at);

-- The review queue: one review per payment the scorer sent to review. An analyst's
-- decision resolves it once (trigger); `published_at` records that the review's
-- RiskDecided reached Kafka (the API publishes after commit; a relay on the worker
-- leader retries what is still unpublished).
CREATE TABLE fraud.reviews (
    id              uuid        PRIMARY KEY,
    payment_id      text        NOT NULL UNIQUE REFERENCES fraud.scores (payment_id),
    payer_wallet_id text        NOT NULL,
    status          text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'approved', 'declined')),
    opened_at       timestamptz NOT NULL,
    decided_at      timestamptz,
    decided_by      uuid,
    note            text        NOT NULL DEFAULT '' CHECK (length(note) <= 2000),
    event_id        uuid,
    published_at    timestamptz,
    CONSTRAINT reviews_decided_iff_resolved
        CHECK (((status = 'open') = (decided_at IS NULL)) AND ((status = 'open') = (event_id IS NULL))),
    CONSTRAINT reviews_published_after_decided CHECK (published_at IS NULL OR decided_at IS NOT NULL)
);
CREATE INDEX reviews_open ON fraud.reviews (opened_at, id) WHERE status = 'open';
CREATE INDEX reviews_unpublished ON fraud.reviews (decided_at) WHERE status <> 'open' AND published_at IS NULL;

-- A review resolves once: open -> approved|declined; afterwards only published_at may be
-- filled in (once). Never deleted.
CREATE FUNCTION fraud.review_resolves_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'fraud.reviews rows are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status <> 'open' THEN
        IF (to_jsonb(OLD) - 'published_at') IS DISTINCT FROM (to_jsonb(NEW) - 'published_at')
           OR (OLD.published_at IS NOT NULL AND OLD.published_at IS DISTINCT FROM NEW.published_at) THEN
            RAISE EXCEPTION 'review % is already %', OLD.id, OLD.status USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reviews_resolve_once BEFORE UPDATE OR DELETE ON fraud.reviews
    FOR EACH ROW EXECUTE FUNCTION fraud.review_resolves_once();

-- Alerts as they were raised (one per review or block), for analysts' history.
CREATE TABLE fraud.alerts (
    id              text        PRIMARY KEY,
    payment_id      text        NOT NULL,
    payer_wallet_id text        NOT NULL,
    severity        text        NOT NULL CHECK (severity IN ('medium', 'high')),
    score           smallint    NOT NULL CHECK (score BETWEEN 0 AND 100),
    decision        text        NOT NULL CHECK (decision IN ('review', 'block')),
    rules_fired     text[]      NOT NULL DEFAULT '{}',
    body            jsonb       NOT NULL,
    raised_at       timestamptz NOT NULL
);
CREATE INDEX alerts_raised_at ON fraud.alerts (raised_at);
