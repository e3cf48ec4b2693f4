-- What made each state (docs/provenance.md): one JSON record per state id, shared by every
-- gateway like links (ids are content-addressed), kept when the state goes.
CREATE TABLE provenance (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
