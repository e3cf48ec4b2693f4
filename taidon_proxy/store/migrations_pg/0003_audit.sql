-- The audit log (store/audit.py): one hash chain for every gateway. A writer takes the
-- advisory lock of the chain, chains its batch after the last record and moves the head,
-- all in one transaction.
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    fields TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_ts ON audit (ts);
CREATE INDEX audit_actor ON audit (actor, seq);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
-- The proxy only appends; these keep a stray UPDATE, DELETE or TRUNCATE from passing silently.
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
-- The head: the last seq and hash written, in its own row (the file's part on SQLite).
CREATE TABLE audit_head (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
