-- The saga's hot tables check their references once per statement instead of once per row,
-- and the outbox keeps its payload as the text the relay sends.
--
-- Why: a saga batch writes ~1,000 payments, holds, journal transactions and 2,000 legs per
-- statement, and every foreign key on those rows ran its own trigger query per row
-- (SELECT 1 FROM accounts ... FOR KEY SHARE): ~11 per payment, ~30 % of PostgreSQL's CPU
-- in the saga's steps (docs/benchmarks/payments.md, "Fourth session"). The same checks now
-- run as one set-based query per statement over the statement's transition table; the
-- rows they name can never disappear (accounts, transactions and holds reject DELETE,
-- TRUNCATE and key changes), so checking existence when the row is written is what the
-- foreign key guaranteed. Violations raise foreign_key_violation (SQLSTATE 23503), as before.

-- Referenced rows never go away or change their key. Transactions (append-only) and holds
-- (resolve_once rejects DELETE and any change of id) already guarantee it but for TRUNCATE
-- of holds, which their foreign keys from payments used to block.
CREATE FUNCTION payments.reject_reference_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payments.% rows are referenced by the ledger: % rejected', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER accounts_kept BEFORE DELETE OR UPDATE OF id, currency ON payments.accounts
    FOR EACH ROW EXECUTE FUNCTION payments.reject_reference_change();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON payments.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION payments.reject_reference_change();
CREATE TRIGGER holds_no_truncate BEFORE TRUNCATE ON payments.holds
    FOR EACH STATEMENT EXECUTE FUNCTION payments.reject_reference_change();

-- Legs: the statement trigger that already checked balance per transaction also checks the
-- references (transaction; account in the leg's currency), and finds legs of an earlier
-- statement by counting through legs_by_transaction (an index probe per transaction)
-- instead of a join the planner could turn into a scan of the whole journal.
ALTER TABLE payments.legs DROP CONSTRAINT legs_transaction_id_fkey,
                          DROP CONSTRAINT legs_account_id_currency_fkey;
CREATE OR REPLACE FUNCTION payments.check_new_legs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.transaction_id, n.account_id, n.currency INTO bad FROM new_legs n
    WHERE NOT EXISTS (SELECT 1 FROM payments.transactions t WHERE t.id = n.transaction_id)
       OR NOT EXISTS (SELECT 1 FROM payments.accounts a WHERE a.id = n.account_id AND a.currency = n.currency)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal leg of transaction % names no transaction or no account % in %',
            bad.transaction_id, bad.account_id, bad.currency USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT n.transaction_id, n.currency, sum(n.amount_minor) AS net INTO bad
    FROM new_legs n GROUP BY n.transaction_id, n.currency HAVING sum(n.amount_minor) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal transaction % does not net to zero in % (net %)',
            bad.transaction_id, bad.currency, bad.net USING ERRCODE = 'check_violation';
    END IF;
    SELECT n.transaction_id INTO bad
    FROM (SELECT transaction_id, count(*) AS legs FROM new_legs GROUP BY transaction_id) n
    WHERE (SELECT count(*) FROM payments.legs l WHERE l.transaction_id = n.transaction_id) <> n.legs
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal transaction % already has legs; post a new transaction',
            bad.transaction_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- Holds: account and destination in the hold's currency, the posting transaction.
ALTER TABLE payments.holds DROP CONSTRAINT holds_transaction_id_fkey,
                           DROP CONSTRAINT holds_account_id_currency_fkey,
                           DROP CONSTRAINT holds_destination_account_id_currency_fkey;
CREATE FUNCTION payments.check_hold_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT h.id INTO bad FROM written_holds h
    WHERE NOT EXISTS (SELECT 1 FROM payments.accounts a WHERE a.id = h.account_id AND a.currency = h.currency)
       OR (h.destination_account_id IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM payments.accounts a WHERE a.id = h.destination_account_id AND a.currency = h.currency))
       OR (h.transaction_id IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM payments.transactions t WHERE t.id = h.transaction_id))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'hold % names an account, destination or transaction that does not exist', bad.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER holds_references_on_insert AFTER INSERT ON payments.holds REFERENCING NEW TABLE AS written_holds
    FOR EACH STATEMENT EXECUTE FUNCTION payments.check_hold_references();
CREATE TRIGGER holds_references_on_update AFTER UPDATE ON payments.holds REFERENCING NEW TABLE AS written_holds
    FOR EACH STATEMENT EXECUTE FUNCTION payments.check_hold_references();

-- Holds resolve once, as payments.resolve_once('pending', ...) checked, but comparing the
-- row's columns directly rather than rendering OLD and NEW to jsonb four times per row.
-- The immutable columns are listed: a column added to holds must be added here.
CREATE FUNCTION payments.hold_resolves_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'payments.holds rows are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'payments.holds % is already %', OLD.id, OLD.status USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.status = 'pending' THEN
        IF NEW IS DISTINCT FROM OLD THEN
            RAISE EXCEPTION 'payments.holds %: an open row may only fill in nothing', OLD.id
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.id, NEW.account_id, NEW.currency, NEW.amount_minor, NEW.reference_id, NEW.expires_at, NEW.created_at)
            IS DISTINCT FROM
       (OLD.id, OLD.account_id, OLD.currency, OLD.amount_minor, OLD.reference_id, OLD.expires_at, OLD.created_at) THEN
        RAISE EXCEPTION 'payments.holds %: only status,posted_minor,destination_account_id,transaction_id,resolved_at may change',
            OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER holds_resolve_once ON payments.holds;
CREATE TRIGGER holds_resolve_once BEFORE UPDATE OR DELETE ON payments.holds
    FOR EACH ROW EXECUTE FUNCTION payments.hold_resolves_once();

-- Payments: payer and payee wallets in the payment's currency, its hold, its capture.
ALTER TABLE payments.payments DROP CONSTRAINT payments_hold_id_fkey,
                              DROP CONSTRAINT payments_transaction_id_fkey,
                              DROP CONSTRAINT payments_from_account_id_currency_fkey,
                              DROP CONSTRAINT payments_to_account_id_currency_fkey;
CREATE FUNCTION payments.check_payment_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT p.id INTO bad FROM written_payments p
    WHERE NOT EXISTS (SELECT 1 FROM payments.accounts a WHERE a.id = p.from_account_id AND a.currency = p.currency)
       OR NOT EXISTS (SELECT 1 FROM payments.accounts a WHERE a.id = p.to_account_id AND a.currency = p.currency)
       OR (p.hold_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM payments.holds h WHERE h.id = p.hold_id))
       OR (p.transaction_id IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM payments.transactions t WHERE t.id = p.transaction_id))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'payment % names a wallet, hold or transaction that does not exist', bad.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER payments_references_on_insert AFTER INSERT ON payments.payments
    REFERENCING NEW TABLE AS written_payments FOR EACH STATEMENT EXECUTE FUNCTION payments.check_payment_references();
CREATE TRIGGER payments_references_on_update AFTER UPDATE ON payments.payments
    REFERENCING NEW TABLE AS written_payments FOR EACH STATEMENT EXECUTE FUNCTION payments.check_payment_references();

-- The outbox payload is stored as the JSON text the writer encoded and the relay sends:
-- jsonb parsed every envelope (~1 MB per 1,000 payments) on insert and printed it again for
-- the relay's payload::text. Existing rows keep exactly the text the relay read from them.
ALTER TABLE payments.outbox ALTER COLUMN payload TYPE text USING payload::text;
