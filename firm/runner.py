"""`firm run`: build the Trainer, the LightningModule and the LightningDataModule of an experiment, and fit.

A run writes everything to ``<output_root>/<name>/<timestamp>/``::

    config.yaml          the resolved config (run it again with `firm run config.yaml`)
    meta.json            command line, git commit, versions, host
    checkpoints/         last.ckpt (always the newest) and step checkpoints
    csv/version_N/       metrics.csv (one version per launch: a resumed run adds version_1, ...)
    tb/version_N/        TensorBoard events
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from firm.config import ConfigError, ExperimentConfig, load_experiment, save_config, to_object, to_yaml
from firm.paths import LAST_CKPT
from firm.provenance import git_commit
from firm.registry import resolve

RUN_DIR_ENV = "FIRM_RUN_DIR"  # set by the launching process so that every rank writes to one run directory


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of writing a checkpoint whose weights hold NaN or inf."""


def is_rank_zero() -> bool:
    """True in the process that owns the run directory (before or without torch.distributed)."""
    rank_vars = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "LOCAL_RANK", "NODE_RANK")
    return all(int(os.environ.get(v, 0)) == 0 for v in rank_vars)


def _non_finite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Paths of floating tensors holding NaN or inf inside nested dicts/lists."""
    if torch.is_tensor(tree):
        return [prefix] if tree.is_floating_point() and not torch.isfinite(tree).all() else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return [p for k, v in items for p in _non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def _checkpoint_io():
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class SafeCheckpointIO(TorchCheckpointIO):
        """Atomic (write-then-rename) checkpoints that refuse non-finite weights; loads with ``weights_only=True``."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            bad = _non_finite_tensors({"state_dict": checkpoint.get("state_dict", {})})
            bad += _non_finite_tensors({"optimizer_states": checkpoint.get("optimizer_states", [])})
            if bad:
                raise NonFiniteWeightsError(
                    f"refusing to write checkpoint {path}: non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}"
                )
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
            if map_location is None:
                map_location = "cpu"
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises OSError, RuntimeError, UnpicklingError, ...
                raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e

    return SafeCheckpointIO()


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, damaged, not a torch checkpoint); the message names the file."""


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as a checkpoint (None when it loads).

    Loads it memory-mapped with ``weights_only=True``: the archive's directory and the pickled structure are read
    (a truncated file fails here) but the tensor data is not, so the check costs little even for large checkpoints.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the answer
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def _step_of(path: Path) -> int:
    digits = "".join(c for c in path.stem if c.isdigit())
    return int(digits) if digits else -1


def readable_checkpoint(last: Path) -> Path:
    """``last`` when it loads; else the newest step checkpoint beside it that loads, saying so on stderr.

    Raises:
        ConfigError: ``last`` is unreadable and no step checkpoint beside it is readable (the message names them).
    """
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    print(f"[firm] checkpoint {last} is unreadable ({problem})", file=sys.stderr)
    steps = sorted(
        (p for p in last.parent.glob("*.ckpt") if p.name != last.name and not p.name.startswith(".")),
        key=lambda p: (_step_of(p), p.stat().st_mtime),
        reverse=True,
    )
    for candidate in steps:
        why = checkpoint_problem(candidate)
        if why is None:
            print(
                f"[firm] falling back to {candidate.name}, the newest readable step checkpoint in {last.parent}",
                file=sys.stderr,
            )
            return candidate
        print(f"[firm] step checkpoint {candidate} is unreadable too ({why})", file=sys.stderr)
    tried = f" or the {len(steps)} step checkpoint(s) beside it" if steps else ", and no step checkpoint is beside it"
    raise ConfigError(f"--resume: cannot read checkpoint {last} ({problem}){tried}; the run cannot be resumed")


def _write_meta(run_dir: Path, resumed_from: str | None, config_sha256: str) -> None:
    import lightning

    meta = {
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": resumed_from,
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.cuda.is_available(),
        "slurm_job_id": _slurm_job_id(),  # a requeued job finds its run by these two (requeued_slurm_run)
        "config_sha256": config_sha256,
    }
    name = "meta.json" if resumed_from is None else f"meta.resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (run_dir / name).write_text(json.dumps(meta, indent=2) + "\n")


def _slurm_job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def config_sha256(node: Any) -> str:
    """A digest of a resolved experiment config (what makes two `firm run` lines the same run)."""
    import hashlib

    return hashlib.sha256(to_yaml(node).encode()).hexdigest()


def requeued_slurm_run(cfg: ExperimentConfig, digest: str) -> Path | None:
    """The run this SLURM job started before it was requeued (``SLURM_RESTART_COUNT`` >= 1), when it has a
    checkpoint and has not finished: a requeued job runs its batch script again, and each `firm run` line then
    continues its own run. A run matches on the job id and the resolved config's digest, so two lines of one script
    (other overrides) never take each other's run."""
    job = _slurm_job_id()
    if job is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    root = Path(cfg.output_root) / cfg.name
    for run_dir in sorted(root.glob("*"), key=lambda p: p.name, reverse=True):
        try:
            meta = json.loads((run_dir / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("slurm_job_id") != job or meta.get("config_sha256") != digest:
            continue
        if (run_dir / FINISHED).is_file() or not (run_dir / "checkpoints" / LAST_CKPT).is_file():
            continue
        return run_dir
    return None


def _requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); returns what happened, for the stop message."""
    job = _slurm_job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not requeue SLURM job {job} ({e})"
    if done.returncode != 0:
        return f"`scontrol requeue {job}` failed ({(done.stderr or done.stdout).strip()[:300]})"
    return f"requeued SLURM job {job}: it continues this run when it starts again"


def _external_job_id() -> str | None:
    """An id that every rank of a multi-process job started by SLURM or torchrun agrees on (None if single)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if run_id in ("", "none"):
            raise ConfigError(
                "torchrun started several ranks without --rdzv-id, so they cannot agree on a run directory: "
                "pass --rdzv-id <job id> to torchrun, or set FIRM_RUN_DIR=/path/to/run on every rank"
            )
        return run_id
    return None


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """``<output_root>/<name>/<timestamp>``; shared by every rank of one launch.

    Ranks started by Lightning's own launcher inherit ``FIRM_RUN_DIR`` from the first process; ranks started
    independently by SLURM or torchrun use ``job-<id>`` so that they agree without talking to each other.
    """
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    job = _external_job_id()
    if job is not None:
        return Path(cfg.output_root) / cfg.name / f"job-{job}"
    run_dir = base = Path(cfg.output_root) / cfg.name / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while run_dir.exists():  # two launches within one second
        run_dir = base.with_name(f"{base.name}-{suffix}")
        suffix += 1
    return run_dir


def find_run_dir(spec: str, cfg: ExperimentConfig | None) -> Path:
    """The run directory to resume: a path, or ``latest`` (newest run of the experiment)."""
    if spec != "latest":
        run_dir = Path(spec)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: run directory not found: {run_dir}")
        return run_dir
    if cfg is None:
        raise ConfigError("--resume without a directory needs the experiment YAML to find its latest run")
    root = Path(cfg.output_root) / cfg.name
    runs = sorted((p for p in root.glob("*") if (p / "checkpoints" / LAST_CKPT).is_file()), key=lambda p: p.name)
    if not runs:
        raise ConfigError(f"--resume: no run of {cfg.name!r} with a checkpoint under {root}")
    return runs[-1]


FSDP_SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}  # -> fully_shard's reshard_after_forward


def build_strategy(tc: Any, module: Any) -> Any:
    """The Trainer strategy from the config. ``fsdp2`` (and its alias ``fsdp``) is FSDP2 through Lightning's
    ModelParallelStrategy: the module shards itself in ``configure_model``."""
    if tc.strategy in ("fsdp", "fsdp2"):
        if not getattr(module, "supports_fsdp2", False):
            raise ConfigError(
                f"trainer.strategy: {tc.strategy}: module {type(module).__name__} does not shard itself; use ddp"
            )
        if tc.fsdp_sharding not in FSDP_SHARDING:
            raise ConfigError(f"trainer.fsdp_sharding: must be one of {list(FSDP_SHARDING)}, got {tc.fsdp_sharding!r}")
        return _fsdp2_strategy()(reshard_after_forward=FSDP_SHARDING[tc.fsdp_sharding])
    if tc.strategy == "ddp" and getattr(module, "ddp_find_unused_parameters", False):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    return tc.strategy


@functools.cache
def _fsdp2_strategy() -> type:
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from firm.policies.sharding import full, like

    class FSDP2Strategy(ModelParallelStrategy):
        """FSDP2 over every process (a 1-D data-parallel mesh), with whole-tensor checkpoints.

        The module applies ``fully_shard`` in ``configure_model`` (the RL modules: firm.policies.sharding). A
        checkpoint holds whole tensors of what the module keeps (``keeps_in_checkpoint``: the LoRA adapters) and the
        optimizer state in torch's usual index-keyed layout, written by rank 0 through FIRM's checkpoint IO (atomic,
        NaN-checked) and read with ``weights_only=True``. So it is the file a DDP or one-process run writes: it resumes
        at any world size, under either strategy, and ``firm policy export`` reads it unchanged. The trained state of
        a LoRA run is small (tens to hundreds of MB), which is why this is preferred to torch's sharded distributed
        checkpoint, whose metadata file is a pickle.
        """

        def __init__(self, reshard_after_forward: bool = True) -> None:
            super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False)
            self.reshard_after_forward = reshard_after_forward

        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes  # every process shards the same model
            self._tensor_parallel_size = 1
            super().setup_environment()

        def lightning_module_state_dict(self) -> dict[str, Any]:
            module = self.lightning_module
            keep = getattr(module, "keeps_in_checkpoint", None)
            if keep is None:
                return super().lightning_module_state_dict()  # every tensor, whole, on rank 0
            out = {}
            for name, p in module.named_parameters():
                if keep(name):
                    t = full(p.detach())  # a collective: every rank takes part, rank 0 keeps the result
                    if self.is_global_zero:
                        out[name] = t.cpu().clone()
            return out

        def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            if isinstance(optimizer, LightningOptimizer):
                optimizer = optimizer._optimizer
            if not optimizer.state:  # before the first step: torch's own (empty) state; DCP would run a step to fill it
                return optimizer.state_dict() if self.is_global_zero else {}
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            osd = get_optimizer_state_dict(self.model, optimizer, options=opts)
            if not self.is_global_zero:
                return {}
            index = {name: i for i, name in enumerate(self._param_names(optimizer))}
            return {
                "state": {index[k]: v for k, v in osd["state"].items()},
                "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in osd["param_groups"]],
            }

        def _param_names(self, optimizer: Any) -> list[str]:
            name_of = {id(p): n for n, p in self.lightning_module.named_parameters()}
            return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            import torch
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            path = Path(self.broadcast(str(checkpoint_path)))
            checkpoint = self.checkpoint_io.load_checkpoint(path)  # weights_only=True
            module = self.lightning_module
            params = module.state_dict(keep_vars=True)  # tied weights (an LM head) and buffers included
            saved_sd = checkpoint.get("state_dict", {})
            unknown = sorted(set(saved_sd) - set(params))
            if unknown:
                raise CheckpointError(f"{path}: {len(unknown)} tensors match no parameter, e.g. {unknown[:3]}")
            keep = getattr(module, "keeps_in_checkpoint", None)
            if module.strict_loading:
                names = dict(module.named_parameters())  # each tied weight once
                missing = sorted(k for k in names if k not in saved_sd and (keep is None or keep(k)))
                if missing:
                    raise CheckpointError(f"{path}: {len(missing)} tensors are missing, e.g. {missing[:3]}")
            with torch.no_grad():
                for name, value in checkpoint.get("state_dict", {}).items():
                    params[name].copy_(like(value, params[name]))
            saved = checkpoint.get("optimizer_states", [])
            for opt, osd in zip(self.optimizers, saved):
                opt = opt._optimizer if isinstance(opt, LightningOptimizer) else opt
                if not osd.get("state"):  # saved before the first step: the fresh optimizer is that state
                    continue
                names = self._param_names(opt)
                by_name = {
                    "state": {names[i]: v for i, v in osd["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]],
                }
                # strict=False: a trainable parameter that never had a gradient (Qwen-Image's last block leaves its
                # text-stream adapters unused) has no AdamW state to load, in the checkpoint as in the saving run
                opts = StateDictOptions(full_state_dict=True, strict=False)
                set_optimizer_state_dict(self.model, opt, optim_state_dict=by_name, options=opts)
            return checkpoint

    return FSDP2Strategy


@functools.cache
def _final_checkpoint_callback() -> type:
    import lightning as L

    class FinalCheckpoint(L.Callback):
        """Writes ``last.ckpt`` at the end of the batch that reaches ``trainer.max_steps``, inside the training loop.

        There the loops and the data loader are mid-epoch, exactly as in a periodic checkpoint, so resuming it with a
        larger ``max_steps`` continues the same epoch bit for bit.
        """

        def __init__(self, path: Path) -> None:
            self.path = path
            self.saved_step: int | None = None

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.max_steps and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
                if self.saved_step != trainer.global_step:
                    trainer.save_checkpoint(self.path, weights_only=False)
                    self.saved_step = trainer.global_step

    return FinalCheckpoint


# Exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint (128 + SIGTERM, as a shell reports it).
PREEMPTED_EXIT = 143
# Written into a run directory when its fit ends normally; a requeued SLURM job never continues such a run.
FINISHED = "finished.json"


@functools.cache
def _preemption_callback() -> type:
    import signal

    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class PreemptionCheckpoint(L.Callback):
        """On SIGTERM (Kubernetes, torchrun elastic, SLURM at the time limit) or SIGUSR1 (SLURM's ``--signal``), write
        ``last.ckpt`` at the end of the current batch, the next point where the loops, the data loader and the RNG
        are as a periodic checkpoint records them, then stop: ``firm run --resume`` continues bit for bit.

        Both signals only set a flag here. SIGUSR1's handler is installed before Lightning registers its own (so its
        SLURM handler, which saves in the middle of a step, stays out); SIGTERM's replaces Lightning's at the start of
        training, since Lightning's would raise during validation or between two hooks, before anything is saved.
        The flag is read at the end of a batch that ends an optimizer step (gradient accumulation is never cut), and
        the ranks agree on it before anyone writes (every rank takes part in a checkpoint).
        """

        def __init__(self, path: Path) -> None:
            self.path = path
            self.signal_name: str | None = None
            self.saved_step: int | None = None
            self.requeue: str | None = None  # what `scontrol requeue` said (SIGUSR1 inside a SLURM job)

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            # Installed before Lightning registers its own handlers (after on_fit_start), so Lightning's SLURM
            # handler, which would save in the middle of a step, stays out. run() restores the previous handler.
            if hasattr(signal, "SIGUSR1"):
                try:
                    signal.signal(signal.SIGUSR1, self._on_usr1)
                except ValueError:  # not the main thread (a notebook's worker): SIGTERM still works
                    pass

        def _on_usr1(self, signum: int, frame: Any) -> None:
            self.signal_name = "SIGUSR1"

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # After Lightning registered its SIGTERM handler (it restores the previous one at teardown).
            launcher = trainer.strategy.launcher

            def on_term(signum: int, frame: Any) -> None:
                if self.signal_name is None:
                    self.signal_name = "SIGTERM"
                    if launcher is not None:  # ranks this process started get it too, as Lightning's handler does
                        launcher.kill(signum)

            try:
                signal.signal(signal.SIGTERM, on_term)
            except ValueError:  # not the main thread: Lightning's handler stays
                pass

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            last = (
                trainer.num_training_batches not in (None, float("inf"))
                and batch_idx + 1 >= trainer.num_training_batches
            )
            if (batch_idx + 1) % accumulate and not last:
                return  # inside an optimizer step: its summed gradients are not in a checkpoint
            local = bool(trainer.received_sigterm) or self.signal_name is not None
            stop = trainer.strategy.reduce_boolean_decision(local, all=False)  # any rank signalled: all stop
            if not stop:
                return
            self.signal_name = self.signal_name or "SIGTERM"
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank; rank 0 writes
            self.saved_step = trainer.global_step
            if self.signal_name == "SIGUSR1" and _slurm_job_id() is not None and trainer.is_global_zero:
                self.requeue = _requeue_slurm_job()  # SLURM's warning before the time limit: come back later
            raise SIGTERMException()

    return PreemptionCheckpoint


def build_trainer(
    cfg: ExperimentConfig, run_dir: Path, module: Any, extra_callbacks: list | None = None, datamodule: Any = None
):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tc = cfg.trainer
    progress = tc.enable_progress_bar if tc.enable_progress_bar is not None else sys.stderr.isatty()
    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=tc.checkpoint_every_n_steps,
        monitor="step",
        mode="max",
        save_top_k=tc.keep_checkpoints,
        save_last=True,
    )
    final = _final_checkpoint_callback()(run_dir / "checkpoints" / LAST_CKPT)
    preempt = _preemption_callback()(run_dir / "checkpoints" / LAST_CKPT)
    callbacks = [ckpt, final, preempt, LearningRateMonitor(logging_interval="step")]
    callbacks += list(extra_callbacks or [])
    kwargs: dict[str, Any] = {}
    for key in ("val_check_interval", "limit_train_batches", "limit_val_batches"):
        if getattr(tc, key) is not None:
            kwargs[key] = getattr(tc, key)
    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=tc.max_steps,
        max_epochs=tc.max_epochs,
        accelerator=tc.accelerator,
        devices=tc.devices,
        num_nodes=tc.num_nodes,
        strategy=build_strategy(tc, module),
        precision=tc.precision,
        gradient_clip_val=tc.gradient_clip_val,
        accumulate_grad_batches=tc.accumulate_grad_batches,
        log_every_n_steps=tc.log_every_n_steps,
        check_val_every_n_epoch=tc.check_val_every_n_epoch,
        num_sanity_val_steps=tc.num_sanity_val_steps,
        enable_progress_bar=progress,
        deterministic=tc.deterministic,
        logger=[CSVLogger(run_dir, name="csv"), TensorBoardLogger(run_dir, name="tb", default_hp_metric=False)],
        callbacks=callbacks,
        plugins=[_checkpoint_io()],
        # a datamodule whose batch sampler already splits the data over ranks sets use_distributed_sampler = False
        use_distributed_sampler=getattr(datamodule, "use_distributed_sampler", True),
        **kwargs,
    )


def build_components(cfg: ExperimentConfig) -> tuple[Any, Any]:
    module_cls = resolve("modules", cfg.module.name)
    data_cls = resolve("datamodules", cfg.data.name)
    return module_cls(cfg.module), data_cls(cfg.data)


def run(
    experiment: str | None,
    overrides: list[str] | None = None,
    *,
    dry_run: bool = False,
    resume: str | None = None,
) -> Path | None:
    """Resolve, build and fit an experiment. Returns the run directory (None for a dry run)."""
    import lightning as L

    quiet_third_party_warnings()
    overrides = list(overrides or [])
    resume_dir: Path | None = None
    if resume is not None and resume != "latest":
        resume_dir = find_run_dir(resume, None)
        saved = resume_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {resume_dir} has no config.yaml (is it a FIRM run directory?)")
        node = load_experiment(experiment or saved, overrides)
    else:
        if experiment is None:
            raise ConfigError("firm run needs an experiment YAML (or --resume RUN_DIR)")
        node = load_experiment(experiment, overrides)
    cfg: ExperimentConfig = to_object(node)

    if dry_run:
        print(to_yaml(node), end="")
        return None

    if resume == "latest":
        resume_dir = find_run_dir("latest", cfg)
    if resume_dir is None:  # every rank looks: they all find the same run (its meta.json names the job)
        resume_dir = requeued_slurm_run(cfg, config_sha256(node))
        if resume_dir is not None and is_rank_zero():
            print(f"[firm] SLURM job {_slurm_job_id()} was requeued: continuing {resume_dir}")
    ckpt_path = None
    if resume_dir is not None:
        ckpt_path = resume_dir / "checkpoints" / LAST_CKPT
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path} (the run was stopped before its first one)")
        ckpt_path = readable_checkpoint(ckpt_path)  # a damaged last.ckpt: the newest readable step checkpoint
        run_dir = resume_dir
    else:
        run_dir = new_run_dir(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # ranks started by Lightning's launcher inherit it

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(node, run_dir / ("config.yaml" if resume_dir is None else "config.resume.yaml"))
        _write_meta(run_dir, str(ckpt_path) if ckpt_path else None, config_sha256(node))
        print(f"[firm] run directory: {run_dir}" + (f" (resuming from {ckpt_path})" if ckpt_path else ""))

    module, datamodule = build_components(cfg)
    trainer = build_trainer(cfg, run_dir, module, datamodule=datamodule)
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    usr1 = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SIGTERMException:
        preempt = next((cb for cb in trainer.callbacks if isinstance(cb, _preemption_callback())), None)
        if trainer.is_global_zero:
            if preempt is not None and preempt.saved_step is not None:
                print(
                    f"[firm] stopped by {preempt.signal_name} after step {preempt.saved_step}; checkpoint: "
                    f"{run_dir / 'checkpoints' / LAST_CKPT}. Continue with: firm run --resume {run_dir}",
                    file=sys.stderr,
                )
                if preempt.requeue:
                    print(f"[firm] {preempt.requeue}", file=sys.stderr)
            else:
                print(f"[firm] stopped by SIGTERM before a checkpoint could be written: {run_dir}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    finally:
        if usr1 is not None:
            with contextlib.suppress(ValueError):  # not the main thread: nothing was installed
                signal.signal(signal.SIGUSR1, usr1)
    # A run that stopped at max_steps saved last.ckpt inside the loop (FinalCheckpoint): saving it again here would
    # record the data epoch as finished and lose the loader's position, so that `--resume` with a larger max_steps
    # would start a new epoch on other prompts. Runs that stopped otherwise (max_epochs) are saved here.
    final = next((cb for cb in trainer.callbacks if isinstance(cb, _final_checkpoint_callback())), None)
    if final is None or final.saved_step != trainer.global_step:
        trainer.save_checkpoint(run_dir / "checkpoints" / LAST_CKPT, weights_only=False)  # every rank; rank 0 writes
    if trainer.is_global_zero:
        (run_dir / FINISHED).write_text(json.dumps({"global_step": trainer.global_step}) + "\n")
        print(f"[firm] done after {trainer.global_step} steps. Outputs: {run_dir}")
        print(f"[firm]   config: {run_dir / 'config.yaml'}  checkpoints: {run_dir / 'checkpoints'}")
        print(f"[firm]   metrics: {run_dir / 'csv'}  tensorboard: tensorboard --logdir {run_dir / 'tb'}")
    return run_dir


def quiet_third_party_warnings() -> None:
    """Silence deprecation chatter from dependencies that says nothing about the user's run."""
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def list_experiments(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, description) of every shipped experiment YAML."""
    import yaml

    from firm.paths import experiments_root

    root = root or experiments_root()
    rows = []
    for path in sorted(root.rglob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        desc = data.get("description", "") if isinstance(data, dict) else ""
        rows.append((str(path.relative_to(root)), str(desc)))
    return rows
