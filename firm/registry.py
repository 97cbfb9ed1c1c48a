"""Registries: plain dicts from a name (as written in YAML) to a component.

A value is the component class itself or a lazy ``"package.module:Attr"`` string, so that `firm list` and
`firm run --dry-run` do not import heavy libraries for components an experiment does not use. Register your own
components with :func:`register` from a module named in the experiment's ``imports:`` list.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

# LightningModules that `firm run` can train.
MODULES: dict[str, Any] = {
    "toy_regression": "firm.toy:ToyRegressionModule",
    # RL algorithms (firm/algorithms/: one file each over the shared RL step of base.py)
    "flow_grpo": "firm.algorithms.flow_grpo:FlowGRPO",  # Flow-GRPO (+ Flow-GRPO-Fast window, CPS)
    "diffusion_nft": "firm.algorithms.diffusion_nft:DiffusionNFT",  # DiffusionNFT
    "mix_grpo": "firm.algorithms.mix_grpo:MixGRPO",  # MixGRPO: sliding SDE window (+ Flash: dpm2 outside it)
    "grpo_guard": "firm.algorithms.grpo_guard:GRPOGuard",  # GRPO-Guard: RatioNorm + 1/|dt| reweighting
    "shapes_pretrain": "firm.synthetic.recipes.pretrain:ShapesPretrainModule",  # tiny base models of the shapes world
    "critic_sft": "firm.critics.sft:CriticSFTModule",  # critic SFT (answer-only CE, full or LoRA)
}

# LightningDataModules.
DATAMODULES: dict[str, Any] = {
    "synthetic_regression": "firm.data.toy:RegressionDataModule",
    "critic_sft": "firm.critics.sft_data:CriticSFTDataModule",
    "prompts": "firm.data.prompts:PromptDataModule",
    "shapes_pairs": "firm.synthetic.recipes.pretrain:ShapesPairsDataModule",  # rendered shapes-world training pairs
    "shapes_prompts": "firm.synthetic.recipes.demo:ShapesPromptDataModule",  # shapes-world RL prompts (exported once)
}

# Model families of the flow policy (firm/policies/families/: one file each, pinned to its diffusers pipeline).
FAMILIES: dict[str, Any] = {
    "sd3": "firm.policies.families.sd3:SD3",  # SD3 / SD3.5 (StableDiffusion3Pipeline)
    "qwen_image": "firm.policies.families.qwen_image:QwenImage",  # Qwen-Image (QwenImagePipeline)
    "qwen_image_edit": "firm.policies.families.qwen_image_edit:QwenImageEdit",  # Qwen-Image-Edit(-2509)
    "flux_kontext": "firm.policies.families.flux_kontext:FluxKontext",  # FLUX.1-Kontext (FluxKontextPipeline)
    "flux2_klein": "firm.policies.families.flux2_klein:Flux2Klein",  # FLUX.2-klein (Flux2KleinPipeline)
    "z_image": "firm.policies.families.z_image:ZImage",  # Z-Image(-Turbo) (ZImagePipeline)
}

# Lightning callbacks an RL module attaches by name (`module.callbacks: {name: {settings}}`).
CALLBACKS: dict[str, Any] = {
    "shapes_report": "firm.synthetic.recipes.demo:ShapesReport",  # shapes world: held-out base vs trained report
}

# Critic backends (local model, OpenAI-compatible HTTP, rule critics): class with a nested Config, built as
# `cls(config)`, implementing `firm.critics.types.Critic`.
CRITICS: dict[str, Any] = {
    "local": "firm.critics.local:LocalCritic",
    "http": "firm.critics.http:HTTPCritic",
    "shapes_rule": "firm.synthetic.critic:ShapesRuleCritic",  # the shapes world's pixel rule critic
    # the rule critic through a seeded bias + noise model of a general VLM judge (the faithfulness experiment)
    "shapes_hallucinating": "firm.synthetic.hallucinating:ShapesHallucinatingCritic",
    "image_stats": "firm.critics.stats:ImageStatsCritic",  # pixel statistics: varied scores for smoke runs
    "delayed": "firm.critics.delayed:DelayedCritic",  # another critic's answers after a set latency (benchmarks)
    "constant": "firm.bench.baselines:ConstantCritic",  # prior-only baseline for benchmark tables
}

# Reward combiners (CME, QMA, baselines): class with a nested Config, built as `cls(config)`.
REWARDS: dict[str, Any] = {
    "cme": "firm.rewards.combiners:CMEReward",
    "qma": "firm.rewards.combiners:QMAReward",
    "weighted_sum": "firm.rewards.combiners:WeightedSumReward",
    "execution_only": "firm.rewards.combiners:ExecutionOnlyReward",
    "instruction_only": "firm.rewards.combiners:InstructionOnlyReward",
}

# Scorers (firm/rewards/scorers/: one file each): requests -> named scores, mixed into the RL reward by
# firm.rewards.mix. Class with a nested Config extending firm.rewards.scorers.base.ScorerConfig, built as `cls(config)`.
SCORERS: dict[str, Any] = {
    "critic": "firm.rewards.scorers.critic:CriticScorer",  # any FIRM critic + its combiner (CME / QMA / ...)
    "delayed": "firm.rewards.scorers.critic:DelayedScorer",  # another scorer's answers after a set latency
    "pickscore": "firm.rewards.scorers.pickscore:PickScoreScorer",  # PickScore_v1 (CLIP ViT-H-14)
    "clip_score": "firm.rewards.scorers.clip_score:CLIPScoreScorer",  # CLIP score (torchmetrics)
    "hpsv3": "firm.rewards.scorers.hpsv3:HPSv3Scorer",  # HPSv3 (Qwen2-VL + reward head)
    "editreward": "firm.rewards.scorers.editreward:EditRewardScorer",  # EditReward (Qwen2.5-VL + reward head)
    "ocr": "firm.rewards.scorers.ocr:OCRScorer",  # quoted-text edit distance, read by GOT-OCR-2.0
    "vlm_judge": "firm.rewards.scorers.judges:VLMJudgeScorer",  # a VLM judge behind an OpenAI-compatible endpoint
    "remote": "firm.rewards.scorers.remote:RemoteScorer",  # a scorer served by `firm reward serve` (own venv)
    "jpeg_compressibility": "firm.rewards.scorers.jpeg:JPEGCompressibilityScorer",  # -JPEG kB / 500 (DDPO, Flow-GRPO)
}

# Curation teachers (firm.curation.teachers.Teacher): class with a nested Config, built as `cls(config)`.
TEACHERS: dict[str, Any] = {
    "local": "firm.curation.teachers:LocalTeacher",
    "http": "firm.curation.teachers:HTTPTeacher",
    "shapes_rule": "firm.synthetic.curation:ShapesRuleTeacher",  # the shapes world's rule teacher (exact, CPU)
    "shapes_general": "firm.synthetic.curation:ShapesGeneralTeacher",  # a general judge's raw scores (uncurated)
}

# Inputs of curation runs: iterables of samples, class with a nested Config.
CURATION_SOURCES: dict[str, Any] = {
    "shards": "firm.curation.sources:ShardsSource",
    "shapes_edit": "firm.synthetic.curation:ShapesEditSource",  # simulated shapes-world edits
    "shapes_gen": "firm.synthetic.curation:ShapesGenSource",  # simulated shapes-world generations
}

# Prompt sets of `firm eval` (firm/eval/items.py: one loader per benchmark format), class with a nested Config.
EVAL_SETS: dict[str, Any] = {
    "gedit": "firm.eval.items:GEditBench",  # GEdit-Bench (EN / CN, 11 task types)
    "imgedit": "firm.eval.items:ImgEditBench",  # ImgEdit Basic-Edit (9 edit types)
    "geneval": "firm.eval.items:GenEvalSet",  # GenEval prompts + metadata
    "jsonl": "firm.eval.items:JsonlPromptSet",  # any {id, prompt[, category][, source]} list
    "shapes_edit": "firm.synthetic.evaluate:ShapesEditSet",  # shapes world, held-out editing tasks
    "shapes_gen": "firm.synthetic.evaluate:ShapesGenSet",  # shapes world, held-out generation tasks
}

# Judges of `firm eval` (firm/eval/judges.py), class with a nested Config, built as `cls(config, kind)`.
JUDGES: dict[str, Any] = {
    "firm_critic": "firm.eval.judges:FirmCriticJudge",  # any critic backend: E/C/CME or I/Q/QMA
    "viescore": "firm.eval.judges:VIEScoreJudge",  # GEdit-Bench: SC, PQ 0-10, overall sqrt(SC*PQ)
    "imgedit": "firm.eval.judges:ImgEditJudge",  # ImgEdit: three 1-5 criteria
    "geneval_vqa": "firm.eval.judges:GenEvalVQAJudge",  # GenEval-style yes/no questions (not the detector)
    "shapes_rule": "firm.synthetic.evaluate:ShapesRuleJudge",  # shapes world: the rule critic's exact scores
}

REGISTRIES: dict[str, dict[str, Any]] = {
    "modules": MODULES,
    "families": FAMILIES,
    "datamodules": DATAMODULES,
    "callbacks": CALLBACKS,
    "critics": CRITICS,
    "rewards": REWARDS,
    "scorers": SCORERS,
    "teachers": TEACHERS,
    "curation_sources": CURATION_SOURCES,
    "eval_sets": EVAL_SETS,
    "judges": JUDGES,
}


def register(registry: str, name: str, obj: Any = None, *, overwrite: bool = False):
    """Add ``name -> obj`` to a registry; usable as a decorator when ``obj`` is omitted."""
    if registry not in REGISTRIES:
        raise KeyError(f"unknown registry {registry!r}; known: {', '.join(sorted(REGISTRIES))}")

    def _add(o: Any) -> Any:
        table = REGISTRIES[registry]
        if name in table and table[name] is not o and not overwrite:
            raise KeyError(f"{registry}: {name!r} is already registered to {table[name]!r}")
        table[name] = o
        return o

    return _add(obj) if obj is not None else _add


def resolve(registry: str, name: str) -> Any:
    """The component registered as ``name``; imports it on first use.

    Raises:
        KeyError: with the known names (and the closest match) when ``name`` is not registered.
    """
    table = REGISTRIES[registry]
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown {registry[:-1]} {name!r}.{hint} Known: {', '.join(sorted(table))}")
    obj = table[name]
    if isinstance(obj, str):
        mod_name, _, attr = obj.partition(":")
        obj = getattr(importlib.import_module(mod_name), attr)
        table[name] = obj
    return obj
