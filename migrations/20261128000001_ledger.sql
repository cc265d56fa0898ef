-- The audit ledger: one row per decision, partitioned by month of recorded_at (UTC).
--
-- Monthly partitions are created ahead by the daemon and `enforcer audit partitions ensure`
-- (named token_transactions_pYYYYMM); the default partition catches any month without one, so
-- no insert ever fails, and maintenance moves such rows into their month's partition.

CREATE TABLE token_transactions (
    -- The decision id (UUIDv7, returned to the gateway as decision_id): replays of the spill
    -- file insert ON CONFLICT DO NOTHING on (id, recorded_at), so no row is written twice.
    id           uuid             NOT NULL,
    recorded_at  timestamptz      NOT NULL,
    -- SHA-256 of the API key, lower-case hex; never the raw key.
    key_hash     text             NOT NULL,
    -- Its first 8 bytes as a signed 64-bit integer: what the per-key index holds (a 16-byte
    -- index key instead of 64 bytes of text makes inserts ~30 % cheaper); queries filter on
    -- both columns.
    key_prefix   bigint           NOT NULL,
    tier         text,
    endpoint     text             NOT NULL,
    method       text             NOT NULL,
    units        double precision NOT NULL,
    cost         double precision NOT NULL,
    multiplier   double precision NOT NULL,
    allowed      boolean          NOT NULL,
    remaining    double precision,
    -- redis | memory | shadow | fail-open | fail-closed | replay
    decided_by   text             NOT NULL,
    denial       text,
    request_id   text,
    node         text             NOT NULL,
    PRIMARY KEY (id, recorded_at)
) PARTITION BY RANGE (recorded_at);

-- Per-key usage over time (`enforcer audit usage`, disputes).
CREATE INDEX token_transactions_key_time ON token_transactions (key_prefix, recorded_at);
-- Time-range scans (`enforcer audit export`) use partition pruning plus this BRIN index.
CREATE INDEX token_transactions_time_brin ON token_transactions USING brin (recorded_at);

-- Append-only, insert-heavy: vacuum (visibility map, freezing) and analyze on inserts, early,
-- instead of the defaults' 20 % of a table that grows by millions of rows a day (seed pitfall 3).
-- Partitions get the same settings when they are created.
CREATE TABLE token_transactions_default PARTITION OF token_transactions DEFAULT
    WITH (autovacuum_vacuum_insert_scale_factor = 0.02,
          autovacuum_vacuum_scale_factor = 0.02,
          autovacuum_analyze_scale_factor = 0.01);

-- Kernel rejections, read from the gate's per-key counters: one row per key id, node, minute
-- and reason with the count since the previous read. `id` makes replays idempotent.
CREATE TABLE kernel_rejections (
    id       uuid        PRIMARY KEY,
    minute   timestamptz NOT NULL,
    node     text        NOT NULL,
    key_id   bigint      NOT NULL,
    reason   text        NOT NULL,
    count    bigint      NOT NULL CHECK (count > 0)
) WITH (autovacuum_vacuum_insert_scale_factor = 0.05,
        autovacuum_analyze_scale_factor = 0.02);

CREATE INDEX kernel_rejections_key_minute ON kernel_rejections (key_id, minute);
