-- Accounts: the name of each Marketo company (externalCompanyId = accountid), cached from
-- account notifications and Web API reads.
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The contact a connection links, read from its JSON state, so a contact's deletion finds the
-- opportunities it is a stakeholder of. Generated, so rows already stored are covered too. Read
-- with a pattern rather than a JSON cast, which would fail the write of a state that is not
-- JSON (the state is serde_json's compact output: `"contact_id":"<uuid>"`).
ALTER TABLE connections ADD COLUMN contact_id TEXT
    GENERATED ALWAYS AS (substring(state from '"contact_id":"([0-9a-f-]{36})"')) STORED;
CREATE INDEX connections_contact ON connections (contact_id);
