import argparse
import csv
import json

import pytest

from firm.kernels import bench
from tests.kernels.utils import gpu, interpreter


def test_bench_on_cpu_runs_checks_and_writes_results(tmp_path, capsys):
    rows = bench.run_bench(bench.OPS, dtype="bf16", out_dir=tmp_path)
    out = capsys.readouterr().out
    assert "timings, GB/s and memory need a CUDA device" in out
    assert {r["op"] for r in rows} == set(bench.OPS)
    for r in rows:
        assert r["impl"] == "eager" and r["dtype"] == "fp32" and r["ms"] is None
        assert r["max_err"] < 1e-5, r
        if r["op"] != "group_advantages":
            assert r["grad_err"] < 1e-6, r
    (csv_path,) = tmp_path.glob("*.csv")
    (json_path,) = tmp_path.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["device"].startswith("cpu") and len(doc["rows"]) == len(rows)
    with csv_path.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_profile_on_cpu_writes_trace(tmp_path):
    trace = bench.run_profile(("step_log_prob",), out_dir=tmp_path, steps=1)
    assert trace.exists() and "traceEvents" in trace.read_text()[:2000]


def test_firm_cli_kernels_time(tmp_path, capsys):
    from firm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["kernels", "time", "--quick", "--ops", "group_advantages", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    assert "group_advantages" in capsys.readouterr().out
    assert list(tmp_path.glob("*.json"))


def test_cli_options_match_python_module():
    from firm import kernels_cli

    def options(add):
        p = argparse.ArgumentParser()
        add(p)
        return {a.dest: a.default for a in p._actions if a.dest != "help"}

    firm_bench = argparse.ArgumentParser()
    firm_bench.add_argument("--quick", action="store_true")
    kernels_cli._common(firm_bench)
    assert {a.dest: a.default for a in firm_bench._actions if a.dest != "help"} == options(bench.add_bench_args)


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit, match="unknown op"):
        bench.main(["--ops", "softmax"])


@interpreter
def test_bench_runs_triton_in_interpreter(tmp_path):
    rows = bench.run_bench(("step_log_prob",), dtype="fp32", out_dir=tmp_path)
    triton_rows = [r for r in rows if r["impl"] == "triton"]
    assert triton_rows and all(r["max_err"] < 1e-5 and r["grad_err"] < 1e-6 for r in triton_rows)


@gpu
def test_bench_times_all_impls_on_cuda(tmp_path):
    rows = bench.run_bench(("step_log_prob", "group_advantages"), dtype="bf16", quick=True, out_dir=tmp_path)
    assert {r["impl"] for r in rows} == {"eager", "compile", "triton"}
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0 and 0 < r["pct_copy"] and r["peak_mib"] >= 0
        assert r["max_err"] < 1e-3, r
