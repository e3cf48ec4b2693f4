"""Run inside a project's own interpreter: load one runner file of ours, call it, answer in JSON.

A standalone script (it imports nothing of the proxy, which that interpreter need not have):
`python pytool_entry.py RUNNER.py FUNCTION ARGS ANSWER`, ARGS one JSON object. The runner's
own output and the tool's go to stdout; the answer, one JSON object, goes to the file ANSWER
(not stdout, where a large plan would be cut like any over-long output line). A runner's
exception becomes `{"error": "Type: message"}`, or the `taidon_answer` mapping it carries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

ANSWER_PATH = ""


def _answer(payload: dict[str, Any]) -> None:
    sys.stdout.flush()
    with open(ANSWER_PATH, "w", encoding="utf-8") as f:
        json.dump(payload, f)


def main() -> int:
    # The script's own directory is no place to import the project's modules from.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == here:
        del sys.path[0]
    global ANSWER_PATH
    runner, function, raw, ANSWER_PATH = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    spec = importlib.util.spec_from_file_location("taidon_runner", runner)
    if spec is None or spec.loader is None:
        _answer({"error": f"cannot load runner {os.path.basename(runner)}"})
        return 1
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        result = getattr(module, function)(json.loads(raw))
    except Exception as e:  # every failure becomes one answer line
        carried = getattr(e, "taidon_answer", None)
        _answer(
            dict(carried) if isinstance(carried, dict) else {"error": f"{type(e).__name__}: {e}"}
        )
        return 1
    _answer(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
