-- Accounts: the name of each Marketo company (externalCompanyId = accountid), cached from
-- account notifications and Web API reads.
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The contact a connection links, read from its JSON state, so a contact's deletion finds the
-- opportunities it is a stakeholder of. Generated, so rows already stored are covered too; a
-- state that is not JSON gives NULL rather than failing the write.
ALTER TABLE connections ADD COLUMN contact_id TEXT
    GENERATED ALWAYS AS (CASE WHEN json_valid(state) THEN json_extract(state, '$.contact_id') END) VIRTUAL;
CREATE INDEX connections_contact ON connections (contact_id);
