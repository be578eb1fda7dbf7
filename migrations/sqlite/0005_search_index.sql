-- The FHIR search index of each record's current version. Strings, tokens, references and uris
-- are keyed blind-index tokens (HMAC, never the value); dates and numbers are in the clear
-- (ADR 0006). Rows are replaced in the transaction that writes the version.
CREATE TABLE search_tokens (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    param TEXT NOT NULL,
    token TEXT NOT NULL
);
CREATE INDEX search_tokens_lookup ON search_tokens (token, resource_type, resource_id);
CREATE INDEX search_tokens_owner ON search_tokens (resource_type, resource_id, param);
CREATE TABLE search_dates (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    param TEXT NOT NULL,
    low INTEGER NOT NULL,
    high INTEGER NOT NULL
);
CREATE INDEX search_dates_lookup ON search_dates (resource_type, param, low, high);
CREATE INDEX search_dates_owner ON search_dates (resource_type, resource_id, param);
CREATE TABLE search_numbers (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    param TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT
);
CREATE INDEX search_numbers_lookup ON search_numbers (resource_type, param, value);
CREATE INDEX search_numbers_owner ON search_numbers (resource_type, resource_id, param);
-- Patient compartments ($everything) and type-level listing in write order.
CREATE INDEX record_heads_by_patient ON record_heads (patient_ref, resource_type);
CREATE INDEX record_heads_by_type_time ON record_heads (resource_type, last_updated);
CREATE INDEX records_by_type_time ON records (resource_type, last_updated);
