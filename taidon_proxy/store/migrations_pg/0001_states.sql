-- States, names, pins, links, fingerprints, jobs and shared instances (see store/metadata.py
-- for the SQLite columns these follow). `node` names the gateway whose store holds the files
-- a row describes: each gateway serves, reconciles and evicts only its own rows; names, pins,
-- links and jobs are seen by all.
CREATE TABLE states (
    node TEXT NOT NULL,
    id TEXT NOT NULL,
    parent TEXT,
    kind TEXT NOT NULL,
    alias TEXT,
    label TEXT NOT NULL,
    backend TEXT NOT NULL,
    engine TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    last_used DOUBLE PRECISION NOT NULL,
    use_count BIGINT NOT NULL DEFAULT 0,
    build_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    size_bytes BIGINT NOT NULL DEFAULT 0,
    clean BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (node, id)
);
CREATE INDEX states_parent ON states (node, parent);
CREATE INDEX states_id ON states (id);
-- A pin keeps a state id from eviction on every gateway that holds it.
CREATE TABLE pins (
    state_id TEXT PRIMARY KEY,
    pinned_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE names (
    name TEXT PRIMARY KEY,
    state_id TEXT NOT NULL
);
CREATE TABLE fingerprints (
    node TEXT NOT NULL,
    recipe_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state_id TEXT NOT NULL,
    inputs TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node, recipe_key)
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    alias TEXT,
    status TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    finished DOUBLE PRECISION,
    target TEXT,
    error TEXT
);
CREATE INDEX jobs_started ON jobs (started);
CREATE TABLE job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE shared_instances (
    node TEXT NOT NULL,
    key TEXT NOT NULL,
    alias TEXT,
    label TEXT NOT NULL,
    state_ref TEXT,
    state_id TEXT NOT NULL,
    clone_id TEXT NOT NULL,
    path TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    last_used DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (node, key),
    UNIQUE (node, clone_id)
);
CREATE TABLE links (
    pos BIGSERIAL,
    id TEXT PRIMARY KEY,
    parent TEXT,
    kind TEXT NOT NULL,
    step_hash TEXT,
    label TEXT NOT NULL
);
CREATE INDEX links_parent ON links (parent, pos);
