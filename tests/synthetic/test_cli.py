import json

import pytest

from firm.cli import main


def test_preview_writes_a_png(tmp_path):
    out = tmp_path / "p.png"
    with pytest.raises(SystemExit) as e:
        main(["shapes", "preview", "--task", "gen", "--n", "2", "--out", str(out)])
    assert e.value.code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_critic_agreement_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:
        main(["shapes", "critic-agreement", "--n", "20", "--sizes", "32", "--out", str(out)])
    assert e.value.code == 0
    assert "agree E" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["device"] and len(res["rows"]) == 2
    assert all(r["agree_execution"] >= 0.95 and r["edit_per_s"] > 0 for r in res["rows"])
