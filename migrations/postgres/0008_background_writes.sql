-- Marketo writes planned by a background job (the initial sync, reconciliation, drift repair):
-- the pusher sends them after the live ones of the same phase.
ALTER TABLE marketo_writes ADD COLUMN background BIGINT NOT NULL DEFAULT 0;
