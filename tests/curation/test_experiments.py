"""The tiny shapes-world curation YAMLs run end to end (and resume as a no-op). That every shipped curation YAML
validates is tested in tests/test_config.py, with the other commands' YAMLs."""

import json

import pytest

from firm.curation.runner import load_curation, run_curation
from firm.data.inspect import inspect_shards
from firm.paths import experiments_root


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,schema,dim", [("shapes_edit_tiny", "edit", "execution"), ("shapes_gen_tiny", "generation", "instruction")]
)
def test_tiny_curation_runs_and_relaunch_is_a_no_op(tmp_path, name, schema, dim):
    path = experiments_root() / "curation" / f"{name}.yaml"
    overrides = [f"output_dir={tmp_path}", "progress=false", "source.count=40"]
    m = run_curation(load_curation(path, overrides))
    run_dir = tmp_path / name
    assert m["counts"]["scored"] == 40 and m["counts"]["failed"] == 0 and m["counts"]["rewritten"] > 0
    assert m["output"] == "final" and m["output_shards"]
    assert set(m["histograms"]) == {"scored", "with_rewrites", "final"}
    before, after = m["histograms"]["scored"][dim], m["histograms"]["with_rewrites"][dim]
    assert sum(after[s] for s in "12") > sum(before[s] for s in "12"), "rewrites add low scores"
    assert all(len(h) == 16 for h in m["prompt_templates"].values())
    assert m["teachers"]["rewriter"] == "shapes_rule"
    rep = inspect_shards(run_dir / "final", progress=False)
    assert rep.samples == m["counts"]["final"] and rep.per_schema == {schema: rep.samples}
    assert rep.histograms[f"{schema}.{dim}"] == m["histograms"]["final"][dim]
    assert (run_dir / "histograms.png").stat().st_size > 1000
    saved = json.loads((run_dir / "manifest.json").read_text())
    assert saved["counts"] == m["counts"]

    again = run_curation(load_curation(path, overrides + ["concurrency.max_in_flight=1"]))
    assert again["this_launch"]["score"]["processed"] == 0 and again["this_launch"]["score"]["resumed_skipped"] == 40
    assert again["counts"] == m["counts"] and again["this_launch"]["teacher_calls"] == {}
