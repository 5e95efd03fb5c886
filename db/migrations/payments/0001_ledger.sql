-- Payments: a double-entry journal of record, the balance projection, two-phase holds,
-- payments, refunds, deposits, payouts, escrow, idempotency keys, gateway webhook events
-- and a transactional outbox. docs/PAYMENTS.md explains each invariant and where it is
-- enforced; the constraints and triggers here are the last line of defence behind the
-- checks in services/payments*.py.
--
-- Sign convention: a leg's amount_minor > 0 credits the account (the platform owes its
-- holder more), < 0 debits it. A wallet's posted balance is the sum of its legs.

-- ISO 4217 currencies we settle, with the minor-unit exponent (services/money.py has the
-- same table; a test checks they agree).
CREATE TABLE payments.currencies (
    code     char(3)  PRIMARY KEY CHECK (code ~ '^[A-Z]{3}$'),
    exponent smallint NOT NULL CHECK (exponent BETWEEN 0 AND 4)
);
INSERT INTO payments.currencies (code, exponent) VALUES
    ('AED', 2), ('AUD', 2), ('BHD', 3), ('BRL', 2), ('CAD', 2), ('CHF', 2), ('CLP', 0), ('CNY', 2),
    ('CZK', 2), ('DKK', 2), ('EUR', 2), ('GBP', 2), ('HKD', 2), ('IDR', 2), ('ILS', 2), ('INR', 2),
    ('ISK', 0), ('JOD', 3), ('JPY', 0), ('KRW', 0), ('KWD', 3), ('LKR', 2), ('MXN', 2), ('MYR', 2),
    ('NOK', 2), ('NZD', 2), ('OMR', 3), ('PHP', 2), ('PKR', 2), ('PLN', 2), ('SAR', 2), ('SEK', 2),
    ('SGD', 2), ('THB', 2), ('TND', 3), ('TRY', 2), ('UGX', 0), ('USD', 2), ('VND', 0), ('ZAR', 2);

-- Accounts: one wallet per user and currency, and one system account per kind and currency.
-- Only gateway clearing may go negative: it mirrors money held for us at the gateway, an
-- asset, which is negative under the credit-normal sign convention.
CREATE TABLE payments.accounts (
    id              uuid        PRIMARY KEY,
    kind            text        NOT NULL
        CHECK (kind IN ('wallet', 'gateway_clearing', 'fees', 'escrow', 'platform_revenue')),
    owner_id        uuid,
    currency        char(3)     NOT NULL REFERENCES payments.currencies (code),
    allow_overdraft boolean     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_wallets_have_owners CHECK ((kind = 'wallet') = (owner_id IS NOT NULL)),
    CONSTRAINT accounts_overdraft_by_kind CHECK (allow_overdraft = (kind = 'gateway_clearing')),
    -- Targets for composite foreign keys: a leg's or balance's currency and overdraft flag
    -- must be the account's.
    UNIQUE (id, currency),
    UNIQUE (id, allow_overdraft)
);
CREATE UNIQUE INDEX accounts_one_wallet_per_owner_currency
    ON payments.accounts (owner_id, currency) WHERE kind = 'wallet';
CREATE UNIQUE INDEX accounts_one_system_account_per_kind_currency
    ON payments.accounts (kind, currency) WHERE kind <> 'wallet';

-- The balance projection: derived from the journal (posted) and pending holds (reserved);
-- rebuild_balances() recomputes it, reconcile() compares it.
CREATE TABLE payments.balances (
    account_id      uuid        PRIMARY KEY,
    currency        char(3)     NOT NULL,
    allow_overdraft boolean     NOT NULL,
    posted_minor    bigint      NOT NULL DEFAULT 0,
    reserved_minor  bigint      NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    -- The account_seq of the account's latest leg: the statement cursor and a gap detector.
    last_seq        bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (account_id, currency) REFERENCES payments.accounts (id, currency),
    FOREIGN KEY (account_id, allow_overdraft) REFERENCES payments.accounts (id, allow_overdraft),
    CONSTRAINT balances_available_not_negative
        CHECK (allow_overdraft OR posted_minor - reserved_minor >= 0)
);

-- System accounts for every currency, with ids any process can compute without a query:
-- md5('fintide.payments.system:<kind>:<currency>') as a uuid (services/payments.py).
INSERT INTO payments.accounts (id, kind, owner_id, currency, allow_overdraft)
SELECT md5('fintide.payments.system:' || k.kind || ':' || c.code)::uuid, k.kind, NULL, c.code,
       k.kind = 'gateway_clearing'
FROM payments.currencies c
CROSS JOIN (VALUES ('gateway_clearing'), ('fees'), ('escrow'), ('platform_revenue')) AS k (kind);
INSERT INTO payments.balances (account_id, currency, allow_overdraft)
SELECT id, currency, allow_overdraft FROM payments.accounts;

-- The journal: append-only transactions, each with legs that net to zero per currency.
CREATE TABLE payments.transactions (
    id           uuid        PRIMARY KEY,
    kind         text        NOT NULL CHECK (kind IN (
        'deposit', 'transfer', 'payment', 'refund', 'payout', 'payout_reversal',
        'escrow_hold', 'escrow_release', 'escrow_refund', 'correction')),
    -- What this transaction posts (payment, refund, deposit, payout or escrow id).
    reference_id uuid,
    -- A correction names the transaction it reverses; each is reversed at most once.
    corrects_id  uuid REFERENCES payments.transactions (id),
    description  text        NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT transactions_corrections_link
        CHECK ((kind IN ('correction', 'payout_reversal')) = (corrects_id IS NOT NULL)),
    CHECK (corrects_id IS DISTINCT FROM id)
);
CREATE UNIQUE INDEX transactions_corrected_once ON payments.transactions (corrects_id)
    WHERE corrects_id IS NOT NULL;
CREATE INDEX transactions_by_reference ON payments.transactions (reference_id)
    WHERE reference_id IS NOT NULL;

CREATE TABLE payments.legs (
    id                  bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id      uuid    NOT NULL REFERENCES payments.transactions (id),
    account_id          uuid    NOT NULL,
    currency            char(3) NOT NULL,
    -- > 0 credit, < 0 debit; bounded like every single amount (services/money.py).
    amount_minor        bigint  NOT NULL
        CHECK (amount_minor <> 0 AND amount_minor BETWEEN -1000000000000000 AND 1000000000000000),
    -- 1, 2, 3, ... per account in commit order (writers hold the balance row lock).
    account_seq         bigint  NOT NULL CHECK (account_seq > 0),
    -- The account's posted balance right after this leg: the statement's running balance.
    balance_after_minor bigint  NOT NULL,
    FOREIGN KEY (account_id, currency) REFERENCES payments.accounts (id, currency),
    UNIQUE (account_id, account_seq)
);
CREATE INDEX legs_by_transaction ON payments.legs (transaction_id);

-- Every statement that inserts legs must leave each of its transactions balanced per
-- currency, and may not add legs to a transaction written by an earlier statement.
CREATE FUNCTION payments.check_new_legs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.transaction_id, n.currency, sum(n.amount_minor) AS net INTO bad
    FROM new_legs n GROUP BY n.transaction_id, n.currency HAVING sum(n.amount_minor) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal transaction % does not net to zero in % (net %)',
            bad.transaction_id, bad.currency, bad.net USING ERRCODE = 'check_violation';
    END IF;
    SELECT l.transaction_id INTO bad
    FROM payments.legs l
    WHERE l.transaction_id IN (SELECT DISTINCT transaction_id FROM new_legs)
      AND l.id NOT IN (SELECT id FROM new_legs)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal transaction % already has legs; post a new transaction',
            bad.transaction_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER legs_balanced AFTER INSERT ON payments.legs
    REFERENCING NEW TABLE AS new_legs FOR EACH STATEMENT EXECUTE FUNCTION payments.check_new_legs();

-- Append-only: the journal is never updated, deleted or truncated.
CREATE FUNCTION payments.reject_journal_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payments.% is append-only: % rejected; post a correcting transaction instead',
        TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER transactions_append_only BEFORE UPDATE OR DELETE ON payments.transactions
    FOR EACH ROW EXECUTE FUNCTION payments.reject_journal_change();
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON payments.transactions
    FOR EACH STATEMENT EXECUTE FUNCTION payments.reject_journal_change();
CREATE TRIGGER legs_append_only BEFORE UPDATE OR DELETE ON payments.legs
    FOR EACH ROW EXECUTE FUNCTION payments.reject_journal_change();
CREATE TRIGGER legs_no_truncate BEFORE TRUNCATE ON payments.legs
    FOR EACH STATEMENT EXECUTE FUNCTION payments.reject_journal_change();

-- Rows that resolve exactly once: they leave their open status once and never change
-- again. TG_ARGV[0]: the open status; TG_ARGV[1]: comma-separated columns a resolution
-- may set; TG_ARGV[2] (optional): columns an open row may fill in once (from NULL), such as
-- a gateway reference learnt after the row was written.
CREATE FUNCTION payments.resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    on_resolve text[] := string_to_array(TG_ARGV[1], ',');
    while_open text[] := string_to_array(coalesce(TG_ARGV[2], ''), ',');
    col text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'payments.% rows are never deleted', TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status <> TG_ARGV[0] THEN
        RAISE EXCEPTION 'payments.% % is already %', TG_TABLE_NAME, OLD.id, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.status = TG_ARGV[0] THEN
        IF (to_jsonb(OLD) - while_open) IS DISTINCT FROM (to_jsonb(NEW) - while_open) THEN
            RAISE EXCEPTION 'payments.% %: an open row may only fill in %', TG_TABLE_NAME, OLD.id,
                coalesce(TG_ARGV[2], 'nothing') USING ERRCODE = 'check_violation';
        END IF;
        FOREACH col IN ARRAY while_open LOOP
            IF to_jsonb(OLD) -> col <> 'null'::jsonb AND to_jsonb(OLD) -> col IS DISTINCT FROM to_jsonb(NEW) -> col THEN
                RAISE EXCEPTION 'payments.% %: % is already set', TG_TABLE_NAME, OLD.id, col
                    USING ERRCODE = 'check_violation';
            END IF;
        END LOOP;
        RETURN NEW;
    END IF;
    IF (to_jsonb(OLD) - on_resolve) IS DISTINCT FROM (to_jsonb(NEW) - on_resolve) THEN
        RAISE EXCEPTION 'payments.% %: only % may change', TG_TABLE_NAME, OLD.id, TG_ARGV[1]
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

-- Two-phase holds: reserve -> posted (full or partial) | voided | expired, exactly once.
CREATE TABLE payments.holds (
    id                     uuid        PRIMARY KEY,
    account_id             uuid        NOT NULL,
    currency               char(3)     NOT NULL,
    amount_minor           bigint      NOT NULL CHECK (amount_minor BETWEEN 1 AND 1000000000000000),
    status                 text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    posted_minor           bigint,
    destination_account_id uuid,
    transaction_id         uuid        REFERENCES payments.transactions (id),
    reference_id           uuid,
    expires_at             timestamptz NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    resolved_at            timestamptz,
    FOREIGN KEY (account_id, currency) REFERENCES payments.accounts (id, currency),
    FOREIGN KEY (destination_account_id, currency) REFERENCES payments.accounts (id, currency),
    CONSTRAINT holds_posted_within_reserved
        CHECK (posted_minor IS NULL OR posted_minor BETWEEN 1 AND amount_minor),
    CHECK ((status = 'pending') = (resolved_at IS NULL)),
    CHECK ((status = 'posted') = (posted_minor IS NOT NULL)),
    CHECK ((status = 'posted') = (transaction_id IS NOT NULL)),
    CHECK ((status = 'posted') = (destination_account_id IS NOT NULL)),
    CHECK (expires_at > created_at)
);
CREATE INDEX holds_pending_by_expiry ON payments.holds (expires_at) WHERE status = 'pending';
CREATE INDEX holds_pending_by_account ON payments.holds (account_id) WHERE status = 'pending';
CREATE TRIGGER holds_resolve_once BEFORE UPDATE OR DELETE ON payments.holds
    FOR EACH ROW EXECUTE FUNCTION payments.resolve_once(
        'pending', 'status,posted_minor,destination_account_id,transaction_id,resolved_at');

-- Payments between wallets (the saga's unit). Steps is the history of saga steps.
CREATE TABLE payments.payments (
    id              uuid        PRIMARY KEY,
    payer_id        uuid        NOT NULL,
    from_account_id uuid        NOT NULL,
    to_account_id   uuid        NOT NULL,
    currency        char(3)     NOT NULL,
    amount_minor    bigint      NOT NULL CHECK (amount_minor BETWEEN 1 AND 1000000000000000),
    description     text        NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    status          text        NOT NULL CHECK (status IN (
        'initiated', 'funds_reserved', 'risk_assessed', 'under_review', 'posted', 'completed', 'failed')),
    hold_id         uuid        REFERENCES payments.holds (id),
    transaction_id  uuid        REFERENCES payments.transactions (id),
    captured_minor  bigint      NOT NULL DEFAULT 0,
    refunded_minor  bigint      NOT NULL DEFAULT 0,
    failure_reason  text        CHECK (length(failure_reason) <= 200),
    steps           jsonb       NOT NULL DEFAULT '[]'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (from_account_id, currency) REFERENCES payments.accounts (id, currency),
    FOREIGN KEY (to_account_id, currency) REFERENCES payments.accounts (id, currency),
    CONSTRAINT payments_not_to_self CHECK (from_account_id <> to_account_id),
    CONSTRAINT payments_captured_within_amount CHECK (captured_minor BETWEEN 0 AND amount_minor),
    CONSTRAINT payments_refunds_within_captured CHECK (refunded_minor BETWEEN 0 AND captured_minor),
    CHECK ((status = 'failed') = (failure_reason IS NOT NULL)),
    CHECK ((status IN ('posted', 'completed')) = (captured_minor > 0)),
    CHECK ((status IN ('posted', 'completed')) = (transaction_id IS NOT NULL))
);
CREATE INDEX payments_by_payer ON payments.payments (payer_id, created_at DESC);
CREATE INDEX payments_by_from_account ON payments.payments (from_account_id);

-- Refunds: append-only, each linked to its payment. Inserting one adds to the payment's
-- refunded_minor, so payments_refunds_within_captured caps the sum at the captured amount
-- whatever code path inserts it.
CREATE TABLE payments.refunds (
    id             uuid        PRIMARY KEY,
    payment_id     uuid        NOT NULL REFERENCES payments.payments (id),
    currency       char(3)     NOT NULL,
    amount_minor   bigint      NOT NULL CHECK (amount_minor BETWEEN 1 AND 1000000000000000),
    transaction_id uuid        NOT NULL UNIQUE REFERENCES payments.transactions (id),
    requested_by   uuid        NOT NULL,
    reason         text        NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_by_payment ON payments.refunds (payment_id);
CREATE FUNCTION payments.accumulate_refund() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE payments.payments SET refunded_minor = refunded_minor + NEW.amount_minor, updated_at = now()
    WHERE id = NEW.payment_id AND currency = NEW.currency;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'refund % names no payment % in %', NEW.id, NEW.payment_id, NEW.currency
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER refunds_accumulate AFTER INSERT ON payments.refunds
    FOR EACH ROW EXECUTE FUNCTION payments.accumulate_refund();
CREATE TRIGGER refunds_append_only BEFORE UPDATE OR DELETE ON payments.refunds
    FOR EACH ROW EXECUTE FUNCTION payments.reject_journal_change();

-- Deposits through a gateway: pending until the gateway confirms, then posted once.
CREATE TABLE payments.deposits (
    id             uuid        PRIMARY KEY,
    account_id     uuid        NOT NULL,
    owner_id       uuid        NOT NULL,
    currency       char(3)     NOT NULL,
    amount_minor   bigint      NOT NULL CHECK (amount_minor BETWEEN 1 AND 1000000000000000),
    status         text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    gateway        text        NOT NULL,
    gateway_ref    text        CHECK (length(gateway_ref) <= 200),
    transaction_id uuid        UNIQUE REFERENCES payments.transactions (id),
    failure_reason text        CHECK (length(failure_reason) <= 200),
    created_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at    timestamptz,
    FOREIGN KEY (account_id, currency) REFERENCES payments.accounts (id, currency),
    CHECK ((status = 'succeeded') = (transaction_id IS NOT NULL)),
    CHECK ((status = 'failed') = (failure_reason IS NOT NULL)),
    CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE UNIQUE INDEX deposits_by_gateway_ref ON payments.deposits (gateway, gateway_ref)
    WHERE gateway_ref IS NOT NULL;
CREATE TRIGGER deposits_resolve_once BEFORE UPDATE OR DELETE ON payments.deposits
    FOR EACH ROW EXECUTE FUNCTION payments.resolve_once(
        'pending', 'status,gateway_ref,transaction_id,failure_reason,resolved_at', 'gateway_ref');

-- Payouts to an external bank account: the wallet is debited when the payout is created
-- (money moves to gateway clearing); a failed payout is reversed by a linked correction.
CREATE TABLE payments.payouts (
    id                      uuid        PRIMARY KEY,
    account_id              uuid        NOT NULL,
    owner_id                uuid        NOT NULL,
    currency                char(3)     NOT NULL,
    amount_minor            bigint      NOT NULL CHECK (amount_minor BETWEEN 1 AND 1000000000000000),
    fee_minor               bigint      NOT NULL DEFAULT 0 CHECK (fee_minor BETWEEN 0 AND 1000000000000000),
    destination             text        NOT NULL CHECK (length(destination) BETWEEN 1 AND 100),
    status                  text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'paid', 'failed')),
    gateway                 text        NOT NULL,
    gateway_ref             text        CHECK (length(gateway_ref) <= 200),
    transaction_id          uuid        NOT NULL UNIQUE REFERENCES payments.transactions (id),
    reversal_transaction_id uuid        UNIQUE REFERENCES payments.transactions (id),
    failure_reason          text        CHECK (length(failure_reason) <= 200),
    created_at              timestamptz NOT NULL DEFAULT now(),
    resolved_at             timestamptz,
    FOREIGN KEY (account_id, currency) REFERENCES payments.accounts (id, currency),
    CHECK ((status = 'failed') = (reversal_transaction_id IS NOT NULL)),
    CHECK ((status = 'failed') = (failure_reason IS NOT NULL)),
    CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE TRIGGER payouts_resolve_once BEFORE UPDATE OR DELETE ON payments.payouts
    FOR EACH ROW EXECUTE FUNCTION payments.resolve_once(
        'pending', 'status,gateway_ref,reversal_transaction_id,failure_reason,resolved_at', 'gateway_ref');

-- Escrow (marketplace deals): the payer's money sits in the escrow system account until
-- it is released to the payee (less the platform's commission) or refunded, exactly once.
CREATE TABLE payments.escrows (
    id                        uuid        PRIMARY KEY,
    payer_id                  uuid        NOT NULL,
    payee_id                  uuid        NOT NULL,
    from_account_id           uuid        NOT NULL,
    to_account_id             uuid        NOT NULL,
    currency                  char(3)     NOT NULL,
    amount_minor              bigint      NOT NULL CHECK (amount_minor BETWEEN 1 AND 1000000000000000),
    commission_minor          bigint      NOT NULL DEFAULT 0,
    release_condition         text        NOT NULL CHECK (length(release_condition) BETWEEN 1 AND 500),
    status                    text        NOT NULL DEFAULT 'held' CHECK (status IN ('held', 'released', 'refunded')),
    hold_transaction_id       uuid        NOT NULL UNIQUE REFERENCES payments.transactions (id),
    resolution_transaction_id uuid        UNIQUE REFERENCES payments.transactions (id),
    resolved_by               uuid,
    created_at                timestamptz NOT NULL DEFAULT now(),
    resolved_at               timestamptz,
    FOREIGN KEY (from_account_id, currency) REFERENCES payments.accounts (id, currency),
    FOREIGN KEY (to_account_id, currency) REFERENCES payments.accounts (id, currency),
    CONSTRAINT escrows_not_to_self CHECK (from_account_id <> to_account_id),
    CONSTRAINT escrows_commission_within_amount CHECK (commission_minor BETWEEN 0 AND amount_minor - 1),
    CHECK ((status = 'held') = (resolution_transaction_id IS NULL)),
    CHECK ((status = 'held') = (resolved_at IS NULL))
);
CREATE INDEX escrows_by_payer ON payments.escrows (payer_id);
CREATE INDEX escrows_by_payee ON payments.escrows (payee_id);
CREATE TRIGGER escrows_resolve_once BEFORE UPDATE OR DELETE ON payments.escrows
    FOR EACH ROW EXECUTE FUNCTION payments.resolve_once(
        'held', 'status,resolution_transaction_id,resolved_by,resolved_at');

-- Transactional outbox: written in the same transaction as each journal change; a relay
-- publishes unpublished rows to Kafka in id order and stamps published_at.
CREATE TABLE payments.outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text        NOT NULL CHECK (length(topic) BETWEEN 1 AND 200),
    key          text        NOT NULL CHECK (length(key) <= 200),
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON payments.outbox (id) WHERE published_at IS NULL;

-- Idempotency-Key records for money-moving requests (api/idempotency.py).
CREATE TABLE payments.idempotency_keys (
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
CREATE INDEX idempotency_keys_by_expiry ON payments.idempotency_keys (expires_at);

-- Gateway webhook events seen, for replay rejection (one effect per event id).
CREATE TABLE payments.gateway_events (
    gateway     text        NOT NULL,
    event_id    text        NOT NULL CHECK (length(event_id) BETWEEN 1 AND 200),
    type        text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    payload     jsonb       NOT NULL,
    PRIMARY KEY (gateway, event_id)
);
