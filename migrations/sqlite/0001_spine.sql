-- The spine: vault keys, versioned records, the audit journal and API clients.
CREATE TABLE vault_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    master_key_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    rotated_at INTEGER
);
CREATE TABLE vault_secrets (
    name TEXT PRIMARY KEY,
    wrapped BLOB NOT NULL
);
CREATE TABLE patient_keys (
    patient_ref TEXT PRIMARY KEY,
    wrapped_identity BLOB,
    created_at INTEGER NOT NULL,
    shredded_at INTEGER
);
CREATE TABLE records (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    patient_ref TEXT NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    body BLOB,
    blob_key TEXT,
    PRIMARY KEY (resource_type, resource_id, version)
);
CREATE INDEX records_by_patient ON records (patient_ref);
CREATE INDEX records_by_time ON records (last_updated);
CREATE TABLE record_heads (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    patient_ref TEXT NOT NULL,
    last_updated INTEGER NOT NULL,
    PRIMARY KEY (resource_type, resource_id)
);
CREATE TABLE journal_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    tree_size INTEGER NOT NULL,
    frontier BLOB NOT NULL,
    batches INTEGER NOT NULL
);
INSERT INTO journal_head (id, tree_size, frontier, batches) VALUES (1, 0, x'', 0);
CREATE TABLE audit_leaves (
    leaf_index INTEGER PRIMARY KEY,
    leaf BLOB NOT NULL,
    recorded_at INTEGER NOT NULL,
    patient_ref TEXT,
    agent_id TEXT,
    event_code TEXT NOT NULL,
    outcome INTEGER NOT NULL
);
CREATE INDEX audit_leaves_by_patient ON audit_leaves (patient_ref, leaf_index);
CREATE INDEX audit_leaves_by_agent ON audit_leaves (agent_id, leaf_index);
CREATE INDEX audit_leaves_by_time ON audit_leaves (recorded_at);
CREATE TABLE audit_nodes (
    level INTEGER NOT NULL,
    node_index INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, node_index)
);
CREATE TABLE audit_checkpoints (
    tree_size INTEGER PRIMARY KEY,
    note TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    scopes TEXT NOT NULL,
    secret_sha256 BLOB,
    jwks TEXT,
    created_at INTEGER NOT NULL,
    disabled_at INTEGER
);
