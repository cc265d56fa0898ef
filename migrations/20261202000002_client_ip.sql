-- The client's address, as the daemon took it from a trusted proxy (X-Forwarded-For, X-Real-IP,
-- or /v1/check's client_ip): whose request a row was, for a dispute. NULL when no trusted peer
-- named one, for refunds, and for every row before this migration. Nullable without a default,
-- so adding it rewrites nothing.
ALTER TABLE token_transactions ADD COLUMN client_ip inet;
