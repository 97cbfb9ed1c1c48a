"""`firm shapes ...`: look at the shapes world, export it, measure its rule critic.

firm shapes preview --task edit --n 6 --out shapes_edit.png   # tasks, simulated outputs and the critic's scores
firm shapes export --n 64 --out runs/prompts/shapes_edit       # a split's tasks as an RL prompt file
firm shapes critic-agreement --n 200 --out agreement.json     # rule critic vs the ground truth, and its items/s
firm shapes export-bench runs/bench-data/shapes                # a small synthetic FIRM-Bench (ground-truth scores)
firm shapes tiny-critic runs/tiny-critic                       # a tiny random Qwen3-VL critic for the CPU experiments

The studies that run on top of the world (`ablate`, `faithfulness`, `critic-proof`) are the recipes' commands:
firm/synthetic/recipes/cli.py.
"""

from __future__ import annotations

import argparse


def _cmd_preview(args: argparse.Namespace) -> int:
    import random

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from firm.synthetic.critic import ShapesRuleCritic, task_request
    from firm.synthetic.simulate import simulate_edit, simulate_generation
    from firm.synthetic.tasks import edit_tasks, gen_tasks
    from firm.synthetic.world import WorldConfig, render

    world = WorldConfig(size=args.size)
    critic = ShapesRuleCritic()
    rng = random.Random(args.seed)
    split = None if args.split == "all" else args.split
    if args.task == "edit":
        tasks = list(edit_tasks(split, world=world, start=args.seed, limit=args.n))
        modes = ["perfect", "copy", "partial", "overedit_1", "redraw"]
    else:
        tasks = list(gen_tasks(split, world=world, start=args.seed, limit=args.n))
        modes = ["perfect", "missing", "wrong_colour", "extra", "random"]
    cols = len(modes) + (1 if args.task == "edit" else 0)
    fig, axes = plt.subplots(len(tasks), cols, figsize=(1.9 * cols, 2.3 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        tiles = []
        if args.task == "edit":
            tiles.append((render(task.source, world), "source"))
        for mode in modes:
            if args.task == "edit":
                scene = simulate_edit(task, mode, rng, world)
            else:
                scene = simulate_generation(task, mode, rng, world)
            img = render(scene, world)
            s = critic.score([task_request(task, img, world)])[0].scores
            label = " ".join(f"{k[0].upper()}{v}" for k, v in s.items())
            tiles.append((img, f"{mode}\n{label}"))
        for ax, (img, title) in zip(row, tiles):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        text = task.instruction if args.task == "edit" else task.prompt
        row[0].set_ylabel("\n".join(_wrap(text, 28)), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return [*lines, cur]


def _cmd_critic_agreement(args: argparse.Namespace) -> int:
    import json
    import platform
    import random
    import time

    from tqdm import tqdm

    from firm.synthetic.critic import GroundTruthScorer, ShapesRuleCritic, task_request
    from firm.synthetic.simulate import EDIT_MODES, GEN_MODES, degrade, simulate_edit, simulate_generation
    from firm.synthetic.tasks import edit_tasks, gen_tasks
    from firm.synthetic.world import WorldConfig, render

    critic, gt = ShapesRuleCritic(), GroundTruthScorer()
    rows = []
    settings = [(size, noise) for size in args.sizes for noise in (0.0, args.noise)]
    for size, noise in tqdm(settings, desc="settings"):
        world = WorldConfig(size=size)
        rng = random.Random(args.seed)
        edit_reqs, edit_truth, gen_reqs, gen_truth = [], [], [], []
        for task in edit_tasks(world=world, limit=args.n):
            scene = simulate_edit(task, rng.choice(EDIT_MODES), rng, world)
            img = render(scene, world)
            edit_reqs.append(task_request(task, degrade(img, "noise", noise, seed=task.seed) if noise else img, world))
            edit_truth.append(gt.score_edit(task, scene))
        for task in gen_tasks(world=world, limit=args.n):
            scene = simulate_generation(task, rng.choice(GEN_MODES), rng, world)
            img = render(scene, world)
            gen_reqs.append(task_request(task, degrade(img, "noise", noise, seed=task.seed) if noise else img, world))
            gen_truth.append(gt.score_gen(task, scene))
        t0 = time.perf_counter()
        edit_res = critic.score(edit_reqs)
        t_edit = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen_res = critic.score(gen_reqs)
        t_gen = time.perf_counter() - t0

        def rate(results, truth, dim):
            return sum(r.scores[dim] == t[dim] for r, t in zip(results, truth)) / len(truth)

        rows.append(
            {
                "size": size,
                "noise_sigma": noise,
                "n": args.n,
                "edit_per_s": args.n / t_edit,
                "gen_per_s": args.n / t_gen,
                "agree_execution": rate(edit_res, edit_truth, "execution"),
                "agree_consistency": rate(edit_res, edit_truth, "consistency"),
                "agree_instruction": rate(gen_res, gen_truth, "instruction"),
            }
        )
    device = f"{platform.processor() or platform.machine()} ({platform.system()}), 1 process"
    print(f"\nshapes rule critic on {device}; simulated outputs of every mode, seed {args.seed}\n")
    head = f"{'size':>4} {'noise':>5} {'n':>5} {'edit/s':>8} {'gen/s':>8} {'agree E':>8} {'agree C':>8} {'agree I':>8}"
    print(head)
    for r in rows:
        print(
            f"{r['size']:>4} {r['noise_sigma']:>5g} {r['n']:>5} {r['edit_per_s']:>8.0f} {r['gen_per_s']:>8.0f} "
            f"{r['agree_execution']:>8.3f} {r['agree_consistency']:>8.3f} {r['agree_instruction']:>8.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "seed": args.seed, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from firm.synthetic.data import export_prompt_records
    from firm.synthetic.tasks import SplitConfig
    from firm.synthetic.world import WorldConfig

    split = None if args.split == "all" else args.split
    path = export_prompt_records(
        args.out,
        args.task,
        args.n,
        split,
        world=WorldConfig(size=args.size),
        split_config=SplitConfig(mode=args.split_mode),
        start=args.start,
    )
    print(f"wrote {args.n} {args.task} prompts ({args.split}) to {path}")
    return 0


def _cmd_export_bench(args: argparse.Namespace) -> int:
    from firm.synthetic.bench import build_shapes_bench

    out = build_shapes_bench(
        args.out, n_per_task=args.n_per_task, seed=args.seed, size=args.size, held_out=not args.train_split
    )
    print(f"[firm shapes export-bench] wrote {out}")
    return 0


def _cmd_tiny_critic(args: argparse.Namespace) -> int:
    from firm.synthetic.tiny_critic import TinyCriticConfig, build_tiny_critic

    out = build_tiny_critic(args.out, TinyCriticConfig(image_size=args.image_size), seed=args.seed)
    print(f"[firm shapes tiny-critic] wrote {out} (random weights; `firm shapes critic-proof` trains one)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    ss = sub.noun("shapes")

    q = ss.add_parser("preview", help="a PNG grid of tasks, simulated outputs and the rule critic's scores")
    q.add_argument("--task", choices=["edit", "gen"], default="edit")
    q.add_argument("--n", type=int, default=6, help="number of tasks (rows)")
    q.add_argument("--size", type=int, default=32, help="canvas size in pixels")
    q.add_argument("--split", choices=["train", "test", "all"], default="all")
    q.add_argument("--seed", type=int, default=0, help="first task seed (and seed of the simulated outputs)")
    q.add_argument("--out", default="shapes_preview.png")
    q.set_defaults(func=_cmd_preview)

    q = ss.add_parser("export", help="write a split's tasks as an RL prompt file (prompts.jsonl + source PNGs)")
    q.add_argument("--task", choices=["edit", "gen"], default="edit")
    q.add_argument("--n", type=int, required=True, help="number of tasks")
    q.add_argument("--split", choices=["train", "test", "all"], default="train")
    q.add_argument("--split-mode", choices=["hash", "combo"], default="hash", help="how tasks are split (SplitConfig)")
    q.add_argument("--size", type=int, default=32, help="canvas size in pixels")
    q.add_argument("--start", type=int, default=0, help="first task seed")
    q.add_argument("--out", required=True, help="output folder")
    q.set_defaults(func=_cmd_export)

    q = ss.add_parser(
        "critic-agreement",
        help="the rule critic's agreement with the ground-truth scorer, and its items/s",
        description="Score simulated outputs of every mode with the rule critic, clean and noisy, at each size; "
        "print how often it agrees with the ground-truth scorer per judgement, and its edit/gen items per second.",
    )
    q.add_argument("--n", type=int, default=200, help="tasks per setting (edit and gen each)")
    q.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    q.add_argument("--noise", type=float, default=8.0, help="Gaussian noise sigma of the noisy setting")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="write the results as JSON here")
    q.set_defaults(func=_cmd_critic_agreement)

    p = ss.add_parser(
        "export-bench",
        help="build a small synthetic benchmark from the procedural shapes world",
        description="Edit and generation items from the shapes world, scored by the ground-truth rubric "
        "(not by humans). Runs on CPU in seconds.",
    )
    p.add_argument("out", help="output benchmark directory")
    p.add_argument("--n-per-task", type=int, default=40, help="items per task (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--train-split", action="store_true", help="draw from the training split, not the held-out one")
    p.set_defaults(func=_cmd_export_bench)

    p = ss.add_parser(
        "tiny-critic",
        help="write a tiny random Qwen3-VL critic (tokenizer, image processor, chat template) for CPU runs",
        description="The real Qwen3-VL architecture at a tiny size with a BPE tokenizer trained on the critic "
        "prompts and shapes-world answers: what the CPU critic-training experiments fine-tune.",
    )
    p.add_argument("out", help="output directory (save_pretrained layout)")
    p.add_argument("--image-size", type=int, default=48, help="side every image is resized to (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_critic)
