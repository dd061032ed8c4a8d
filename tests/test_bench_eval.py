"""benchmarks/bench_eval.py's smoke run (--quick): it trains its model, runs torchattacks' components and both
robust_ext versions on the same points, counts passes and writes the JSON the report script reads."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_bench_eval_quick_run(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_eval
        import report
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "bench_eval.json"
    bench_eval.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "models")])
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert set(run["rows"]) == {"torchattacks", "standard.fp32", "fast.fp32"} | (
        {"standard.bf16"} if doc["config"]["bf16_row"] else set())
    peer, std, fast = run["rows"]["torchattacks"], run["rows"]["standard.fp32"], run["rows"]["fast.fp32"]
    for row in (peer, std, fast):
        assert list(row["attacks"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
        ce = row["attacks"]["apgd-ce"]
        assert ce["attacked"] > 0 and ce["forward_per_point"] > 0 and ce["backward_per_point"] > 0
        assert row["attacks"]["square"]["backward_per_point"] == 0  # black box: no gradient
    # the same points: every run starts from the same clean accuracy; fast's FAB-T runs on every point APGD
    # left, on 3 targets (a third of standard's backward passes); Square only after FAB-T fooled one
    assert peer["accuracy_after"]["clean"] == std["accuracy_after"]["clean"] == fast["accuracy_after"]["clean"]
    n = run["n"]
    assert fast["attacks"]["fab-t"]["attacked"] == round(fast["accuracy_after"]["apgd-t"] * n)
    fab_fooled = fast["accuracy_after"]["fab-t"] < fast["accuracy_after"]["apgd-t"]
    assert fast["attacks"]["square"]["attacked"] == (round(fast["accuracy_after"]["fab-t"] * n) if fab_fooled else 0)
    if fast["attacks"]["fab-t"]["attacked"] and std["attacks"]["fab-t"]["attacked"]:
        assert fast["attacks"]["fab-t"]["backward_per_point"] < std["attacks"]["fab-t"]["backward_per_point"]
    assert fast["attacks"]["apgd-t"]["backward_per_point"] < std["attacks"]["apgd-t"]["backward_per_point"]
    assert any("fast within 0.3 pt of standard" in k for k in doc["targets"])
    table = "\n".join(report.bench_eval(doc))
    assert "| mnist_standard | linf 0.1 | fast.fp32 |" in table
