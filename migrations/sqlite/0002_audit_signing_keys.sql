-- Checkpoint signing keys, one row per generation; the seed of each lives wrapped in
-- vault_secrets. Old generations stay so old checkpoints still verify after a rotation.
CREATE TABLE audit_signing_keys (
    generation INTEGER PRIMARY KEY,
    verifier_key TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
