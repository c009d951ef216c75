-- Notifications as received from Dynamics: the durable inbox.
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe_key TEXT NOT NULL UNIQUE,
    received_at BIGINT NOT NULL,
    entity TEXT NOT NULL,
    message TEXT NOT NULL,
    record_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    correlation_id TEXT,
    data_missing BIGINT NOT NULL DEFAULT 0,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    last_error TEXT,
    settled_at BIGINT
);
CREATE INDEX inbox_ready ON inbox (status, next_attempt_at);

-- What oppsync knows of each Dynamics row (JSON state owned by src/rules), with a revision
-- for compare-and-swap commits.
CREATE TABLE opportunities (
    id TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    state TEXT NOT NULL,
    projection TEXT,
    customer_contact_id TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX opportunities_customer ON opportunities (customer_contact_id);

CREATE TABLE connections (
    id TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    state TEXT NOT NULL,
    opportunity_id TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX connections_opportunity ON connections (opportunity_id);

CREATE TABLE contacts (
    id TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE connection_roles (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    category BIGINT NOT NULL,
    fetched_at BIGINT NOT NULL
);

CREATE TABLE marketo_leads (
    contact_id TEXT PRIMARY KEY,
    lead_id BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Pending Marketo writes, one row per Marketo record key: a newer plan replaces the payload
-- (coalescing) and bumps the revision, so a push of an older payload never settles a newer one.
CREATE TABLE marketo_writes (
    key TEXT PRIMARY KEY,
    opportunity_id TEXT,
    phase BIGINT NOT NULL,
    payload TEXT NOT NULL,
    revision BIGINT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX marketo_writes_ready ON marketo_writes (status, next_attempt_at);
CREATE INDEX marketo_writes_opportunity ON marketo_writes (opportunity_id);

CREATE TABLE control (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
