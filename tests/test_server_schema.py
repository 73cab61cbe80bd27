"""Schemathesis against the served OpenAPI schema: generated valid and invalid requests to every
operation must never get a 5xx. Bounded (a few dozen cases per operation) to keep the suite fast;
for a deeper run: `st run URL/openapi.json --checks not_a_server_error --phases coverage,fuzzing`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_server_support import live, tiny, tiny_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(180)
ST = Path(sys.executable).with_name("st")


@pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed (pip install -e '.[test]')")
def test_no_5xx_on_generated_requests(tiny, tmp_path):  # noqa: F811
    # a low max_tokens cap keeps generated requests cheap: most cases are about parsing, not decoding
    with live(tiny, max_batch=8, max_tokens_limit=2) as s:
        r = subprocess.run([str(ST), "run", s.url + "/openapi.json", "--checks", "not_a_server_error",
                            "--phases", "fuzzing", "--mode", "all", "--max-examples", "25", "--seed", "7",
                            "--workers", "2", "--no-color", "--report-dir", str(tmp_path),
                            # Warnings (e.g. "mostly rejected generated data": random text is rarely a
                            # valid next-edit prompt, so /v1/edit/completions answers most cases 400)
                            # are not failures; the checks below are.
                            "--warnings", "off"],
                           capture_output=True, text=True, timeout=170, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert s.state.bridge.alive
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "No issues found" in r.stdout, r.stdout[-3000:]
