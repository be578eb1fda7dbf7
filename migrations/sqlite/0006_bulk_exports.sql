-- FHIR Bulk Data exports ($export): one row per job, one per NDJSON file it wrote. The request
-- (which can hold search criteria naming a patient) is sealed with the job's own key, as are the
-- files in the blob store; the key is destroyed when the job expires or is cancelled.
CREATE TABLE bulk_exports (
    job_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    state TEXT NOT NULL,
    sealed_request BLOB NOT NULL,
    transaction_time INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER,
    progress TEXT NOT NULL,
    failure TEXT
);
CREATE INDEX bulk_exports_by_client ON bulk_exports (client_id, state);
CREATE INDEX bulk_exports_by_expiry ON bulk_exports (expires_at);
CREATE TABLE bulk_export_files (
    job_id TEXT NOT NULL,
    file_name TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_count INTEGER NOT NULL,
    blob_key TEXT NOT NULL,
    PRIMARY KEY (job_id, file_name)
);
