"""Load on one budget over HTTP: 4 client processes x 50 authorize calls, exact counts.

The figures (4 x 500, p50/p99 beside a bare endpoint) come from
``benchmarks/serve.py``, which this test shares its client with; here only
the counts are checked, never a time.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.serve import UNIT, one_budget

from agentpolicy import PolicyEngine
from tests.serve_helpers import Served


def test_four_processes_authorizing_over_http_never_overspend_one_budget(tmp_path: Path) -> None:
    engine = PolicyEngine(storage=f"sqlite:///{tmp_path / 'load.db'}")
    try:
        with Served(engine) as served:
            result = one_budget(served.url, engine, processes=4, per=50)
    finally:
        engine.close()
    assert (result["total"], result["limit"]) == (200, 100)
    assert dict(result["codes"]) == {"ALLOWED": 100, "DAILY_LIMIT": 100}
    assert result["used"] == 100 * UNIT  # spent + reserved: exactly the limit, never more
    assert len(result["took"]) == 200
