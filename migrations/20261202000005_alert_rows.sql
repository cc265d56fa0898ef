-- Low-balance alerts are ledger rows too (`kind = 'alert'`: `cost` the threshold in tokens,
-- `remaining` the balance that crossed it, `note` the threshold). 'settle' is allowed here as
-- well, for reserve-then-settle rows.
ALTER TABLE token_transactions DROP CONSTRAINT token_transactions_kind;
ALTER TABLE token_transactions ADD CONSTRAINT token_transactions_kind
    CHECK (kind IN ('debit', 'refund', 'grant', 'settle', 'alert')) NOT VALID;
