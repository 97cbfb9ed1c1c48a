"""Prompt templates: rubric facts present, placeholders filled, file overrides validated, images placed."""

import pytest
from PIL import Image

from firm.critics import DEFAULT_TEMPLATES, PromptConfig, PromptSet
from firm.critics.prompts import render_template


def _img(c=(0, 0, 0)):
    return Image.new("RGB", (8, 8), c)


def test_consistency_template_carries_the_rubric():
    t = DEFAULT_TEMPLATES["edit_consistency"]
    for fact in [
        "5 - only the requested changes",
        "4 - one significant unintended change, and/or one or two minor",
        "3 - two or three significant unintended changes, and/or three or four minor",
        "2 - four or more significant unintended changes, and/or five or more minor",
        "1 - the image is almost entirely different",
        "revealed or hidden as a natural effect of the edit",  # occlusion effects are not counted
        "lighting",  # small quality / lighting shifts are not counted
        "explicitly replaces",
        "direct physical consequences",
        '"score": <1-5>',
    ]:
        assert fact in t


def test_generation_templates_carry_the_rubric_and_output_formats():
    gi = DEFAULT_TEMPLATES["gen_instruction"]
    for fact in [
        "negative constraints",
        "one or two non-critical details",
        "main subject is present",
        "most of the main subjects",
        "nothing to do with the prompt",
        "\\boxed{",
    ]:
        assert fact in gi
    gq = DEFAULT_TEMPLATES["gen_quality"]
    assert all(k in gq for k in ("aesthetics", "technical_quality", "structure_texture"))
    assert "{prompt}" in DEFAULT_TEMPLATES["planner"] and "numbered list" in DEFAULT_TEMPLATES["planner"]


def test_render_fills_known_placeholders_and_leaves_json_braces():
    out = render_template('Do {instruction}. Answer {"score": N} {unknown}', instruction="make it red")
    assert out == 'Do make it red. Answer {"score": N} {unknown}'


def test_messages_put_images_first_and_format_the_checklist():
    p = PromptSet()
    src, out = _img(), _img((255, 0, 0))
    msgs = p.messages("edit_execution", [src, out], instruction="turn the car red")
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    content = msgs[0]["content"]
    assert content[0] == {"type": "image", "image": src} and content[1]["image"] is out
    assert "Editing instruction: turn the car red" in content[2]["text"]
    gen = p.messages("gen_instruction", [src], prompt="a red car", checklist=["a car", "it is red"])
    assert "1. a car\n2. it is red" in gen[0]["content"][-1]["text"]
    with pytest.raises(ValueError, match="shows 2 image"):
        p.messages("edit_consistency", [src], instruction="x")


def test_templates_and_system_prompt_are_overridable_from_files(tmp_path):
    (tmp_path / "exec.txt").write_text("Before: <image> After: <image> Was '{instruction}' done? JSON please.")
    (tmp_path / "sys.txt").write_text("You are FIRM-Edit.\n")
    p = PromptSet(PromptConfig(edit_execution=str(tmp_path / "exec.txt"), system=str(tmp_path / "sys.txt")))
    a, b = _img(), _img((1, 1, 1))
    msgs = p.messages("edit_execution", [a, b], instruction="add a moon")
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "You are FIRM-Edit."}]}
    kinds = [c["type"] for c in msgs[1]["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert msgs[1]["content"][1]["image"] is a and msgs[1]["content"][3]["image"] is b
    assert "Was 'add a moon' done?" in msgs[1]["content"][4]["text"]
    assert p.sources["edit_execution"] == str(tmp_path / "exec.txt")


def test_bad_template_files_fail_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts.planner: template file .* not found"):
        PromptSet(PromptConfig(planner=str(tmp_path / "missing.txt")))
    (tmp_path / "t.txt").write_text("Rate the edit.")
    with pytest.raises(ValueError, match=r"must contain \{instruction\}"):
        PromptSet(PromptConfig(edit_consistency=str(tmp_path / "t.txt")))
    (tmp_path / "g.txt").write_text("<image><image> {prompt} {checklist}")
    with pytest.raises(ValueError, match="has 2 <image> markers"):
        PromptSet(PromptConfig(gen_instruction=str(tmp_path / "g.txt")))


def test_unknown_placeholders_stay_literal_with_a_warning(tmp_path, caplog):
    (tmp_path / "t.txt").write_text('Did {instruction} happen ({instrution})? Answer {"score": N}.')
    p = PromptSet(PromptConfig(edit_execution=str(tmp_path / "t.txt")))
    assert "{instrution} is not a placeholder of this template" in caplog.text
    text = p.messages("edit_execution", [_img(), _img()], instruction="add {prompt}")[0]["content"][-1]["text"]
    assert text == 'Did add {prompt} happen ({instrution})? Answer {"score": N}.'  # one pass; others literal
