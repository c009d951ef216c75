-- Inbox bodies become bytes with a codec (intake stores them LZ4-compressed, see
-- src/store/body.rs). SQLite cannot change a column's type in place, so the table is rebuilt;
-- rows already stored keep their JSON text under codec 'json'.
CREATE TABLE inbox_new (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe_key TEXT NOT NULL UNIQUE,
    received_at BIGINT NOT NULL,
    entity TEXT NOT NULL,
    message TEXT NOT NULL,
    record_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    correlation_id TEXT,
    data_missing BIGINT NOT NULL DEFAULT 0,
    body BLOB NOT NULL,
    body_codec TEXT NOT NULL DEFAULT 'json',
    status TEXT NOT NULL DEFAULT 'pending',
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    last_error TEXT,
    settled_at BIGINT
);
INSERT INTO inbox_new (id, dedupe_key, received_at, entity, message, record_id, version,
    correlation_id, data_missing, body, body_codec, status, attempts, next_attempt_at,
    lease_owner, lease_expires_at, last_error, settled_at)
SELECT id, dedupe_key, received_at, entity, message, record_id, version, correlation_id,
    data_missing, CAST(body AS BLOB), 'json', status, attempts, next_attempt_at, lease_owner,
    lease_expires_at, last_error, settled_at
FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_new RENAME TO inbox;
CREATE INDEX inbox_ready ON inbox (status, next_attempt_at);
