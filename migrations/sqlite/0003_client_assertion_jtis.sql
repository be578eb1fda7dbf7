-- Used private_key_jwt assertion ids, kept until the assertion expires (replay protection that
-- holds across replicas).
CREATE TABLE client_assertion_jtis (
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX client_assertion_jtis_by_expiry ON client_assertion_jtis (expires_at);
