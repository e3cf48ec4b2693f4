-- Access tokens (store/tokens.py): hashes and SCRAM verifiers only, shared by every gateway.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    verifier TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION
);
CREATE INDEX tokens_user ON tokens ("user");
CREATE TABLE token_salts (
    "user" TEXT PRIMARY KEY,
    salt BYTEA NOT NULL,
    iterations INTEGER NOT NULL
);
