"""`firm shapes ...` commands of the recipes: the studies that run the library many times on the shapes world.

firm shapes ablate --seeds 0 1                                     # the reward ablation of the editing demo
firm shapes faithfulness --critic-model runs/critic-proof/critic-curated   # RL under rule / trained / hallucinating
firm shapes critic-proof --out runs/critic-proof                   # bench, curate, fine-tune the base, bench
firm shapes pretrain-critic-base --out runs/critic-base            # the tiny critic's base: grounded QA, no scores

The plugin's own commands (preview, export, critic-agreement, export-bench, tiny-critic) are in firm/synthetic/cli.py;
both modules add actions to the one `firm shapes` noun.
"""

from __future__ import annotations

import argparse


def _cmd_ablate(args: argparse.Namespace) -> int:
    import time

    from firm.synthetic.recipes.ablation import run_ablation

    out = args.out or f"runs/ablation_edit_rewards/{time.strftime('%Y%m%d-%H%M%S')}"
    run_ablation(args.experiment, args.rewards, args.seeds, out, args.overrides)
    return 0


def _cmd_faithfulness(args: argparse.Namespace) -> int:
    import time

    from firm.synthetic.recipes.faithfulness import run_faithfulness

    prompts = {}
    for item in args.critic_prompts:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise SystemExit(f"--critic-prompts {item!r}: expected TEMPLATE=PATH (e.g. edit_execution=prompt.txt)")
        prompts[key] = path
    out = args.out or f"runs/faithfulness/{time.strftime('%Y%m%d-%H%M%S')}"
    run_faithfulness(
        out,
        experiment=args.experiment,
        critics=args.critics,
        seeds=args.seeds,
        critic_model=args.critic_model,
        max_new_tokens=args.critic_max_new_tokens,
        batch_size=args.critic_batch_size,
        prompts=prompts,
        steps=args.steps,
        overrides=args.overrides,
    )
    return 0


def _settings(cls: type, items: list[str], command: str, skip: tuple[str, ...] = ()) -> dict:
    """``KEY=VALUE`` strings as the fields of dataclass ``cls`` (str, bool, int, float, ``X | None``, or
    comma-separated lists); an unknown key or an unreadable value is an error naming the key."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    probe = cls()
    values: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"firm shapes {command}: {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        default = getattr(probe, key)
        annotation = str(fields[key].type)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError("expected true or false")
                values[key] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, list):
                kind = type(default[0]) if default else str
                values[key] = [kind(x) for x in raw.split(",") if x]
            elif isinstance(default, (int, float)):
                values[key] = type(default)(raw)
            elif default is None and annotation.startswith(("int", "float")):
                values[key] = (int if annotation.startswith("int") else float)(raw) if raw else None
            elif default is None:
                values[key] = raw or None
            else:
                values[key] = raw
        except ValueError as e:
            raise SystemExit(f"firm shapes {command}: {item!r}: {e}") from None
    return values


def _number(raw: str) -> int | float | bool:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return int(raw) if raw.lstrip("-").isdigit() else float(raw)
    except ValueError:
        raise SystemExit(f"--critic: {raw!r} is not a number or true/false") from None


def _cmd_critic_proof(args: argparse.Namespace) -> int:
    from firm.synthetic.recipes.critic_proof import ProofConfig, run_critic_proof

    skip = ("critic", "train_overrides", "bench_overrides", "out", "fresh")  # --out / --fresh set these
    values = _settings(ProofConfig, args.settings, "critic-proof", skip)
    values.update(out=args.out, fresh=args.fresh)
    values["critic"] = {k: _number(v) for k, v in (kv.split("=", 1) for kv in args.critic)}
    values["train_overrides"], values["bench_overrides"] = list(args.train), list(args.bench)
    results = run_critic_proof(ProofConfig(**values))
    return 0 if results["acceptance"]["ok"] else 1


def _cmd_pretrain_critic_base(args: argparse.Namespace) -> int:
    import json

    from firm.synthetic.recipes.critic_base import CriticBaseConfig, pretrain_critic_base

    values = _settings(CriticBaseConfig, args.settings, "pretrain-critic-base", ("critic", "grounding", "out", "fresh"))
    values.update(out=args.out, fresh=args.fresh)
    if args.critic:
        from firm.synthetic.recipes.critic_base import DEFAULT_CRITIC

        values["critic"] = {**DEFAULT_CRITIC, **{k: _number(v) for k, v in (kv.split("=", 1) for kv in args.critic)}}
    summary = pretrain_critic_base(CriticBaseConfig(**values))
    if args.export:
        from firm.synthetic.recipes.critic_base import export_base

        export_base(args.out, args.export)
    print(json.dumps({k: summary[k] for k in ("steps", "target_met", "heldout_exact", "wall_seconds")}, indent=2))
    return 0 if summary["target_met"] else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    ss = sub.noun("shapes")

    q = ss.add_parser(
        "ablate",
        help="the reward ablation: the same RL with CME, the plain sum and execution only; table + plot",
        description="Run the RL experiment once per reward and training seed, then write ablation.md (table), "
        "ablation.json and ablation.png into --out.",
    )
    q.add_argument(
        "--experiment", default="demo/ablation_edit_rewards", help="the RL experiment (a path or a shipped name)"
    )
    q.add_argument("--rewards", nargs="+", default=["cme", "weighted_sum", "execution_only"])
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    q.add_argument("--out", default=None, help="output folder (default: runs/ablation_edit_rewards/<timestamp>)")
    q.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    q.set_defaults(func=_cmd_ablate)

    q = ss.add_parser(
        "faithfulness",
        help="the same editing RL under the rule, a trained and a hallucinating critic; true held-out table + plot",
        description="Run the RL experiment once per critic and training seed (module.critic replaced per run), then "
        "write faithfulness.md (held-out numbers by the rule critic), faithfulness.json and faithfulness.png.",
    )
    q.add_argument("--experiment", default="demo/shapes_edit_cme", help="the RL experiment (a path or a shipped name)")
    q.add_argument("--critics", nargs="+", default=["rule", "trained", "hallucinating"], help="which arms")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    q.add_argument("--critic-model", default=None, help="the trained critic's save_pretrained directory")
    q.add_argument("--critic-max-new-tokens", type=int, default=12, help="its token budget (score-first JSON)")
    q.add_argument("--critic-batch-size", type=int, default=None, help="its conversations per generate() call")
    q.add_argument(
        "--critic-prompts",
        action="append",
        default=[],
        metavar="TEMPLATE=PATH",
        help="one of its prompt templates (PromptConfig field=file); repeat for more",
    )
    q.add_argument("--steps", type=int, default=None, help="trainer.max_steps of every run (default: the experiment's)")
    q.add_argument("--out", default=None, help="output folder (default: runs/faithfulness/<timestamp>)")
    q.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    q.set_defaults(func=_cmd_faithfulness)

    q = ss.add_parser(
        "critic-proof",
        help="build the held-out shapes bench, curate training data, train the tiny critic from scratch, benchmark it",
        description="The critic half of FIRM's claim on a CPU (docs/bench.md, section 4): benchmark, curation with the "
        "rule teacher, a random tiny Qwen3-VL, critic SFT, export, firm critic bench of the rule critic / label "
        "priors / untrained / trained critic; writes results.json, table.md and training.png into --out (finished "
        "stages are reused on a rerun). Exit status 1 when the trained critic misses its targets.",
    )
    q.add_argument("--out", default="runs/critic-proof", help="output folder (default runs/critic-proof)")
    q.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing finished stages")
    q.add_argument(
        "--critic", action="append", default=[], metavar="FIELD=NUMBER", help='a TinyCriticConfig field (with base="")'
    )
    q.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="an override of the SFT run")
    q.add_argument("--bench", action="append", default=[], metavar="KEY=VALUE", help="an override of firm critic bench")
    q.add_argument("settings", nargs="*", help="ProofConfig settings, e.g. steps=1500 train_edits=3000 arms=curated")
    q.set_defaults(func=_cmd_critic_proof)

    q = ss.add_parser(
        "pretrain-critic-base",
        help="pretrain the tiny critic base on grounded questions (seeing, changes, counts, captions; no scores)",
        description="Train the tiny Qwen3-VL of firm shapes tiny-critic from random weights on world-generated "
        "grounded questions in the critic's prompt layout until every question kind is >= target exact on held-out "
        "tasks (docs/bench.md, section 4). Writes <out>/base, curves.json, curves.png and summary.json; exit status 1 "
        "when the target was not reached.",
    )
    q.add_argument("--out", default="runs/critic-base", help="output folder (default runs/critic-base)")
    q.add_argument("--fresh", action="store_true", help="delete --out first")
    q.add_argument("--critic", action="append", default=[], metavar="FIELD=NUMBER", help="a TinyCriticConfig field")
    q.add_argument("--export", default=None, metavar="DIR", help="also copy the base with pretrain.json to DIR")
    q.add_argument("settings", nargs="*", help="CriticBaseConfig settings, e.g. steps=4000 lr=3e-4 threads=2")
    q.set_defaults(func=_cmd_pretrain_critic_base)
