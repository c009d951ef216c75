-- The pusher reads pending writes in push order (phase, live before background, oldest first)
-- and only as many as its free calls can carry: walked on this index, a read stops after those
-- rows instead of sorting every pending write.
CREATE INDEX marketo_writes_push_order ON marketo_writes (phase, background, updated_at, key) WHERE status = 'pending';
