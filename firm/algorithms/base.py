"""The RL step every algorithm shares, as a LightningModule with a few hooks.

One ``training_step`` is one RL step on this rank's share of the batch (``data.batch_size`` samples; a prompt's G
copies may sit on different ranks):

1. **Rollout** (:class:`firm.algorithms.rollout.Rollouter`) in chunks of ``rollout_chunk`` samples with the
   ``rollout_adapter``; each chunk is scored by the critic on a worker thread while the next one is sampled.
2. **Advantages**: rewards and group labels are all-gathered and ``firm.kernels.group_advantages`` normalises per prompt
   group over the whole world (NaN rewards excluded, advantage 0); each rank keeps its slice and a training mask
   (missing rewards, optionally zero-std groups and zero advantages, are left out of the loss).
3. **Update** (manual optimisation): ``inner_epochs`` passes over the batch in optimizer steps of
   ``train_batch_size`` samples; each sample trains on ``timestep_fraction`` of the algorithm's candidate steps, in
   micro-batches of ``micro_batch_size``. The algorithm supplies only the loss of one micro-batch.

Every rank runs the same number of forward / backward passes (masked samples contribute zero), so DDP stays in step.
A non-finite loss or gradient skips the optimizer step on every rank. The optimizer step clips the gradient norm and
updates the EMA (with the peers' warm-up ``min((1 + n) / (10 + n), ema_decay)``).

**Hooks** (see docs/rl.md, "Adding an algorithm"):

* ``Config`` — a dataclass extending :class:`~firm.algorithms.config.RLConfig`; ``validate()`` checks its ranges.
* ``rollout_adapter`` / ``needs_old_adapter`` — which LoRA adapter samples, and whether an ``old`` copy is kept.
* :meth:`sde_window` — which sampling steps are stochastic this RL step.
* :meth:`train_candidates` — which steps of a rollout can be trained on.
* :meth:`begin_epoch` — per-epoch state for the loss (e.g. a seeded generator).
* :meth:`micro_loss` — the loss of one micro-batch at one step per sample, summed over its kept samples.
* :meth:`after_update` — anything after the RL step's optimizer steps (e.g. move the old policy).

Checkpoints hold the adapters (trained and old), the optimizer state, the EMA, the RL step and the RNG states; the
frozen base weights are left out and re-loaded from ``policy.pretrained`` (a fingerprint catches a different base).
``trainer.max_steps`` counts optimizer steps: ``inner_epochs x ceil(data.batch_size / train_batch_size)`` per RL step.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch

from firm.algorithms.advantages import Advantages, world_advantages
from firm.algorithms.config import RLConfig
from firm.algorithms.reporting import log_samples, rollout_metrics
from firm.algorithms.rollout import Rollout, Rollouter
from firm.algorithms.scoring import OverlappedScorer
from firm.algorithms.state import generator, load_rl_state, rng_state, save_rl_state, set_rng_state
from firm.module import FirmModule
from firm.policies.policy import FlowPolicy
from firm.policies.samplers import sde_window
from firm.policies.sharding import is_sharded, like, reshard
from firm.rewards.mix import RewardMix, gdpo_advantages
from firm.rewards.scorers.critic import CriticScorer
from firm.vocab import Task


def ema_decay(step: int, decay: float, *, warmup: bool = True) -> float:
    """The EMA decay at optimizer step ``step``: ``min((1 + step) / (10 + step), decay)`` with the warm-up of
    DiffusionNFT's ``EMAModuleWrapper.get_current_decay`` (flow_grpo/ema.py), else ``decay``."""
    return min((1 + step) / (10 + step), decay) if warmup else decay


def build_reward(c: RLConfig) -> RewardMix:
    """The RL step's reward: the scorers of ``module.rewards``, or the ``module.critic`` shorthand (that critic and
    its combiner, alone in the mix: the same rewards as before the mix existed)."""
    kwargs = {
        "mode": c.reward_mix,
        "on_failure": c.reward_failure,
        "parallel": c.reward_parallel,
    }
    if c.critic is None and not any(v is not None for v in (c.rewards or {}).values()):
        raise ValueError("module: give the reward: a `critic:` section (with `reward:`) or a `rewards:` mix")
    if c.critic is not None:
        conf = CriticScorer.Config(task=c.task, critic=c.critic, reward=c.reward, dimensions=c.critic_dimensions)
        return RewardMix({"critic": CriticScorer(conf)}, **kwargs)
    mix = RewardMix.build(c.rewards, task=c.task, **kwargs)
    if c.task not in mix.tasks:
        raise ValueError(f"module.rewards: not every scorer can score {c.task} samples ({mix!r})")
    return mix


def build_callbacks(specs: dict[str, Any]) -> list[L.Callback]:
    """Callbacks from ``{registry name: settings}`` (``{}`` for the defaults; ``null`` leaves one out)."""
    from firm.config import build_component

    out = []
    for name, spec in specs.items():
        if spec is None:
            continue
        cls, cfg = build_component("callbacks", {**dict(spec), "name": name}, source=f"module.callbacks.{name}")
        out.append(cls(cfg))
    return out


class Micro(NamedTuple):
    """One micro-batch of the update loop."""

    m: torch.Tensor  # (b,) sample indices, on the device
    idx: torch.Tensor  # (b,) the trained step of each sample, on the device
    keep: torch.Tensor  # (b,) bool, trained (not masked out), on the device
    n_keep: int  # kept samples (from the host mask: no sync)
    kl_weight: float  # weight of the KL term here (0: leave the reference forward out)


class RLAlgorithm(FirmModule):
    """The shared RL step; subclasses implement the hooks listed in the module docstring."""

    Config = RLConfig
    rollout_adapter: str | None = "default"  # which adapter samples the rollouts (None: the base model)
    needs_old_adapter = False  # keep a second, slowly moving `old` adapter (DiffusionNFT's sampling policy)
    records_means = False  # the rollout also keeps every stochastic step's mean (GRPO-Guard)
    ddp_find_unused_parameters = False

    def __init__(self, config: RLConfig) -> None:
        super().__init__()
        # Frozen encoders stay in eval mode on purpose, and manual optimisation checkpoints after the step.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        config.validate()
        self.config = c = config
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave out the frozen base weights
        self.policy = FlowPolicy(c.policy, old_adapter=self.needs_old_adapter)
        if c.task == Task.EDIT and self.policy.family.task != Task.EDIT:
            raise ValueError(f"module.task=edit needs an editing policy; policy.family={c.policy.family!r} is not one")
        self.reward_fn = build_reward(c)
        self.rl_step = 0
        self.ema: dict[str, torch.Tensor] | None = None
        self._fresh = True  # no optimizer step since the last rollout: the policy *is* the sampling policy
        self._scorer: OverlappedScorer | None = None
        self._rollouter: Rollouter | None = None
        self._pending_rng: dict[str, Any] | None = None  # RNG states of a loaded checkpoint, restored at the 1st batch
        self._idle_rl_steps = 0
        self._pending: tuple[dict[str, Any], Rollout] | None = None  # asynchronous mode: the rollout being scored
        self._callbacks = build_callbacks(c.callbacks)
        self._sharded: dict[str, int] | None = None  # what configure_model sharded (fsdp2), None when not sharded

    # ---------------------------------------------------------------------------------------------------- hooks

    def sde_window(self, num_steps: int) -> torch.Tensor:
        """(T,) bool: the stochastic steps of this RL step's rollouts (a random window, or every step)."""
        s = self.config.sampler
        g = generator("window", self.config.seed, self.rl_step)
        return sde_window(num_steps, s.sde_window_size, s.sde_window_max_start, g)

    def train_candidates(self, roll: Rollout) -> torch.Tensor:
        """(n,) step indices of a rollout that can be trained on (default: the stochastic ones)."""
        return torch.nonzero(roll.stochastic).flatten()

    def begin_epoch(self, roll: Rollout, adv: Advantages, epoch: int) -> Any:
        """Per-epoch state handed to :meth:`micro_loss`, e.g. a dataclass of device copies (default: none)."""
        return None

    def micro_loss(
        self, roll: Rollout, adv: Advantages, ctx: Any, mic: Micro
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """The loss of micro-batch ``mic.m`` (sample indices) at step ``mic.idx[i]`` of each sample.

        Returns ``(loss_sum, stat_sums, n)``: the per-sample losses summed over the kept samples (``mic.keep``),
        each logged statistic summed over them (device scalars, read once per RL step), and their number
        (``mic.n_keep``). The base scales ``loss_sum`` into this micro-batch's share of the optimizer step's mean.
        The KL term's weight is ``mic.kl_weight`` (0: skip the reference forward).
        """
        raise NotImplementedError

    def after_update(self) -> dict[str, float]:
        """Called after each RL step's optimizer steps; returns metrics to log."""
        return {}

    # ---------------------------------------------------------------------------------------------------- Lightning

    @property
    def fsdp_wrap_modules(self) -> set[type]:
        return self.policy.fsdp_wrap_modules()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(
            self.policy.trainable_parameters(),
            lr=c.lr,
            betas=tuple(c.betas),
            eps=c.adam_eps,
            weight_decay=c.weight_decay,
        )

    def configure_callbacks(self) -> list[L.Callback]:
        return self._callbacks

    supports_fsdp2 = True  # trainer.strategy: fsdp2 shards the policy in configure_model

    def configure_model(self) -> None:
        """Under ``trainer.strategy: fsdp2`` (Lightning's ModelParallelStrategy), shard the policy over the
        data-parallel mesh (firm.policies.sharding); under any other strategy, nothing to do."""
        mesh = self._device_mesh
        if mesh is None and self.policy.config.text_encoder == "sharded":
            raise ValueError("policy.text_encoder: sharded needs trainer.strategy: fsdp2 (use kept or freed otherwise)")
        if mesh is None or self._sharded is not None:
            return
        from firm.policies.sharding import shard_policy

        reshard = getattr(self.trainer.strategy, "reshard_after_forward", True)
        dp = mesh["data_parallel"] if mesh.ndim > 1 else mesh
        self._sharded = shard_policy(self.policy, dp, reshard_after_forward=reshard)

    def keeps_in_checkpoint(self, name: str) -> bool:
        """Which parameters a checkpoint holds: the adapters (``save_rl_state`` keeps the same), not the frozen base."""
        return "lora_" in name

    def _fill_prompt_cache_and_free_encoder(self) -> None:
        """``policy.text_encoder: freed``: encode every training prompt (and the negative prompt when the sampler
        needs it) into the cache, then release the encoder."""
        from firm.policies.sharding import free_text_encoder

        dm = getattr(self.trainer, "datamodule", None)
        dataset = getattr(dm, "dataset", None)
        if dataset is None:
            raise ValueError("policy.text_encoder: freed needs a prompt data module (data.name: prompts)")
        edit = self.policy.family.task == Task.EDIT
        guidance = self.policy.needs_uncond(self.config.sampler.guidance_scale)
        # one entry per prompt, plus the negative prompt: once, or once per source image when editing
        needed = len(dataset) * (2 if edit and guidance else 1) + (1 if guidance and not edit else 0)
        if needed > self.policy.config.cache_size:
            raise ValueError(
                f"policy.text_encoder: freed keeps every prompt in the cache, but the data needs {needed} entries "
                f"and policy.cache_size is {self.policy.config.cache_size}; raise cache_size to at least {needed}"
            )
        from tqdm.auto import tqdm

        for i in tqdm(range(len(dataset)), desc="[firm] encoding the prompts", disable=self.global_rank != 0):
            item = dataset[(i, 0)]
            images = [item["image"]] if edit else None
            self.policy.encode_prompts([item["prompt"]], images, with_sources=False)
            if guidance:
                self.policy.encode_prompts([self.policy.config.negative_prompt], images, with_sources=False)
        free_text_encoder(self.policy)

    def on_fit_start(self) -> None:
        if self.policy.config.text_encoder == "freed" and not self.policy.text_encoder_freed:
            self._fill_prompt_cache_and_free_encoder()
        if self.config.ema_decay is not None and self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in self.policy.named_adapter_parameters("default").items()}
        per_rl = self.optimizer_steps_per_rl_step()
        for cb in self.trainer.checkpoint_callbacks:
            every = getattr(cb, "_every_n_train_steps", 0)
            if every and every % per_rl:
                warnings.warn(
                    f"trainer.checkpoint_every_n_steps={every} is not a multiple of the {per_rl} optimizer steps per "
                    "RL step: some checkpoints will be skipped",
                    stacklevel=1,
                )

    def on_train_end(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None
            self._rollouter = None
        self.reward_fn.close()

    def optimizer_steps_per_rl_step(self, local_batch: int | None = None) -> int:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        b = local_batch or getattr(getattr(dm, "config", None), "batch_size", None) or 1
        tb = self.config.train_batch_size or b
        return self.config.inner_epochs * math.ceil(b / min(tb, b))

    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def scorer(self) -> OverlappedScorer:
        if self._scorer is None:
            c = self.config
            self._scorer = OverlappedScorer(
                self.reward_fn,
                self.reward_fn.dimensions,
                terms=self.reward_fn.term_names,
                max_pending=c.critic_queue,
                threads=c.critic_threads,
                on_failure=c.critic_failure,
            )
        return self._scorer

    @property
    def rollouter(self) -> Rollouter:
        """Samples and scores this rank's batches (built with the scorer)."""
        if self._rollouter is None or self._rollouter.scorer is not self.scorer:
            self._rollouter = Rollouter(
                self.policy,
                self.scorer,
                self.config,
                adapter=self.rollout_adapter,
                record_means=self.records_means,
            )
        return self._rollouter

    # ---------------------------------------------------------------------------------------------------- the step

    def rollout(self, batch: dict[str, Any], collect: bool = True) -> Rollout:
        """This step's rollout (:meth:`Rollouter.run`); ``collect=False`` leaves its scores with the critic."""
        window = self.sde_window(self.config.sampler.num_steps)
        roll = self.rollouter.run(
            batch, rl_step=self.rl_step, rank=self.global_rank, device=self.device, window=window, collect=collect
        )
        if self._sharded is not None:
            reshard(self.policy)
        return roll

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' ``x`` concatenated along dim 0 (rank order)."""
        if self.world == 1:
            return x
        return self.all_gather(x).reshape(-1, *x.shape[1:])  # (W, B, ...) -> (W * B, ...)

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor, terms: torch.Tensor | None = None) -> Advantages:
        """Group-normalised advantages over the whole world and the training mask (:func:`world_advantages`); with
        ``reward_mix: gdpo``, ``terms`` (B, K) are the mix's per-scorer terms."""
        mix = None
        if self.config.reward_mix == "gdpo":
            if terms is None:
                raise ValueError("reward_mix: gdpo needs the reward mix's terms")
            weights, eps = self.reward_fn.weights, self.config.zero_std_eps
            mix = lambda t, g: gdpo_advantages(t, g, weights.to(t.device), zero_std_eps=eps)  # noqa: E731
        return world_advantages(
            rewards,
            groups,
            self.config,
            gather=self.gather,
            rank=self.global_rank,
            device=self.device,
            terms=terms,
            mix=mix,
        )

    def reward_terms(self, reward: Any) -> torch.Tensor | None:
        """(B, K) the reward mix's terms in its order (None unless reward_mix is gdpo)."""
        if self.config.reward_mix != "gdpo":
            return None
        return torch.stack([reward.terms[k] for k in self.reward_fn.term_names], dim=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        t_step = time.perf_counter()
        if self.config.async_rollout:
            # Sample (and hand to the critic) this step's batch with the current policy, then train on the previous
            # step's rollout, whose scores arrived meanwhile: one step off-policy (docs/rl.md, "Asynchronous").
            new = self.rollout(batch, collect=False)
            prev, self._pending = self._pending, (batch, new)
            if prev is None:  # the first step only samples
                self.rl_step += 1
                return
            batch, roll = prev
            self.rollouter.collect(roll)
            roll.rollout_s += new.rollout_s  # what this step spent sampling
            self._fresh = False  # the behaviour policy is one optimizer step old: use the rollout's log-probs
        else:
            roll = self.rollout(batch)
            self._fresh = True
        adv = self.advantages(roll.reward.rewards, batch["group"], terms=self.reward_terms(roll.reward))
        t_upd = time.perf_counter()
        steps_before = self.global_step
        metrics = self.update(roll, adv) if adv.global_keep > 0 else {"train/skipped_no_valid": 1.0}
        update_s = time.perf_counter() - t_upd
        # trainer.max_steps counts optimizer steps: RL steps without one (no valid reward, non-finite losses) do not
        # advance the run, so a critic that never answers must stop it rather than spin forever.
        self._idle_rl_steps = 0 if self.global_step > steps_before else self._idle_rl_steps + 1
        if self._idle_rl_steps >= self.config.max_idle_rl_steps:
            raise RuntimeError(
                f"{self._idle_rl_steps} RL steps in a row made no optimizer step (missing fraction of the last one: "
                f"{1 - adv.global_keep / max(adv.all_rewards.numel(), 1):.2f}); is the critic answering? "
                "Raise module.max_idle_rl_steps to wait longer"
            )
        self.rl_step += 1
        metrics.update(self.after_update())
        metrics.update(rollout_metrics(roll, adv, self.gather))
        metrics.update(
            {
                "perf/rollout_s": roll.rollout_s,
                "perf/critic_wait_s": roll.critic_wait_s,
                "perf/update_s": update_s,
                "perf/step_s": time.perf_counter() - t_step,
                "perf/images_per_s": roll.images.shape[0] * self.world / max(roll.rollout_s, 1e-9),
                "rl_step": float(self.rl_step),
            }
        )
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("reward", metrics.get("reward/mean", math.nan), prog_bar=True, on_step=True, rank_zero_only=True)
        c = self.config
        if c.log_images_every and self.rl_step % c.log_images_every == 0 and self.global_rank == 0 and self._trainer:
            log_samples(
                Path(self.trainer.default_root_dir) / "samples",
                batch,
                roll,
                adv,
                rl_step=self.rl_step,
                edit=c.task == Task.EDIT,
                max_images=c.log_images_max,
                loggers=self.loggers,
            )

    def update(self, roll: Rollout, adv: Advantages) -> dict[str, float]:
        """The masked update loop: epochs -> optimizer steps -> trained steps -> micro-batches.

        No host sync per micro-batch: indices live on the device, the kept counts come from the host mask of the
        step, metrics and the finite flag accumulate on the device, and the optimizer step reads the flag and the
        gradient norm together (one sync per optimizer step); the metrics are read once at the end.
        """
        c, dev = self.config, self.device
        b = roll.latents.shape[0]
        keep, keep_host = adv.keep.to(dev), adv.keep_host
        candidates = self.train_candidates(roll)
        sums: dict[str, torch.Tensor] = {}
        count, norms, skipped_steps = 0, [], 0
        for epoch in range(c.inner_epochs):
            subsets = self.timestep_subsets(b, candidates, epoch)  # (B, n) on the host
            sub_dev = subsets.to(dev)
            n_t = subsets.shape[1]
            n_kl = max(1, math.ceil(c.kl_fraction * n_t)) if c.kl_beta > 0 else 0
            ctx = self.begin_epoch(roll, adv, epoch)
            mbs = self.minibatches(b, epoch)
            order_dev = torch.cat(mbs).to(dev)  # the epoch's sample order on the device: one copy, not one per micro
            kept = self.world_kept(adv.world_keep_host, b, epoch)
            mb_size, lo = c.micro_batch_size or b, 0
            for k, mb in enumerate(mbs):
                scale = self.world / max(kept[k] * n_t, 1.0)
                parts = [(j, s) for j in range(n_t) for s in range(0, mb.numel(), mb_size)]
                finite = torch.ones((), dtype=torch.bool, device=dev)
                for i, (j, s) in enumerate(parts):
                    micro = mb[s : s + mb_size]  # host indices, for the host mask
                    m = order_dev[lo + s : lo + s + micro.numel()]  # the same indices, on the device
                    kl_w = c.kl_beta * n_t / n_kl if j < n_kl else 0.0  # the KL on a subset, unbiased
                    mic = Micro(m, sub_dev[m, j], keep[m], int(keep_host[micro.numpy()].sum()), kl_w)
                    with self.gradient_sync(i == len(parts) - 1):  # DDP all-reduces on the last micro-batch only
                        loss_sum, stats, n = self.micro_loss(roll, adv, ctx, mic)
                        loss = loss_sum * scale  # this micro-batch's share of the optimizer step's mean
                        finite &= torch.isfinite(loss.detach())
                        self.manual_backward(loss)
                    for key, val in stats.items():
                        sums[key] = sums.get(key, 0.0) + val.detach()
                    count += n
                lo += mb.numel()
                norm = self.apply_optimizer_step(finite)
                if norm is None:
                    skipped_steps += 1
                else:
                    norms.append(norm)
        keys = sorted(sums)
        stacked = [sums[k].float().reshape(()) for k in keys] + ([torch.stack(norms).mean()] if norms else [])
        values = torch.stack(stacked).tolist() if stacked else []  # the metrics' one read per RL step
        out = {k: v / count for k, v in zip(keys, values)} if count > 0 else {}
        if norms:
            out["train/grad_norm"] = values[-1]
        if skipped_steps:
            out["train/skipped_steps"] = float(skipped_steps)
        return out

    def gradient_sync(self, sync: bool):
        """A context that skips DDP's gradient all-reduce unless ``sync`` (gradient accumulation, as ``no_sync``)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None) if self._trainer is not None else None
        return contextlib.nullcontext() if sync or self.world == 1 or block is None else block()

    def world_kept(self, world_keep: np.ndarray, b: int, epoch: int) -> list[int]:
        """Kept samples of each optimizer step of ``epoch`` over every rank, from the host mask: each rank's
        minibatch order is a function of (seed, RL step, epoch, rank), so no communication is needed."""
        totals = [0] * len(self.minibatches(b, epoch))
        for rank in range(self.world):
            for k, mb in enumerate(self.minibatches(b, epoch, rank=rank)):
                totals[k] += int(world_keep[rank * b + mb.numpy()].sum())
        return totals

    # --------------------------------------------------------------------------------------------------- update helpers

    def minibatches(self, b: int, epoch: int, rank: int | None = None) -> list[torch.Tensor]:
        """This epoch's shuffled sample indices (of ``rank``, default this one), split into optimizer steps."""
        c = self.config
        rank = self.global_rank if rank is None else rank
        order = torch.randperm(b, generator=generator("order", c.seed, self.rl_step, epoch, rank))
        tb = c.train_batch_size or b
        return [order[i : i + tb] for i in range(0, b, tb)]

    def timestep_subsets(self, b: int, candidates: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, n) per-sample random subsets of the candidate step indices, ``n = max(1, int(fraction * len))``.

        ``int()`` as Flow-GRPO and DiffusionNFT count ``num_train_timesteps``: 0.99 of 10 steps trains 9.
        """
        c = self.config
        n = max(1, int(c.timestep_fraction * candidates.numel() + 1e-9))
        if c.rng_streams == "sample":  # one stream per sample, keyed by its place in the global batch
            gens = [
                generator("timesteps", c.seed, self.rl_step, epoch, "sample", self.global_rank * b + i)
                for i in range(b)
            ]
        else:
            gens = [generator("timesteps", c.seed, self.rl_step, epoch, self.global_rank)] * b
        rows = [candidates[torch.randperm(candidates.numel(), generator=g)[:n]] for g in gens]
        return torch.stack(rows)  # (B, n)

    def apply_optimizer_step(self, finite: torch.Tensor) -> torch.Tensor | None:
        """Check, clip and step (or skip) the optimizer, reading the losses' finite flag and the gradient norm in one
        host sync; returns the norm (a device scalar), or None when the step was skipped on every rank."""
        opt = self.optimizers()
        grads = [p.grad for p in self.policy.trainable_parameters() if p.grad is not None]
        # a sharded gradient's local norm: the squares are summed over the shards below (one all-reduce)
        norms = [torch.linalg.vector_norm((g.to_local() if is_sharded(g) else g).float()) for g in grads]
        zero = torch.zeros((), device=self.device, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else zero
        if self._sharded is not None and self.world > 1:
            total = self.trainer.strategy.reduce(total.square(), reduce_op="sum").sqrt()
        ok = (finite & torch.isfinite(total)).float()
        if self.world > 1:
            ok = self.trainer.strategy.reduce(ok, reduce_op="min")
        if float(ok) < 1.0:  # the one host sync of the optimizer step
            self.skipped_nonfinite += 1
            warnings.warn(
                f"non-finite loss or gradient at step {self.global_step}: optimizer step skipped "
                f"({self.skipped_nonfinite} skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            opt.zero_grad(set_to_none=True)
            return None
        if self.config.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.config.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._fresh = False
        if self.ema is not None:
            d = ema_decay(self.global_step, self.config.ema_decay, warmup=self.config.ema_warmup)
            with torch.no_grad():
                for name, p in self.policy.named_adapter_parameters("default").items():
                    self.ema[name].lerp_(p.detach(), 1.0 - d)
        return total.detach()

    # ---------------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        rank_rngs = None
        if self.world > 1:  # every rank takes part in the checkpoint's dump; only rank 0 writes it
            import torch.distributed as dist

            rank_rngs = [None] * self.world
            dist.all_gather_object(rank_rngs, rng_state())
        save_rl_state(checkpoint, rl_step=self.rl_step, policy=self.policy, ema=self.ema, rank_rngs=rank_rngs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # The RNG states are restored at the first batch, not now: the data loader's iterator, created after this
        # hook, draws its base seed from the global RNG, as the uninterrupted run's did before this checkpoint.
        state = load_rl_state(checkpoint, self.policy, rank=self.global_rank, world=self.world)
        self.rl_step = state.rl_step
        if state.ema is not None:
            params = self.policy.named_adapter_parameters("default")
            self.ema = {k: like(v, params[k]) if k in params else v.to(self.device) for k, v in state.ema.items()}
        self._pending_rng = state.rng

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
