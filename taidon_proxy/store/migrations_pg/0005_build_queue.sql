-- The build queue (store/queue.py): what each gateway was building or had waiting at a stop.
CREATE TABLE build_queue (
    node TEXT NOT NULL,
    job_id TEXT PRIMARY KEY,
    alias TEXT,
    ref TEXT,
    team TEXT,
    priority INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    enqueued DOUBLE PRECISION NOT NULL,
    running BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX build_queue_node ON build_queue (node, seq);
