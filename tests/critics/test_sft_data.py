"""CriticSFTDataModule: chat-formatted critic examples with labels on the answer tokens only (tiny local Qwen3-VL)."""

import pytest
import torch

from firm.critics import PromptSet, explain_boxed_score, explain_json_score, explain_quality_scores
from firm.critics.sft_data import IGNORE_INDEX, ChatExampleEncoder, CriticSFTDataModule, collate_examples
from firm.critics.sft_render import CriticSFTRenderer, format_answer
from firm.data.writer import write_shards
from tests.helpers.data import edit_sample, generation_sample
from tests.helpers.tiny_vlm import build_tiny_vlm


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("sft") / "tiny-critic")


@pytest.fixture
def curated(tmp_path):
    edits = [edit_sample(i, size=40) for i in range(4)]
    for s in edits:
        s["consistency"], s["consistency_reasoning"] = 4, "the background stayed the same"
    edits[3]["execution_reasoning"] = ""  # no reasoning: not an Execution example
    gens = [generation_sample(i, size=40) for i in range(2)]
    write_shards(edits, tmp_path / "c" / "edit", "edit")
    write_shards(gens, tmp_path / "c" / "gen", "generation")
    return tmp_path / "c"


def test_answer_formats_parse_back_with_the_critic_parsers():
    assert explain_json_score(format_answer("execution", 4, 'the "cup" is red')).value == 4
    assert explain_json_score(format_answer("consistency", 2, "two new objects")).reasoning == "two new objects"
    assert explain_boxed_score(format_answer("instruction", 3, "1. circle: yes\n2. red: no")).value == 3
    aspects = {"aesthetics": 4, "technical": 2, "structure": 5}
    assert explain_quality_scores(format_answer("quality", 2, "noisy", aspects)).value == aspects


def test_score_first_and_score_only_answers_parse_back_and_put_the_score_first():
    for order in ("score_first", "score_only"):
        edit = format_answer("execution", 2, "the circle is still red", order=order)
        inst = format_answer("instruction", 4, "1. circle: yes", order=order)
        assert edit.startswith('{"score": 2') and inst.startswith("\\boxed{4}")
        assert explain_json_score(edit).value == 2 and explain_boxed_score(inst).value == 4
        want = "" if order == "score_only" else "the circle is still red"
        assert explain_json_score(edit).reasoning == want
        assert explain_boxed_score(inst).reasoning == ("" if order == "score_only" else "1. circle: yes")
    # a score-first answer cut short (a small max_new_tokens in RL) still gives its score
    assert explain_json_score(format_answer("consistency", 3, "two new objects", order="score_first")[:16]).value == 3
    with pytest.raises(ValueError, match="answer order"):
        format_answer("execution", 2, "x", order="score_last")
    with pytest.raises(ValueError, match="answer_order"):
        CriticSFTRenderer(answer_order="last")


def test_only_answer_tokens_are_unmasked(tiny_vlm):
    from firm.critics.local import ChatEncoder

    enc = ChatExampleEncoder(str(tiny_vlm))
    sample = {**edit_sample(1, size=40), "__schema__": "edit"}
    messages, answer = CriticSFTRenderer()(sample, "execution")
    ex = enc.encode(messages, answer)
    ids, labels = ex["input_ids"], ex["labels"]
    answer_mask = labels != IGNORE_INDEX
    n_answer = int(answer_mask.sum())
    tok = enc.tokenizer
    expected = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    # the unmasked tokens are exactly the answer and its end-of-turn token, at the very end
    assert labels[answer_mask].tolist() == expected and ids[-n_answer:].tolist() == expected
    assert bool(answer_mask[-n_answer:].all()) and not bool(answer_mask[:-n_answer].any())
    assert tok.decode(labels[answer_mask]) == answer + tok.eos_token
    # the prompt part is token-for-token what the critic sees at inference (images expanded the same way)
    infer = ChatEncoder(tiny_vlm)([messages])
    assert ids[:-n_answer].tolist() == infer["input_ids"][0].tolist()
    assert torch.equal(ex["pixel_values"], infer["pixel_values"])
    assert ex["mm_token_type_ids"][-n_answer:].sum() == 0


def test_collate_pads_right_and_masks_padding():
    a = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long)}
    a["labels"] = torch.tensor([IGNORE_INDEX, 6, 7])
    a["pixel_values"] = torch.zeros(4, 2)
    b = {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long)}
    b["labels"] = torch.tensor([8])
    b["pixel_values"] = torch.ones(2, 2)
    batch = collate_examples([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["pixel_values"].shape == (6, 2)


def test_datamodule_batches_train_the_tiny_critic(tiny_vlm, curated):
    from transformers import AutoModelForImageTextToText

    cfg = CriticSFTDataModule.Config(
        train_shards=str(curated), processor=str(tiny_vlm), batch_size=3, num_workers=2, max_length=2048
    )
    dm = CriticSFTDataModule(cfg)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    judged = sorted((k, j) for b in batches for k, j in zip(b["__key__"], b["__judgement__"]))
    # 4 edits x 2 judgements - 1 without reasoning; 2 generations x (instruction, quality)
    assert len(judged) == 11 and len(set(judged)) == 11
    assert ("edit-00003", "execution") not in judged and ("gen-00001", "quality") in judged

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32)
    batch = {k: v for k, v in batches[0].items() if not k.startswith("__")}
    assert batch["image_grid_thw"].shape[0] == sum(
        2 if j in ("execution", "consistency") else 1 for j in batches[0]["__judgement__"]
    )
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_renderer_is_injected_and_prompt_matches_critic(tiny_vlm, curated):
    seen = []

    def render(sample, judgement):
        seen.append(judgement)
        if judgement != "execution":
            return None
        return PromptSet().messages("edit_execution", [sample["source"], sample["edited"]], instruction="x"), "ok"

    cfg = CriticSFTDataModule.Config(train_shards=str(curated), processor=str(tiny_vlm), num_workers=0)
    dm = CriticSFTDataModule(cfg, render=render)
    dm.setup()
    examples = [e for e in dm.train_set]
    assert len(examples) == 4 and {e["__judgement__"] for e in examples} == {"execution"}
    assert set(seen) == {"execution", "consistency", "instruction", "quality"}
    with pytest.raises(ValueError, match="unknown judgement"):
        CriticSFTDataModule(CriticSFTDataModule.Config(judgements=["vibes"]))


def test_sft_prompt_tokens_equal_the_local_critics_with_downscaled_non_rgb_images(tiny_vlm):
    """Training and inference share firm.data.chat: the same image preparation, template and tokens."""
    from PIL import Image

    from firm.critics import EditRequest
    from firm.critics.local import LocalCritic

    source = Image.new("RGBA", (60, 50), (255, 0, 0, 128))  # 3000 pixels, not RGB: converted and downscaled
    edited = Image.new("L", (56, 56), 90)
    critic = LocalCritic(LocalCritic.Config(model=str(tiny_vlm), max_image_pixels=1200))
    job = critic.judgement_jobs([EditRequest(source, edited, "make it blue", dimensions=("execution",))])[0]
    infer = critic.encoder([job.messages])  # what generate() feeds the model

    messages = PromptSet().messages("edit_execution", [source, edited], instruction="make it blue")  # raw images
    ex = ChatExampleEncoder(str(tiny_vlm), max_image_pixels=1200).encode(messages, "ok")
    n_answer = int((ex["labels"] != IGNORE_INDEX).sum())
    assert ex["input_ids"][:-n_answer].tolist() == infer["input_ids"][0].tolist()
    assert torch.equal(ex["pixel_values"], infer["pixel_values"])
    assert torch.equal(ex["image_grid_thw"], infer["image_grid_thw"])
    assert ex["mm_token_type_ids"][:-n_answer].tolist() == infer["mm_token_type_ids"][0].tolist()


def test_the_default_renderer_and_its_old_name_give_the_critics_renderer(tiny_vlm):
    dm = CriticSFTDataModule(CriticSFTDataModule.Config(processor=str(tiny_vlm), num_workers=0))
    assert isinstance(dm.renderer(), CriticSFTRenderer)
    old = CriticSFTDataModule.Config(
        processor=str(tiny_vlm), num_workers=0, renderer="firm.curation.sft:CriticSFTRenderer"
    )  # what run directories written before the move hold
    with pytest.warns(UserWarning, match="is now 'firm.critics.sft_render:CriticSFTRenderer'"):
        assert isinstance(CriticSFTDataModule(old).renderer(), CriticSFTRenderer)
