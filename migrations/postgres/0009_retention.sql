-- Retention: settled notifications (done, discarded) older than the configured window are
-- deleted in small batches, oldest first; this index finds them without reading the rest.
CREATE INDEX inbox_settled ON inbox (settled_at) WHERE status IN ('done', 'discarded');
