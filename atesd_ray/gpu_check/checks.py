"""gpu-check's record: each check's pass or fail, details and time."""

from __future__ import annotations

import json
import time
import traceback

RESULTS: list[dict] = []


def check(name: str):
    """Run the decorated check now; record pass/fail, its details and its time."""

    def run(fn):
        t0 = time.perf_counter()
        try:
            details = fn() or {}
            ok = True
        except Exception as err:  # a failed check is reported and the others still run
            details, ok = (
                {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=4)},
                False,
            )
        row = {"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 2), **details}
        RESULTS.append(row)
        shown = {k: v for k, v in details.items() if k != "trace"}
        print(
            f"{'PASS' if ok else 'FAIL'}  {name} ({row['seconds']} s): {json.dumps(shown, default=str)}",
            flush=True,
        )
        return fn

    return run
