"""`unmask bench --quick` end to end on tiny random models saved to temp dirs."""
from __future__ import annotations

import json

import pytest
import torch

from unmask.bench import CONCURRENCY, CONFIGS, SCHEMA, TARGETS
from unmask.bench.configs import HUMANEVAL_CONFIGS
from unmask.bench.harness import queued
from unmask.cli import main
from unmask.config import GenerationConfig, ModelConfig
from unmask.eval.generate import Batch, Completion
from unmask.model import Transformer
from unmask.pretrained import Pretrained, save
from unmask.tokenizer import train_tokenizer

METRICS = ("requests", "completion_tokens", "wall_s", "tok_s", "tpf", "mean_nfe", "ttft_mean_s", "latency_p50_s",
           "latency_p99_s", "errors", "cpu_share")
QUALITY = ("pass_at_1", "syntax_valid", "identical_to_batch1", "line_exact_match", "line_edit_similarity")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from unmask.eval import load_heldout, load_problems

    texts = [p["prompt"] + p["canonical_solution"] for p in load_problems()]
    texts += [it["prefix"] for it in load_heldout()]
    tok = train_tokenizer(texts, vocab_size=512)
    root = tmp_path_factory.mktemp("bench-models")
    out = {}
    for attention, objective in (("block", "bd3lm"), ("causal", "ar")):
        cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=1024, attention=attention,
                          objective=objective, block_size=8, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        torch.manual_seed(0)
        net = Transformer(cfg).eval()
        out[attention] = save(Pretrained(net, tok, cfg, GenerationConfig(block_size=8)), root / attention)
    return out


@pytest.fixture(scope="module")
def bench_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    old = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            # Every row must run here, also on CPUs where int8 is slow (see the skip test below).
            mp.setattr("unmask.bench.harness.int8_speedup_cpu", lambda: 2.0)
            rc = main(["bench", "--model", str(models["block"]), "--ar-model", str(models["causal"]), "--quick",
                       "--threads", "1", "--json", str(out / "bench.json")])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    return json.loads((out / "bench.json").read_text()), out


def test_schema_and_machine_info(bench_run):
    res, _ = bench_run
    assert res["schema"] == SCHEMA
    for k in ("cpu_count", "torch", "torch_threads", "date_utc", "python"):
        assert res["machine"][k] is not None
    assert res["machine"]["torch_threads"] == 1
    assert res["workload"]["length"] == 16 and res["workload"]["concurrency"] == list(CONCURRENCY)
    assert res["models"]["dllm"]["attention"] == "block" and res["models"]["ar"]["attention"] == "causal"
    assert [c["name"] for c in res["configs"]] == [d.name for _, d in CONFIGS]
    assert res["seconds"] > 0


def test_every_run_has_every_metric(bench_run):
    res, _ = bench_run
    runs = res["runs"]
    assert {(r["config"], r["concurrency"]) for r in runs} == {(d.name, c) for _, d in CONFIGS for c in CONCURRENCY}
    for r in runs:
        m = r["metrics"]
        assert m["requests"] == max(res["workload"]["prompts"], r["concurrency"]) and m["errors"] == 0
        for k in METRICS:
            assert isinstance(m[k], (int, float)), (r["config"], k)
        assert m["tok_s"] > 0 and m["tpf"] > 0 and m["latency_p99_s"] >= m["latency_p50_s"] > 0
        for k in QUALITY:
            assert 0.0 <= r["quality"][k] <= 1.0, (r["config"], k)
        he = r["quality"]["humaneval_pass_at_1"]  # main configs only; in --quick on the timed prompts
        assert (he is not None) == (r["config"] in HUMANEVAL_CONFIGS)
        assert (r["quality"]["humaneval_syntax_valid"] is not None) == (r["config"] in HUMANEVAL_CONFIGS)
        assert r["sequential"] == (r["config"] == "reference")
    for name, he in res["humaneval"].items():
        assert he["n"] == res["workload"]["prompts"] and he["generated"] == 0 and he["subset"] == "timed prompts"
    assert set(res["infill"]) == set(HUMANEVAL_CONFIGS)
    for inf in res["infill"].values():
        assert inf["n"] == 4 and 0 <= inf["pass_at_1"] <= 1 and 0 <= inf["exact_match"] <= 1
    for name, ln in res["lines"].items():
        assert ln["n"] == res["workload"]["lines"] and ln["metrics"]["requests"] == ln["n"]


def test_ratios_use_the_right_baselines(bench_run):
    res, _ = bench_run
    idx = {(r["config"], r["concurrency"]): r for r in res["runs"]}
    for r in res["runs"]:
        c, x = r["concurrency"], r["ratios"]
        # the AR twin with the same weights: quantization speeds up both sides of the ratio or neither
        ar_name = next((f"ar-{q}" for q in ("int8wo", "int8") if r["config"].endswith("-" + q)), "ar")
        ref, ar, one = idx[("reference", c)], idx[(ar_name, c)], idx[(r["config"], 1)]
        assert x["reference_run"] == ["reference", c] and x["ar_run"] == [ar_name, c]
        assert x["speedup_vs_reference"] == pytest.approx(r["metrics"]["tok_s"] / ref["metrics"]["tok_s"])
        assert x["speedup_vs_ar"] == pytest.approx(r["metrics"]["tok_s"] / ar["metrics"]["tok_s"])
        assert x["scaling_vs_batch1"] == pytest.approx(r["metrics"]["tok_s"] / one["metrics"]["tok_s"])
        dq = x["quality_delta_vs_ar"]
        assert dq["line_exact_match"] == pytest.approx(100 * (r["quality"]["line_exact_match"]
                                                              - ar["quality"]["line_exact_match"]))
    assert idx[("ar", 16)]["ratios"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert idx[("ar-int8wo", 16)]["ratios"]["speedup_vs_ar"] == pytest.approx(1.0)
    # the reference runs once: its 4- and 16-concurrent rows share its throughput
    assert idx[("reference", 16)]["metrics"]["tok_s"] == idx[("reference", 1)]["metrics"]["tok_s"]


def test_targets_and_checks(bench_run):
    res, _ = bench_run
    assert [t["key"] for t in res["targets"]] == [t.key for t in TARGETS]
    for t in res["targets"]:
        assert isinstance(t["met"], bool) and t["text"]
    assert res["targets"][0]["applies"] is False  # quick runs at length 16, the target is at 256
    # greedy, batch invariant: the engine's topk at steps = length reproduces the reference
    chk = res["checks"]["reference_vs_engine_topk_identical"]
    assert chk["speed_set"] == 1.0 and chk["line_set"] == 1.0
    for r in res["runs"]:
        assert r["quality"]["identical_to_batch1"] == 1.0, r["config"]


def test_plot_and_table(bench_run):
    from unmask.bench import format_table

    res, out = bench_run
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(res)
    assert "x ref" in table and "reference (seq)" in table and sum(ln.startswith("target ") for ln in table.splitlines()) == len(TARGETS)


def test_full_humaneval_covers_the_equal_quality_comparisons():
    """Each dLLM configuration with the larger HumanEval run is compared with an AR run that has it too."""
    from unmask.bench.configs import FULL, QUICK, ar_baseline

    assert FULL.humaneval_limit is None and FULL.humaneval_concurrency == 16 and QUICK.humaneval_limit == 0
    names = {d.name for _, d in CONFIGS}
    for name in HUMANEVAL_CONFIGS:
        assert name in names and ar_baseline(name) in HUMANEVAL_CONFIGS


def test_quality_loss_uses_the_larger_set_only_when_both_have_it():
    from unmask.bench.scoring import quality_loss

    def run(timed_syntax, full_syntax, n, pass_full=0.0):
        return {"quality": {"pass_at_1": 0.0, "syntax_valid": timed_syntax, "line_exact_match": 0.1,
                            "line_edit_similarity": 0.4, "humaneval_pass_at_1": pass_full,
                            "humaneval_syntax_valid": full_syntax, "humaneval_n": n}}

    ar = run(0.8125, 0.677, 164, pass_full=0.0122)
    loss, used = quality_loss(run(0.625, 0.695, 164), ar)
    assert set(used) == {"humaneval_pass_at_1", "humaneval_syntax_valid", "line_exact_match", "line_edit_similarity"}
    assert loss == pytest.approx(1.22)  # pass@1 2/164 against 0; the syntax gain does not offset it
    loss, used = quality_loss(run(0.625, 0.695, 16), ar)  # different problem sets: the timed prompts decide
    assert "syntax_valid" in used and "humaneval_syntax_valid" not in used
    assert loss == pytest.approx(18.75)
    loss, _ = quality_loss(run(0.625, None, None), run(0.8125, None, None))
    assert loss == pytest.approx(18.75)


def test_queued_latency_of_a_sequential_run():
    comps = [Completion("", 1, 1, 1.0, 0.5) for _ in range(4)]
    b = Batch(comps, 4.0, 1, sequential=True)
    assert [c.latency for c in queued(b, 1).completions] == [1.0] * 4
    q = queued(b, 4).completions
    assert [c.latency for c in q] == [1.0, 2.0, 3.0, 4.0] and [c.ttft for c in q] == [0.5, 1.5, 2.5, 3.5]


def test_bench_user_errors(models, tmp_path, capsys):
    args = ["--quick", "--json", str(tmp_path / "b.json")]
    assert main(["bench", "--model", str(models["causal"]), "--ar-model", str(models["causal"]), *args]) == 2
    assert "autoregressive" in capsys.readouterr().err
    assert main(["bench", "--model", str(models["block"]), "--ar-model", str(models["block"]), *args]) == 2
    assert main(["bench", "--model", str(tmp_path / "nope"), "--ar-model", str(models["causal"]), *args]) == 2
    assert main(["bench", "--model", str(models["block"]), "--ar-model", str(models["causal"]), *args,
                 "--length", "1000"]) == 2
    assert "context" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_int8_rows_skipped_where_int8_is_slow(models, tmp_path, monkeypatch, capsys):
    """On a CPU without int8 dot-product instructions the int8 rows would time a slow kernel for most
    of the run: they are skipped, and the table and JSON say why."""
    from unmask.bench import configs as C

    monkeypatch.setattr("unmask.bench.harness.int8_speedup_cpu", lambda: 0.125)
    keep = {C.REFERENCE, "topk-L", C.MAIN, C.MAIN + "-int8", C.AR, C.AR + "-int8"}
    monkeypatch.setattr(C, "CONFIGS", tuple(x for x in C.CONFIGS if x[1].name in keep))
    old = torch.get_num_threads()
    try:
        rc = main(["bench", "--model", str(models["block"]), "--ar-model", str(models["causal"]), "--quick",
                   "--threads", "1", "--json", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    res = json.loads((tmp_path / "b.json").read_text())
    int8 = {C.MAIN + "-int8", C.AR + "-int8"}
    assert {sk["config"] for sk in res["skipped"]} == int8
    assert all("8.0x slower than fp32" in sk["reason"] for sk in res["skipped"])
    assert {r["config"] for r in res["runs"]} == keep - int8
    assert f"skipped {C.MAIN}-int8: int8 matmul measured 8.0x slower" in capsys.readouterr().out
