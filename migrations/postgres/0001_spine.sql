-- The spine: vault keys, versioned records, the audit journal and API clients.
CREATE TABLE vault_meta (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    master_key_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    rotated_at BIGINT
);
CREATE TABLE vault_secrets (
    name TEXT PRIMARY KEY,
    wrapped BYTEA NOT NULL
);
CREATE TABLE patient_keys (
    patient_ref TEXT PRIMARY KEY,
    wrapped_identity BYTEA,
    created_at BIGINT NOT NULL,
    shredded_at BIGINT
);
CREATE TABLE records (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    patient_ref TEXT NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    body BYTEA,
    blob_key TEXT,
    PRIMARY KEY (resource_type, resource_id, version)
);
CREATE INDEX records_by_patient ON records (patient_ref);
CREATE INDEX records_by_time ON records (last_updated);
CREATE TABLE record_heads (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    deleted BIGINT NOT NULL,
    patient_ref TEXT NOT NULL,
    last_updated BIGINT NOT NULL,
    PRIMARY KEY (resource_type, resource_id)
);
CREATE TABLE journal_head (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    tree_size BIGINT NOT NULL,
    frontier BYTEA NOT NULL,
    batches BIGINT NOT NULL
);
INSERT INTO journal_head (id, tree_size, frontier, batches) VALUES (1, 0, ''::bytea, 0);
CREATE TABLE audit_leaves (
    leaf_index BIGINT PRIMARY KEY,
    leaf BYTEA NOT NULL,
    recorded_at BIGINT NOT NULL,
    patient_ref TEXT,
    agent_id TEXT,
    event_code TEXT NOT NULL,
    outcome BIGINT NOT NULL
);
CREATE INDEX audit_leaves_by_patient ON audit_leaves (patient_ref, leaf_index);
CREATE INDEX audit_leaves_by_agent ON audit_leaves (agent_id, leaf_index);
CREATE INDEX audit_leaves_by_time ON audit_leaves (recorded_at);
CREATE TABLE audit_nodes (
    level BIGINT NOT NULL,
    node_index BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (level, node_index)
);
CREATE TABLE audit_checkpoints (
    tree_size BIGINT PRIMARY KEY,
    note TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    scopes TEXT NOT NULL,
    secret_sha256 BYTEA,
    jwks TEXT,
    created_at BIGINT NOT NULL,
    disabled_at BIGINT
);
