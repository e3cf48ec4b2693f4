-- OIDC logins (store/tokens.py): the teams a user's groups mapped to, until that login's
-- token expires.
CREATE TABLE oidc_grants (
    "user" TEXT PRIMARY KEY,
    teams TEXT NOT NULL,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
