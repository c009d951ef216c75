-- Row counts by table and status, kept by triggers, so /metrics and /admin/stats read a few
-- rows instead of counting the inbox and the writes (which keep every settled row): a scrape
-- costs the same at ten million rows as at ten. `shard` spreads the counts of concurrent
-- writers on PostgreSQL; SQLite has one writer and uses shard 0.
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

CREATE TRIGGER inbox_counted_insert AFTER INSERT ON inbox BEGIN
    INSERT INTO status_counts (tbl, status, shard, n) VALUES ('inbox', NEW.status, 0, 1)
        ON CONFLICT (tbl, status, shard) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER inbox_counted_update AFTER UPDATE OF status ON inbox
    WHEN OLD.status <> NEW.status BEGIN
    UPDATE status_counts SET n = n - 1 WHERE tbl = 'inbox' AND status = OLD.status AND shard = 0;
    INSERT INTO status_counts (tbl, status, shard, n) VALUES ('inbox', NEW.status, 0, 1)
        ON CONFLICT (tbl, status, shard) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER inbox_counted_delete AFTER DELETE ON inbox BEGIN
    UPDATE status_counts SET n = n - 1 WHERE tbl = 'inbox' AND status = OLD.status AND shard = 0;
END;

CREATE TRIGGER marketo_writes_counted_insert AFTER INSERT ON marketo_writes BEGIN
    INSERT INTO status_counts (tbl, status, shard, n) VALUES ('marketo_writes', NEW.status, 0, 1)
        ON CONFLICT (tbl, status, shard) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER marketo_writes_counted_update AFTER UPDATE OF status ON marketo_writes
    WHEN OLD.status <> NEW.status BEGIN
    UPDATE status_counts SET n = n - 1 WHERE tbl = 'marketo_writes' AND status = OLD.status AND shard = 0;
    INSERT INTO status_counts (tbl, status, shard, n) VALUES ('marketo_writes', NEW.status, 0, 1)
        ON CONFLICT (tbl, status, shard) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER marketo_writes_counted_delete AFTER DELETE ON marketo_writes BEGIN
    UPDATE status_counts SET n = n - 1 WHERE tbl = 'marketo_writes' AND status = OLD.status AND shard = 0;
END;

-- The oldest pending notification and write, found at the start of an index of pending rows
-- only (settled rows leave it).
CREATE INDEX inbox_pending_received ON inbox (received_at) WHERE status = 'pending';
CREATE INDEX marketo_writes_pending_updated ON marketo_writes (updated_at) WHERE status = 'pending';
