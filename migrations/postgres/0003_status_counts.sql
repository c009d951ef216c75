-- Row counts by table and status, kept by triggers, so /metrics and /admin/stats read a few
-- rows instead of counting the inbox and the writes (which keep every settled row): a scrape
-- costs the same at ten million rows as at ten. Statement-level triggers add one upsert per
-- statement and status; `shard` (the backend's pid modulo 16) keeps concurrent writers (intake's
-- committers, the worker) off each other's counter rows, so they do not queue for one row lock
-- until commit.
CREATE TABLE status_counts (
    tbl TEXT NOT NULL,
    status TEXT NOT NULL,
    shard BIGINT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (tbl, status, shard)
);
INSERT INTO status_counts (tbl, status, shard, n)
    SELECT 'inbox', status, 0, COUNT(*) FROM inbox GROUP BY status;
INSERT INTO status_counts (tbl, status, shard, n)
    SELECT 'marketo_writes', status, 0, COUNT(*) FROM marketo_writes GROUP BY status;

-- Adds each status's net change in one statement (transition tables `old_rows`, `new_rows`;
-- either may be absent, for an INSERT or a DELETE).
CREATE FUNCTION oppsync_count_statuses() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO status_counts (tbl, status, shard, n)
            SELECT TG_TABLE_NAME, status, pg_backend_pid() % 16, COUNT(*) FROM new_rows GROUP BY status
            ON CONFLICT (tbl, status, shard) DO UPDATE SET n = status_counts.n + EXCLUDED.n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO status_counts (tbl, status, shard, n)
            SELECT TG_TABLE_NAME, status, pg_backend_pid() % 16, SUM(d) FROM (
                SELECT status, -1 AS d FROM old_rows
                UNION ALL
                SELECT status, 1 AS d FROM new_rows
            ) changes GROUP BY status HAVING SUM(d) <> 0
            ON CONFLICT (tbl, status, shard) DO UPDATE SET n = status_counts.n + EXCLUDED.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO status_counts (tbl, status, shard, n)
            SELECT TG_TABLE_NAME, status, pg_backend_pid() % 16, -COUNT(*) FROM old_rows GROUP BY status
            ON CONFLICT (tbl, status, shard) DO UPDATE SET n = status_counts.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER inbox_counted_insert AFTER INSERT ON inbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION oppsync_count_statuses();
CREATE TRIGGER inbox_counted_update AFTER UPDATE ON inbox
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION oppsync_count_statuses();
CREATE TRIGGER inbox_counted_delete AFTER DELETE ON inbox
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION oppsync_count_statuses();
CREATE TRIGGER marketo_writes_counted_insert AFTER INSERT ON marketo_writes
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION oppsync_count_statuses();
CREATE TRIGGER marketo_writes_counted_update AFTER UPDATE ON marketo_writes
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION oppsync_count_statuses();
CREATE TRIGGER marketo_writes_counted_delete AFTER DELETE ON marketo_writes
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION oppsync_count_statuses();

-- The oldest pending notification and write, found at the start of an index of pending rows
-- only (settled rows leave it).
CREATE INDEX inbox_pending_received ON inbox (received_at) WHERE status = 'pending';
CREATE INDEX marketo_writes_pending_updated ON marketo_writes (updated_at) WHERE status = 'pending';
