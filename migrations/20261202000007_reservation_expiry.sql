-- Reservations and their expiry are ledger rows too.
--
-- `settle_by` marks a reservation's debit row (a check with `reserve: true`, or of an endpoint
-- with `settle = "after"`): the instant its request record expires unsettled (the row's
-- recorded_at plus `store.settle_ttl_secs` in force at the check). NULL on every other row and
-- on every row before this migration; nullable without a default, so adding it rewrites
-- nothing.
--
-- 'reservation_expiry' is the row of a reservation that was neither settled nor refunded by
-- then: written by the daemon's expiry job from the ledger itself (docs/ledger.md), with an id
-- derived from the reservation row's id and recorded_at = its settle_by, so that several
-- daemons running the job, or a run repeated after a crash, insert it once
-- (ON CONFLICT (id, recorded_at) DO NOTHING). `cost` is the estimate the reservation kept,
-- `request_id` and `endpoint` the reservation's, `note` the reservation row's id.
ALTER TABLE token_transactions ADD COLUMN settle_by timestamptz;
ALTER TABLE token_transactions DROP CONSTRAINT token_transactions_kind;
ALTER TABLE token_transactions ADD CONSTRAINT token_transactions_kind
    CHECK (kind IN ('debit', 'refund', 'grant', 'settle', 'alert', 'grant_spend', 'grant_expiry',
                    'reservation_expiry'))
    NOT VALID;
-- The expiry job's scan: reservations whose settle_by passed within its lookback. Partial, so
-- it holds only reservation rows (small beside the ledger), and adding it reads the table once.
CREATE INDEX token_transactions_settle_by ON token_transactions (settle_by)
    WHERE settle_by IS NOT NULL;
