"""`firm shapes pretrain-critic-base`: the recipe trains, evaluates every question kind, and saves a loadable base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from firm.synthetic.grounding import KINDS
from firm.synthetic.recipes.critic_base import CriticBaseConfig, exact_match, export_base, pretrain_critic_base

TINY = {"rope_theta": 10.0, "grounding_texts": True, "layers": 1, "vision_depth": 1, "corpus_samples": 40}


@pytest.mark.slow
def test_pretraining_runs_and_saves_a_loadable_base(tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    cfg = CriticBaseConfig(
        out=str(tmp_path / "run"), steps=6, batch_size=8, eval_every=3, eval_items=3, vision_warmup=100,
        critic=dict(TINY), threads=1,
    )  # fmt: skip
    summary = pretrain_critic_base(cfg)
    run = tmp_path / "run"
    curves = json.loads((run / "curves.json").read_text())
    assert [r["step"] for r in curves] == [0, 3, 6]
    assert set(curves[-1]["exact"]) == set(KINDS)
    assert summary["target_met"] is False and summary["reached_target_at"] is None  # 6 steps: the check can fail
    # the vision warm-up taught the tower to read every cell (fresh scenes each step, so this is held-out)
    assert summary["vision_warmup"][-1]["cell_accuracy"] >= 0.9
    assert (run / "curves.png").is_file()
    before, after = load_file(run / "init" / "model.safetensors"), load_file(run / "base" / "model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    assert all(torch.isfinite(v).all() for v in after.values())
    model = Qwen3VLForConditionalGeneration.from_pretrained(run / "base")
    assert model.config.text_config.rope_parameters["rope_theta"] == 10.0
    dest = export_base(run, tmp_path / "shipped")
    record = json.loads((dest / "pretrain.json").read_text())
    assert record["steps"] == 6 and len(record["curves"]) == 3
    assert (dest / "tokenizer.json").is_file() and (dest / "preprocessor_config.json").is_file()


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the next label (or on token 0 where ``wrong`` says so)."""

    def __init__(self, wrong: int | None = None) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids, labels_for_test, **_):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, 8)
        nxt = labels_for_test[:, 1:].clamp(min=0)
        logits[:, :-1].scatter_(-1, nxt[..., None], 1.0)
        if self.wrong is not None:
            logits[:, self.wrong, :] = 0
            logits[:, self.wrong, 7] = 5.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_needs_every_answer_token():
    labels = torch.tensor([-100, -100, 3, 4, 5])
    ex = {"input_ids": torch.tensor([1, 2, 3, 4, 5]), "attention_mask": torch.ones(5, dtype=torch.long)}
    ex["labels"] = labels
    examples = [(dict(ex), "a")]

    class Wrap(torch.nn.Module):
        def __init__(self, wrong=None):
            super().__init__()
            self.inner = _Oracle(wrong)

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids, labels.expand_as(input_ids))

    assert exact_match(Wrap(), examples, pad=0) == 1.0
    assert exact_match(Wrap(wrong=2), examples, pad=0) == 0.0  # one wrong answer token: not exact
    assert exact_match(Wrap(wrong=0), examples, pad=0) == 1.0  # a wrong prompt position does not count


def test_the_committed_base_sees_and_grounds():
    """The shipped base loads like Qwen3-VL-8B-Instruct and answers held-out single-image questions (its pretrain.json
    records 1.00 / 0.98 on gen_cell / cell); a random init of the same config answers none."""
    from transformers import Qwen3VLForConditionalGeneration

    from firm.critics.sft_data import ChatExampleEncoder
    from firm.paths import shipped
    from firm.synthetic.recipes.critic_base import heldout_set

    path = shipped("firm/synthetic/checkpoints/shapes_critic")
    record = json.loads((path / "pretrain.json").read_text())
    model = Qwen3VLForConditionalGeneration.from_pretrained(path).eval()
    assert model.config.text_config.rope_parameters["rope_theta"] == 10.0
    assert record["heldout_exact_final"]["gen_cell"] >= 0.95
    cfg = CriticBaseConfig(eval_items=16, grounding={"kinds": ["gen_cell"]})
    encoder = ChatExampleEncoder(str(path), max_length=512)
    held = heldout_set(cfg, encoder)
    assert exact_match(model, held["gen_cell"], encoder.pad_token_id) >= 0.85
    torch.manual_seed(0)
    random_init = Qwen3VLForConditionalGeneration(model.config).eval()
    assert exact_match(random_init, held["gen_cell"], encoder.pad_token_id) <= 0.2


def test_command_settings_are_typed_and_checked():
    from firm.synthetic.recipes.cli import _settings
    from firm.synthetic.recipes.critic_proof import ProofConfig

    got = _settings(CriticBaseConfig, ["threads=2", "init=runs/x/base", "adaptive=no", "lr=1e-4"], "t")
    assert got == {"threads": 2, "init": "runs/x/base", "adaptive": False, "lr": 1e-4}
    assert _settings(ProofConfig, ["arms=curated", "steps=10", "base="], "t") == {
        "arms": ["curated"], "steps": 10, "base": "",
    }  # fmt: skip
    for bad in (["adaptive=maybe"], ["steps=ten"], ["nope=1"], ["threads"]):
        with pytest.raises(SystemExit):
            _settings(CriticBaseConfig, bad, "t")
    with pytest.raises(ValueError, match="score_only"):
        ProofConfig(answer_order="reasoning_first")  # the uncurated arm's reasoning would leak the rule's score
    assert ProofConfig(arms=["curated"], answer_order="reasoning_first").answer_tokens == 160
