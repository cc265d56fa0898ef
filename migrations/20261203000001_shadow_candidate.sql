-- The shadow candidate policy (`[shadow]`, docs/configuration.md): a second tier table and cost
-- matrix evaluated beside the enforced one on the same requests, against buckets of its own.
-- A decision row records the candidate's would-be decision next to the real one:
-- `candidate_allowed` whether the candidate would have allowed the request, `candidate_cost`
-- its price of it. Both are NULL on every row without a candidate decision (no [shadow], a
-- replay, an unknown key, an operational endpoint, a decision without the store, every row
-- that is not a decision) and on every row before this migration; nullable without a default,
-- so adding them rewrites nothing. `enforcer audit shadow-report` reads the rows where
-- `candidate_allowed IS NOT NULL` by time (the BRIN index on recorded_at): no index of their
-- own, which every decision would pay for while a candidate runs.
ALTER TABLE token_transactions ADD COLUMN candidate_allowed boolean;
ALTER TABLE token_transactions ADD COLUMN candidate_cost double precision;
