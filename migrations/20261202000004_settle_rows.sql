-- Settles (`POST /v1/settle`: the true cost of a reserved request, charged after the
-- response) are ledger rows of kind 'settle': `cost` is the difference charged now (negative:
-- credited back), `true_cost` the true cost charged in all, `request_id` the settled
-- request's. `true_cost` is NULL for every other row; nullable without a default, so adding
-- it rewrites nothing.
ALTER TABLE token_transactions DROP CONSTRAINT token_transactions_kind;
ALTER TABLE token_transactions
    ADD CONSTRAINT token_transactions_kind
    CHECK (kind IN ('debit', 'refund', 'grant', 'settle'));
ALTER TABLE token_transactions ADD COLUMN true_cost double precision;
