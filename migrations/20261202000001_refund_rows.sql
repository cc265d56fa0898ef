-- Refunds are ledger rows too: `kind` says what a row records. Every row before this migration
-- is a decision ('debit'). A 'refund' row's cost is the tokens credited back and its request_id
-- the refunded request's; `enforcer audit usage` nets refunds against the debits. 'grant' is
-- reserved for operator grants.
ALTER TABLE token_transactions
    ADD COLUMN kind text NOT NULL DEFAULT 'debit'
    CONSTRAINT token_transactions_kind CHECK (kind IN ('debit', 'refund', 'grant'));
