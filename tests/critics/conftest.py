"""Fixtures: tiny Qwen3-VL critics built locally (random, and taught a fixed answer), saved and loaded back."""

import shutil

import pytest
from PIL import Image

from tests.helpers.tiny_vlm import build_tiny_vlm, teach_answer

TAUGHT_ANSWER = '{"reasoning": "ok", "score": 4}'
TAUGHT_INSTRUCTION = "make it blue"


def taught_images():
    """The (source, edited) pair the taught critic was trained on."""
    return Image.new("RGB", (48, 40), (255, 0, 0)), Image.new("RGB", (48, 40), (0, 0, 255))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """Directory of a tiny random Qwen3-VL checkpoint (model, tokenizer, image processor, chat template)."""
    return build_tiny_vlm(tmp_path_factory.mktemp("critic") / "tiny-critic")


@pytest.fixture(scope="session")
def taught_vlm(tiny_vlm, tmp_path_factory):
    """(checkpoint dir, PromptConfig): the tiny critic fine-tuned to answer TAUGHT_ANSWER to short edit prompts."""
    from firm.critics import PromptConfig, PromptSet

    root = tmp_path_factory.mktemp("taught")
    path = root / "taught-critic"
    shutil.copytree(tiny_vlm, path)
    (root / "exec.txt").write_text("Execution of: {instruction}")
    (root / "cons.txt").write_text("Consistency of: {instruction}")
    prompts = PromptConfig(edit_execution=str(root / "exec.txt"), edit_consistency=str(root / "cons.txt"))
    ps = PromptSet(prompts)
    src, out = taught_images()
    convs = [
        ps.messages(name, [src, out], instruction=TAUGHT_INSTRUCTION) for name in ("edit_execution", "edit_consistency")
    ]
    teach_answer(path, TAUGHT_ANSWER, convs, steps=60)
    return path, prompts
