"""A sample test that waits to be killed (the e2e test kills pytest with SIGKILL)."""

import os
import time
from pathlib import Path


def test_hang(taidon_psycopg):
    taidon_psycopg.execute("select 1")
    Path(os.environ["TAIDON_SAMPLE_RESULTS"], "hanging").write_text("1")
    time.sleep(120)
