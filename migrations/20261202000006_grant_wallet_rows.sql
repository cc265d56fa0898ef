-- Wallet grants (grants that expire or have a priority, enforcer/src/wallet.rs) add two row
-- kinds: 'grant_spend' (the part of a request's charge a grant paid: `cost` the tokens, `note`
-- the grant id, beside the request's 'debit' row, which already counts them) and
-- 'grant_expiry' (a grant that expired with tokens left: `cost` the tokens forfeited,
-- `request_id` the grant id).
ALTER TABLE token_transactions DROP CONSTRAINT token_transactions_kind;
ALTER TABLE token_transactions ADD CONSTRAINT token_transactions_kind
    CHECK (kind IN ('debit', 'refund', 'grant', 'settle', 'alert', 'grant_spend', 'grant_expiry'))
    NOT VALID;
