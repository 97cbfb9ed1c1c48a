"""Scorers that call an official reward package, served by `firm reward serve` from that package's own environment.

They are not in :mod:`firm.registry`: their packages cannot live in FIRM's environment (HPSv2 vendors an open_clip
fork and wants torchvision; ImageReward's BLIP text encoder imports helpers that transformers 4.46+ no longer
exports, so it needs transformers 4.45 and the hub / datasets / diffusers releases that go with it).
:mod:`firm.rewards.serve` registers them (its ``OFFICIAL`` table) when it serves one, and scripts/reward_venv.sh
builds the environment. Each imports its package when it is built, and says which package is missing otherwise.

* ``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al. 2023), package ``hpsv2`` (github.com/tgxs002/HPSv2),
  weights ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt`` from the hub repo ``xswu/HPSv2``. The model is built
  by the package's own ``create_model_and_transforms`` with the arguments of ``hpsv2.img_score.initialize_model``
  (ViT-H-14), its weights replaced by the checkpoint's ``state_dict`` (a strict load), and scored as
  ``hpsv2.img_score.score`` scores: the package's ``preprocess_val`` and tokenizer, the cosine of the normalised image
  and text features (no logit scale), under float16 autocast on CUDA.
* ``image_reward``: ImageReward v1.0 (Xu et al. 2023), package ``image-reward`` (github.com/THUDM/ImageReward),
  weights ``ImageReward.pt`` and ``med_config.json`` from the hub repo ``THUDM/ImageReward``. The package's
  ``ImageReward`` model class, loaded as ``ImageReward.load`` loads a local file (``load_state_dict(strict=False)``;
  here a checkpoint that lacks a weight the score uses is refused), scored as ``ImageReward.score`` scores: the prompt
  padded to 35 tokens, BLIP's cross-attending text encoder over the image, the [CLS] feature through the MLP head,
  standardised with the package's mean and std. BLIP builds its tokenizer with
  ``BertTokenizer.from_pretrained("bert-base-uncased")``: the server needs that tokenizer from the hub or the
  Hugging Face cache (``HF_HUB_OFFLINE=1`` with a filled cache).

Both score a generated image against its prompt, and an edit's edited image against its instruction (the source is
not used), batched (the packages score one image at a time; the features of one request do not depend on the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image, request_text, resolve_device


def _package(module: str, distribution: str) -> Any:
    """Import an official package, or say clearly that this environment lacks it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the official package {distribution!r} (import name {module}) cannot be imported here ({e}); serve this "
            f"scorer from an environment that has it: scripts/reward_venv.sh"
        ) from e


def _weights(path: str, what: str) -> dict:
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"{what}: checkpoint file not found: {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs


class HPSv2Scorer(Scorer):
    """HPSv2 / HPSv2.1 through the official ``hpsv2`` package (see the module docstring)."""

    requires = ("hpsv2",)
    outputs = ("hpsv2",)

    @dataclass
    class Config(ScorerConfig):
        name: str = "hpsv2"
        checkpoint: str = ""  # HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) from xswu/HPSv2
        architecture: str = ""  # an open_clip model-config JSON to build instead of ViT-H-14 (a test's tiny model)
        amp: bool = True  # on CUDA, score under float16 autocast as hpsv2.img_score does (off: float32)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        _package("hpsv2", "hpsv2")
        from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer

        self.device = resolve_device(config.device)
        arch = "ViT-H-14"  # hpsv2.img_score.initialize_model
        if config.architecture:
            add_model_config(config.architecture)  # registered under the file's stem
            arch = Path(config.architecture).stem
        state = _weights(config.checkpoint, "hpsv2")
        # initialize_model's arguments, but no pretrained CLIP download: the checkpoint replaces every weight.
        model, _, preprocess = create_model_and_transforms(
            arch,
            None,
            precision="amp",
            device=self.device,
            jit=False,
            force_quick_gelu=False,
            force_custom_text=False,
            force_patch_dropout=False,
            force_image_size=None,
            pretrained_image=False,
            image_mean=None,
            image_std=None,
            light_augmentation=True,
            aug_cfg={},
            output_dict=True,
            with_score_predictor=False,
            with_region_predictor=False,
        )
        model.load_state_dict(state["state_dict"] if "state_dict" in state else state)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = get_tokenizer(arch)

    def score_batch(self, requests: list[Any]) -> Scores:
        # RGB always: the package keeps an RGBA image's alpha as a fourth channel, which the ViT cannot take.
        images = torch.stack([self.preprocess(request_image(r).convert("RGB")) for r in requests]).to(self.device)
        texts = self.tokenizer([request_text(r) for r in requests]).to(self.device)
        amp = self.config.amp and self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = self.model(images, texts)
            scores = (out["image_features"] * out["text_features"]).sum(-1)  # diag(image @ text.T)
        return Scores({"hpsv2": scores.float()})


class ImageRewardScorer(Scorer):
    """ImageReward v1.0 through the official ``image-reward`` package (see the module docstring)."""

    requires = ("ImageReward",)
    outputs = ("image_reward",)

    # the parts of the model a score goes through: a checkpoint must hold all their weights
    USED = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")

    @dataclass
    class Config(ScorerConfig):
        name: str = "image_reward"
        checkpoint: str = ""  # ImageReward.pt from THUDM/ImageReward
        med_config: str = ""  # med_config.json from THUDM/ImageReward (BLIP's text-encoder config)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        _package("ImageReward", "image-reward")
        from ImageReward import ImageReward as Model

        self.device = resolve_device(config.device)
        if not config.med_config or not Path(config.med_config).is_file():
            raise FileNotFoundError(f"image_reward: med_config file not found: {config.med_config!r}")
        state = _weights(config.checkpoint, "image_reward")
        # ImageReward.load's steps for a local file, with a tensors-only torch.load
        model = Model(device=str(self.device), med_config=config.med_config).to(self.device)
        result = model.load_state_dict(state, strict=False)
        absent = [k for k in result.missing_keys if k.startswith(self.USED)]
        if absent:
            raise ValueError(
                f"image_reward: the checkpoint lacks {len(absent)} weights the score uses, e.g. {absent[:3]}"
            )
        self.model = model.eval()

    def score_batch(self, requests: list[Any]) -> Scores:
        m = self.model
        # ImageReward.score: the prompt padded / cut to 35 tokens, the package's 224 px preprocessing
        text = m.blip.tokenizer(
            [request_text(r) for r in requests],
            padding="max_length",
            truncation=True,
            max_length=35,
            return_tensors="pt",
        ).to(self.device)
        images = torch.stack([m.preprocess(request_image(r)) for r in requests]).to(self.device)
        with torch.inference_mode():
            image_embeds = m.blip.visual_encoder(images)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = m.blip.text_encoder(
                text.input_ids,
                attention_mask=text.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            ).last_hidden_state
            rewards = (m.mlp(hidden[:, 0, :].float()) - m.mean) / m.std
        return Scores({"image_reward": rewards[:, 0].float()})
