"""The command grammar: every command, the module that registers it and the package whose code it runs; the renamed
spellings still reach their new commands, with a warning."""

import argparse
import ast
import inspect
import json
import textwrap

import pytest

from firm.cli import NOUNS, RENAMED, build_parser, main, renamed

# command -> (the module that registers it, the package whose code its handler imports, other packages it may import)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "run": ("firm.cli", "firm", ()),
    "list": ("firm.cli", "firm", ()),
    "doctor": ("firm.cli", "firm", ()),
    "curate": ("firm.curation.cli", "firm.curation", ()),
    "eval": ("firm.eval.cli", "firm.eval", ()),
    "critic score": ("firm.critics.cli", "firm.critics", ("firm.rewards",)),  # it writes the combined reward too
    "critic serve": ("firm.critics.cli", "firm.critics", ()),
    "reward serve": ("firm.rewards_cli", "firm.rewards", ()),  # beside firm/rewards/: importing it imports torch
    "critic export": ("firm.critics.cli", "firm.critics", ()),
    "critic bench": ("firm.bench.cli", "firm.bench", ()),
    "critic bench-convert": ("firm.bench.cli", "firm.bench", ()),
    "policy export": ("firm.policies.cli", "firm.policies", ()),
    "data import": ("firm.data.cli", "firm.data", ()),
    "data inspect": ("firm.data.cli", "firm.data", ()),
    "profile step": ("firm.profile.cli", "firm.profile", ()),
    "plan": ("firm.plan.cli", "firm.plan", ()),
    "kernels time": ("firm.kernels_cli", "firm.kernels", ()),  # beside firm/kernels/: importing it imports torch
    "kernels profile": ("firm.kernels_cli", "firm.kernels", ()),
    "shapes preview": ("firm.synthetic.cli", "firm.synthetic", ()),
    "shapes export": ("firm.synthetic.cli", "firm.synthetic", ()),
    "shapes export-bench": ("firm.synthetic.cli", "firm.synthetic", ()),
    "shapes critic-agreement": ("firm.synthetic.cli", "firm.synthetic", ()),
    "shapes ablate": ("firm.synthetic.recipes.cli", "firm.synthetic.recipes", ()),
    "shapes faithfulness": ("firm.synthetic.recipes.cli", "firm.synthetic.recipes", ()),
    "shapes critic-proof": ("firm.synthetic.recipes.cli", "firm.synthetic.recipes", ()),
    "shapes pretrain-critic-base": ("firm.synthetic.recipes.cli", "firm.synthetic.recipes", ()),
    "shapes tiny-critic": ("firm.synthetic.cli", "firm.synthetic", ()),
}
# Modules every command may use to find and load its experiment.
SHARED = ("firm.config", "firm.paths")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something (a leaf of the parser tree), by its words after `firm`."""
    found = {}
    for name, sub in _subcommands(parser).items():
        words = f"{prefix} {name}".strip()
        found.update(_commands(sub, words) if _subcommands(sub) else {words: sub})
    return found


def _firm_imports(fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("firm")}


def _is_in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_every_command_is_in_the_table_and_nothing_else():
    assert sorted(_commands(build_parser())) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_is_registered_by_the_package_that_holds_its_code(command):
    module, package, extra = COMMANDS[command]
    handler = _commands(build_parser())[command].get_default("func")
    assert handler.__module__ == module
    allowed = (package, *SHARED, *extra)
    outside = sorted(m for m in _firm_imports(handler) if not any(_is_in(m, p) for p in allowed))
    assert not outside, f"`firm {command}` ({module}) runs code of {outside}: register it in that package instead"


def test_the_package_check_sees_a_command_registered_in_the_wrong_package():
    def _cmd_export(args):  # what firm/bench/cli.py held before: a critic command
        from firm.critics.export import export_critic

        return export_critic

    assert _firm_imports(_cmd_export) == {"firm.critics.export"}
    assert not _is_in("firm.critics.export", "firm.bench")


def test_commands_are_verbs_or_a_noun_and_an_action():
    top = _subcommands(build_parser())
    assert sorted(n for n in top if n in NOUNS) == sorted(NOUNS)
    assert sorted(n for n in top if n not in NOUNS) == ["curate", "doctor", "eval", "list", "plan", "run"]
    assert not any("-" in name for name in top)


@pytest.mark.parametrize("old", sorted(RENAMED), ids=" ".join)
def test_an_old_spelling_reaches_its_new_command_with_a_warning(old, capsys):
    new = RENAMED[old]
    assert " ".join(new) in COMMANDS
    with pytest.raises(SystemExit) as e:
        main([*old, "--help"])
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: firm {' '.join(new)} ")
    assert f"`firm {' '.join(old)}` is deprecated" in err and f"use `firm {' '.join(new)}`" in err


def test_old_spellings_are_not_commands_of_their_own():
    commands = _commands(build_parser())
    top = _subcommands(build_parser())
    for old in RENAMED:
        assert " ".join(old) not in commands and old[0] not in set(top) - set(NOUNS)


def test_only_the_first_words_are_rewritten():
    assert renamed(["critic", "bench", "--data", "d"]) == (["critic", "bench", "--data", "d"], None)
    assert renamed(["kernels", "profile"]) == (["kernels", "profile"], None)
    assert renamed(["run", "bench"]) == (["run", "bench"], None)
    argv, warning = renamed(["bench", "--data", "d", "--critic", "rule"])
    assert argv == ["critic", "bench", "--data", "d", "--critic", "rule"] and "deprecated" in warning


def test_help_lists_the_renamed_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "serve-critic" in out and "firm critic serve" in out and "firm profile step" in out


def test_a_noun_alone_prints_its_actions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["critic"])
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert all(action in out for action in ("score", "serve", "export", "bench", "bench-convert"))


def test_an_old_spelling_runs_the_command(tmp_path, capsys):
    out = tmp_path / "agreement.json"
    with pytest.raises(SystemExit) as e:
        main(["shapes", "bench", "--n", "4", "--sizes", "32", "--out", str(out)])
    assert e.value.code == 0
    assert "deprecated" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["rows"]) == 2
