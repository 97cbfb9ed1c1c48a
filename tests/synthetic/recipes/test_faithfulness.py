"""`firm shapes faithfulness`: the demo RL under the rule, a trained (here: untrained tiny) and the hallucinating
critic, end to end in a few RL steps; the critic override replaces the demo's critic section wholesale."""

import json
import math
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[3] / "experiments" / "demo"


@pytest.fixture(scope="module")
def tiny_critic(tmp_path_factory) -> Path:
    from firm.synthetic.tiny_critic import TinyCriticConfig, build_tiny_critic

    small = TinyCriticConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, vision_depth=1, vision_hidden=32,
                             vocab_size=500, corpus_samples=20)  # fmt: skip
    return Path(build_tiny_critic(tmp_path_factory.mktemp("critic") / "tiny-critic", small))


def test_critic_override_replaces_the_section(tiny_critic):
    from firm.config import load_experiment
    from firm.synthetic.recipes.faithfulness import critic_arms

    arms = critic_arms(["rule", "trained", "hallucinating"], str(tiny_critic), prompts={"system": "sys.txt"})
    cfgs = {a.name: load_experiment(DEMO / "shapes_edit_cme.yaml", list(a.overrides)).module for a in arms}
    trained = cfgs["trained"].critic
    assert trained.name == "local" and trained.model == str(tiny_critic) and trained.max_new_tokens == 12
    assert "shapes" not in trained and trained.prompts.system == "sys.txt"  # nothing of shapes_rule is left
    assert cfgs["hallucinating"].critic.name == "shapes_hallucinating"
    assert list(cfgs["hallucinating"].critic.shapes) == list(cfgs["rule"].critic.shapes)  # the world's shapes
    for m in cfgs.values():  # the held-out report is configured the same in every arm (it scores with the rule critic)
        assert m.callbacks == cfgs["rule"].callbacks
    with pytest.raises(ValueError, match="--critic-model"):
        critic_arms(["trained"])


def test_truncated_score_first_json_parses():
    from firm.critics.parsing import parse_json_score

    assert parse_json_score('{"score": 4, "reaso') == 4  # what a 12-token budget leaves of a score-first answer


@pytest.mark.slow
def test_faithfulness_end_to_end(tmp_path, monkeypatch, tiny_critic):
    from firm.synthetic.recipes.faithfulness import run_faithfulness

    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    overrides = [
        # 2 RL steps in one epoch: an untrained critic answers nothing parseable, so its arm makes no optimizer
        # step and must end with the epoch rather than at max_steps
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "module.callbacks.shapes_report.n_tasks=3",
        "module.callbacks.shapes_report.seeds=[0]",
        "module.callbacks.shapes_report.every=1",
        "module.callbacks.shapes_report.curve_tasks=2",
        "module.callbacks.shapes_report.progress=false",
        "module.rollout_chunk=8",
        "data.n_prompts=4",
        "data.group_size=4",
        "data.batch_size=8",
        f"data.cache_dir={tmp_path / 'data'}",
    ]
    out = tmp_path / "faith"
    md = run_faithfulness(out, critic_model=str(tiny_critic), steps=2, batch_size=16, overrides=overrides)
    for name in ("faithfulness.md", "faithfulness.json", "faithfulness.png"):
        assert (out / name).is_file()
    text = md.read_text()
    for label in ("rule critic (oracle)", "trained critic", "hallucinating critic", "base (pretrained)"):
        assert f"| {label} |" in text or f"| RL | {label} |" in text
    result = json.loads((out / "faithfulness.json").read_text())
    runs = result["runs"]
    assert [(r["critic"], r["seed"]) for r in runs] == [(c, s) for c in ("rule", "trained", "hallucinating")
                                                        for s in (0, 1)]  # fmt: skip
    assert len({r["run_dir"] for r in runs}) == 6
    for r in runs:
        for part in ("base", "trained"):
            assert all(math.isfinite(v) for v in r["summary"][part].values())
        assert len(r["curves"]["reward/mean"]) == 2
    by = {(r["critic"], r["seed"]): r for r in runs}
    for s in (0, 1):
        rule, trained, hall = by["rule", s]["curves"], by["trained", s]["curves"], by["hallucinating", s]["curves"]
        assert all(a > 0 for a in rule["adv/abs_mean"])  # the rule critic's rewards give a learning signal
        assert all(m == 1.0 for m in trained["reward/missing_frac"])  # the untrained critic scores nothing
        assert hall["reward/mean"] != rule["reward/mean"]  # same rollouts at step 1, other scores
        assert len(rule["heldout/reward"]) == 2  # the intermediate held-out curve (rule critic) was read
    # the untrained critic never moved the policy: its trained model is the base model
    assert by["trained", 0]["summary"]["trained"] == by["trained", 0]["summary"]["base"]
    assert by["rule", 0]["summary"]["trained"] != by["rule", 1]["summary"]["trained"]  # seeds differ


def test_cli_checks_its_arguments(tmp_path):
    from firm.cli import main

    with pytest.raises(ValueError, match="--critic-model"):
        main(["shapes", "faithfulness", "--critics", "trained", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="TEMPLATE=PATH"):
        main(["shapes", "faithfulness", "--critic-prompts", "system", "--out", str(tmp_path)])
