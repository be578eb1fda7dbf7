-- Access-token signing key generations (seeds wrapped in vault_secrets); the newest signs, the
-- one before it still verifies until the next rotation.
CREATE TABLE token_signing_keys (
    generation BIGINT PRIMARY KEY,
    created_at BIGINT NOT NULL
);
-- Clients that publish their keys at a JWKS URL instead of registering them.
ALTER TABLE clients ADD COLUMN jwks_url TEXT;
