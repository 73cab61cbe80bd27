"""Code evaluations: the sandboxed executor, truncation, edit similarity, infill splicing, fixtures."""
from __future__ import annotations

import json
import time

import pytest

from unmask.errors import UserError
from unmask.eval import (
    edit_similarity,
    exact_match,
    infill_cases,
    load_heldout,
    load_problems,
    run_program,
    run_programs,
    splice,
    syntax_valid,
    truncate_completion,
)
from unmask.eval.code_quality import first_line, first_nonblank_line, levenshtein
from unmask.eval.humaneval import check_program, score_bodies, spread
from unmask.eval.line_completion import score_lines

ADD_TEST = "\n\ndef check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n\ncheck(add)\n"


# ---- the executor ---------------------------------------------------------------------------------
def test_correct_solution_passes():
    r = run_program("def add(a, b):\n    return a + b\n" + ADD_TEST)
    assert r.passed and r.status == "passed"


def test_wrong_solution_fails_with_its_error():
    r = run_program("def add(a, b):\n    return a - b\n" + ADD_TEST)
    assert not r.passed and r.status == "failed"
    assert "AssertionError" in r.error


def test_infinite_loop_times_out_within_the_timeout():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 4.0


def test_forked_children_are_killed_with_the_program(tmp_path):
    marker = tmp_path / "alive"
    code = ("import os, time\nif os.fork() == 0:\n    time.sleep(2)\n"
            f"    open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\nwhile True:\n    pass\n")
    assert run_program(code, timeout=0.5).status == "timeout"
    time.sleep(2.5)
    assert not marker.exists()


@pytest.mark.parametrize("code", [
    "import ctypes\nctypes.string_at(0)\n",  # segfault
    "import os\nos.abort()\n",
    "raise SystemExit(0)\n",  # exiting 0 before the end is not a pass
    "import os\nos._exit(0)\n",
    "import sys\nsys.stdout.close()\n",
    "x = [0] * (1 << 40)\n",  # over the memory cap
    "def f(n):\n    return f(n + 1)\nf(0)\n",
])
def test_a_crashing_candidate_is_a_failure_not_a_harness_crash(code):
    r = run_program(code, timeout=5.0)
    assert not r.passed and r.status == "failed"


def test_no_network():
    code = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\nexcept OSError as e:\n"
            "    assert 'disabled' in str(e), e\nelse:\n    raise AssertionError('connected')\n"
            "try:\n    socket.socket()\nexcept OSError:\n    pass\nelse:\n    raise AssertionError('socket')\n")
    assert run_program(code).passed


def test_program_runs_isolated_in_a_temp_dir():
    code = "import os, sys\nassert sys.flags.isolated\nassert 'unmask-exec-' in os.getcwd()\n"
    assert run_program(code).passed


def test_run_programs_keeps_order_caches_and_skips_syntax_errors():
    good = "def add(a, b):\n    return a + b\n" + ADD_TEST
    bad = "def add(a, b):\n    return a * b\n" + ADD_TEST
    broken = "def add(a, b)\n    return a + b\n"
    cache: dict = {}
    res = run_programs([good, bad, broken, good], timeout=5, workers=2, cache=cache)
    assert [r.passed for r in res] == [True, False, False, True]
    assert res[2].seconds == 0.0 and "SyntaxError" in res[2].error  # never started a process
    assert len(cache) == 3 and res[0] is res[3]


# ---- truncation, syntax, similarity ---------------------------------------------------------------
@pytest.mark.parametrize("stop", ["def g():\n    pass", "class A:\n    pass", "if __name__ == '__main__':\n    f()",
                                  "print(f(1))", "# tests", "@decorator\ndef g(): pass", "import os"])
def test_truncation_stops_at_top_level_statements(stop):
    body = "    x = 1\n    if x:\n        # comment\n        print(x)\n    return x\n\n"
    assert truncate_completion(body + stop + "\nmore") == body


def test_truncation_keeps_indented_lines_and_respects_line_start():
    body = "    def inner():\n        return 1\n    class B:\n        pass\n    return inner()\n"
    assert truncate_completion(body) == body
    assert truncate_completion("def g(): pass") == ""  # a completion that starts a new function has no body
    # the prompt did not end with a newline: the first line continues it and is not a stop
    assert truncate_completion("def f():\n    return 1\ndef g(): pass", at_line_start=False) == "def f():\n    return 1\n"


def test_syntax_valid():
    assert syntax_valid("def f(x):\n    return x + 1\n")
    assert not syntax_valid("def f(x):\nreturn x +\n")
    assert not syntax_valid("def f(x):\n    return (x\n")
    assert syntax_valid("s = '\\d'\n")  # a warning, not an error


def test_edit_similarity_and_exact_match():
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert levenshtein("flaw", "lawn") == 2
    assert edit_similarity("x = 1   ", "x = 1") == 1.0  # trailing whitespace does not count
    assert exact_match("    return x  \r", "    return x")
    assert not exact_match("return x", "    return x")  # indentation does
    assert first_line("a\nb") == "a" and first_line("") == ""


# ---- HumanEval --------------------------------------------------------------------------------------
def test_problems_ship_offline_and_in_order():
    probs = load_problems()
    assert len(probs) == 164
    assert [p["task_id"] for p in probs[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(load_problems(limit=5)) == 5
    with pytest.raises(UserError):
        load_problems(limit=0)
    assert spread(list(range(164)), 4) == [0, 41, 82, 123]


def test_canonical_solutions_pass_and_junk_after_the_body_is_truncated():
    probs = load_problems(limit=4)
    junk = "\n\ndef unrelated(:\n    syntax error\nprint('x')\n"
    res = score_bodies(probs, [p["canonical_solution"] + junk for p in probs])
    assert res["pass_at_1"] == 1.0 and res["syntax_valid"] == 1.0
    wrong = score_bodies(probs[:2], ["    return None\n", "    return 1/0\n"])
    assert wrong["pass_at_1"] == 0.0 and all(r["status"] == "failed" for r in wrong["problems"])
    assert "check(" in check_program(probs[0], "    pass\n")


def test_infill_splice_restores_the_solution():
    probs = load_problems()
    cases = infill_cases(probs)
    assert len(cases) > 1000  # every non-blank line of every canonical solution
    by_id = {p["task_id"]: p for p in probs}
    for c in cases:
        whole = by_id[c.task_id]["prompt"] + by_id[c.task_id]["canonical_solution"]
        assert splice(c, c.middle) == whole
        assert splice(c, c.middle + "\nignored after the newline") == whole
        assert c.middle.strip() and "\n" not in c.middle and c.prefix.endswith("\n") and c.suffix.startswith("\n")
    assert len(infill_cases(probs[:3], max_lines_per_problem=2)) == 5  # HumanEval/2 has a one-line solution


def test_infill_spliced_programs_run():
    p = load_problems(limit=1)[0]
    c = infill_cases([p], max_lines_per_problem=1)[0]
    prog = lambda line: f"{splice(c, line)}\n\n{p['test']}\ncheck({p['entry_point']})\n"  # noqa: E731
    assert run_program(prog(c.middle)).passed
    assert not run_program(prog(c.middle.split("for")[0] + "pass")).passed


# ---- held-out lines -----------------------------------------------------------------------------
def test_committed_heldout_fixture():
    items = load_heldout()
    assert len(items) == 100
    assert {it["package"] for it in items} == {"networkx", "sqlglot", "tornado", "flask", "werkzeug"}
    for it in items:
        assert it["prefix"].endswith("\n") and "\n" not in it["line"] and it["line"].strip()
    res = score_lines(items[:3], [it["line"] + "\nnext" for it in items[:3]])
    assert res["exact_match"] == 1.0 and res["edit_similarity"] == 1.0


def test_heldout_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_heldout(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix": "x"}\n')
    with pytest.raises(UserError, match="string fields"):
        load_heldout(bad)
    bad.write_text("{nope\n")
    with pytest.raises(UserError, match="corrupt JSON"):
        load_heldout(bad)
    bad.write_text(json.dumps({"prefix": "a\n", "line": "b"}) + "\n")
    assert load_heldout(bad) == [{"prefix": "a\n", "line": "b"}]


def test_an_empty_body_is_not_a_syntax_valid_body():
    prob = {"task_id": "t/0", "prompt": 'def f(x):\n    """Return x."""\n', "entry_point": "f",
            "test": "def check(c):\n    assert c(1) == 1\n"}
    res = score_bodies([prob, prob], ["\n\n", "    return x\n"], timeout=5, workers=1)
    assert [p["syntax_valid"] for p in res["problems"]] == [False, True]
    assert [p["passed"] for p in res["problems"]] == [False, True]


def test_first_nonblank_line_is_the_infilled_line():
    """An infill prefix that ends in a blank line (or a trailing space) makes the model write a line
    break first; the line it then writes is the answer, not the empty string before it."""
    assert first_nonblank_line("\n    return x\n    y") == "    return x"
    assert first_nonblank_line("    return x\n") == "    return x"
    assert first_nonblank_line("\n  \n\tz") == "\tz"
    assert first_nonblank_line("") == first_nonblank_line("\n \n") == ""
