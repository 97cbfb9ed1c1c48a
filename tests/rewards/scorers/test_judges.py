"""VLM-judge scorers (firm/rewards/scorers/judges.py): parsing and combination pinned to each judge's official code,
and the whole scorer against a real local OpenAI-compatible server.

The official code is transcribed below in our own words (behaviour kept, including its quirks), from:

* UnifiedReward: CodeGoat24/UnifiedReward @ ff6f520247a2d36e2aff7b2ba53a935afd437f66,
  ``sglang_llava/sglang_inference.py`` (``_extract_scores``, then ``score / 5``; the same code is Flow-GRPO's
  ``flow_grpo/rewards.py::unifiedreward_score_sglang``).
* UnifiedReward-Edit pointwise: CodeGoat24/Pref-GRPO @ 3e787f6dd5a3051b40d61f07e9578468ac26130a,
  ``fastvideo/rewards/unifiedreward_edit_pointwise.py`` (``_extract_json``, ``_parse_scores``, the weighted means
  with the default weights 1, 1).
* EditScore: VectorSpaceLab/EditScore @ 6e0f1b9a73b40f227d82d9cb32bd9cfb7189739b, ``editscore/json_parser.py``
  (``parse_vlm_output_to_dict``), ``editscore/__init__.py`` (``EditScore.batch_evaluate``; the prompt-following /
  consistency sub-scores as ``EditScore.evaluate`` computes them) and
  ``examples/OmniGen2-RL/reward_server/reward_server.py`` (``reward = O_score / 10``).
* RationalRewards: TIGER-AI-Lab/RationalRewards @ 44e27ab68d537bee8a6831efe000701664853435, ``README.md``
  (``parse_t2i_scores``, ``parse_i2i_scores``, ``extract_numeric_score``).
"""

import base64
import io
import json
import math
import re

import pytest
from PIL import Image

from firm.config import ConfigError
from firm.critics.types import EditRequest, GenRequest
from firm.rewards.scorers.base import build_scorer
from firm.rewards.scorers.judges import STYLES, JudgeParseError, VLMJudgeScorer, score_replies
from tests.critics.servers import ScriptedServer, chat_answer, closed_port_url, prompt_text

NAN = math.nan

# ---------------------------------------------------------------------------------------------------------------
# The official code, transcribed


def official_unifiedreward(text):
    """First ``Final Score:`` followed by [1-5](.digits)?, else 0.0; divided by 5."""
    m = re.search(r"Final Score:\s*([1-5](?:\.\d+)?)", text)
    return (float(m.group(1)) if m else 0.0) / 5.0


def _prefgrpo_pair(text):
    """Pref-GRPO's ``_parse_scores``: the first two numbers of the JSON object's ``score`` list, else [0, 0]."""
    payload = None
    if text:
        t = text.strip()
        try:
            decoded = json.loads(t)
            if isinstance(decoded, dict):
                payload = json.dumps(decoded)
            elif isinstance(decoded, str):
                t = decoded.strip()
        except json.JSONDecodeError:
            pass
        if payload is None:
            m = re.search(r"\{.*\}", t, re.DOTALL)
            payload = m.group(0) if m else None
    if payload is None:
        return [0.0, 0.0]
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        return [0.0, 0.0]
    scores = obj.get("score") if isinstance(obj, dict) else None
    if not isinstance(scores, (list, tuple)) or len(scores) < 2:
        return [0.0, 0.0]
    try:
        return [float(scores[0]), float(scores[1])]
    except (TypeError, ValueError):
        return [0.0, 0.0]


def official_unifiedreward_edit(sc_text, pq_text):
    sc, pq = _prefgrpo_pair(sc_text), _prefgrpo_pair(pq_text)
    return {"following": (sc[0] + sc[1]) / 2, "quality": (pq[0] + pq[1]) / 2, "sc": sc, "pq": pq}


def _editscore_list(s):
    """EditScore's ``parse_vlm_output_to_dict(s)["score"]``: JSON, then two repairs, then the numbers after the first
    ``score`` key (or anywhere)."""
    if not s or not s.strip():
        return []
    m = re.search(r"\{.*\}", s, re.DOTALL)
    target = m.group(0) if m else s.strip()

    def valid(data):  # _format_and_validate_dict: None when neither reasoning nor scores
        if not isinstance(data, dict):
            return None
        reasoning = next((data[k] for k in ("reasoning", "reason", "rationale") if isinstance(data.get(k), str)), "")
        scores = []
        if "score" in data:
            v = data["score"]
            if isinstance(v, list):
                scores = [float(x) for x in v if isinstance(x, (int, float, str))]
            elif isinstance(v, (int, float)):
                scores = [float(v)]
        return scores if (reasoning or scores) else None

    def quotes(t):  # _fix_json_quotes
        t = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", t)))
        try:
            json.loads(t.replace("'", '"'))
            return t.replace("'", '"')
        except json.JSONDecodeError:
            return re.sub(r"([\{\s,])(\w+)\s*:", r'\1"\2":', t)

    def inner_quotes(t):  # _repair_reasoning_field_robust
        pat = r'("reasoning"\s*:\s*")(.*?)(?="\s*[,}])'
        return re.sub(pat, lambda g: g.group(1) + g.group(2).replace('"', '\\"'), t, flags=re.DOTALL)

    for fix in (lambda t: t, quotes, inner_quotes):
        try:
            found = valid(json.loads(fix(target)))
        except (json.JSONDecodeError, TypeError):
            continue
        if found is not None:
            return found
    key = re.search(r"[\"']score[\"']\s*:\s*(.*)", target, re.DOTALL | re.IGNORECASE)  # _fallback_extract_and_rebuild
    return [float(n) for n in re.findall(r"[-+]?\d*\.?\d+", key.group(1) if key else target)]


def official_editscore(sc_text, pq_text, r=25):
    """``batch_evaluate``'s SC / PQ / O scores and the reward server's ``O / 10``."""
    sc, pq = _editscore_list(sc_text) or [r / 2], _editscore_list(pq_text) or [r / 2]
    s, p = min(sc) / (r / 10), min(pq) / (r / 10)
    s = r / 2 if s < 0 or s > 10 else s
    p = r / 2 if p < 0 or p > 10 else p
    o = math.sqrt(s * p)
    return {
        "editscore": o / 10,
        "editscore_sc": s / 10,
        "editscore_pq": p / 10,
        "editscore_prompt_following": sc[0] / (r / 10) / 10,
        "editscore_consistency": sc[1] / (r / 10) / 10 if len(sc) > 1 else NAN,
    }


def _rr_number(v):  # extract_numeric_score
    if v == "N/A":
        return "N/A"
    m = re.match(r"^\s*(\d+(?:\.\d+)?)", v.strip())
    if m:
        return float(m.group(1))
    raise ValueError(v)


def official_rr_t2i(text):
    """``parse_t2i_scores``: line-started numbered sections, the first readable Score line, scores clamped to [1, 4],
    ``(mean - 1) / 3`` clamped to [0, 1], 0.0 when nothing was read."""
    body = text.split("# Summary:")[0]
    heads = (
        ("1.", "Text Faithfulness", "tf"),
        ("2.", "Physical and Visual Quality", "pq"),
        ("3.", "Text Rendering", "tr"),
    )
    blocks, cur, buf = {}, None, []
    for line in body.split("\n"):
        st = line.strip()
        hit = next((k for n, t, k in heads if st.startswith(n) and t in st), None)
        if hit:
            if cur:
                blocks[cur] = buf
            cur, buf = hit, [line]
        elif cur:
            buf.append(line)
    if cur:
        blocks[cur] = buf
    res = {"tf": None, "pq": None, "tr": None}
    for k, lines in blocks.items():
        for line in lines:
            m = re.search(r"(?:##\s*)?Score\s*:\s*(.+)$", line.strip(), re.IGNORECASE)
            if m:
                try:
                    res[k] = _rr_number(m.group(1).strip())
                    break
                except ValueError:
                    continue
    vals = [max(1.0, min(4.0, float(v))) for v in res.values() if v is not None and v != "N/A"]
    norm = (sum(vals) / len(vals) - 1) / 3 if vals else 0.0
    return max(0.0, min(1.0, norm)), res


def official_rr_i2i(text):
    """``parse_i2i_scores``: sections split at the headings (or at numbered lines), the first ``## Score:`` line with
    ``*`` stripped, ``(mean - 1) / 3`` of the four aspects (N/A and unread left out), 0.0 when nothing was read."""
    body = text.split("# Summary:")[0]
    h = ("Text Faithfulness:", "Image Faithfulness:", "Physical and Visual Quality:", "Text Rendering:")
    if h[0] in body:
        _, _, rest = body.partition(h[0])
        blocks = []
        for head in h[1:]:
            block, _, rest = rest.partition(head) if head in rest else (rest, "", "")
            blocks.append(block)
        blocks.append(rest)
    else:
        parts = re.split(r"\n\s*\d+\.\s+", body)
        blocks = [parts[i] if len(parts) > i else "" for i in range(1, 5)]
    res = []
    for block in blocks:
        value = None
        for line in block.split("\n"):
            line = line.strip()
            if "## Score:" in line:
                try:
                    value = _rr_number(line.split("## Score:")[-1].strip().strip("*").strip())
                    break
                except ValueError:
                    continue
        res.append(value)
    vals = [float(v) for v in res if v is not None and v != "N/A"]
    return ((sum(vals) / len(vals) - 1) / 3 if vals else 0.0), res


# ---------------------------------------------------------------------------------------------------------------
# Real-looking answers, well formed and not


def ours(style, replies):
    """Our outputs from the answers, NaN everywhere when an answer is unreadable."""
    try:
        return score_replies(style, replies)
    except JudgeParseError:
        return dict.fromkeys(STYLES[style].outputs, NAN)


def close(a, b):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9


UR_AGREE = [
    "A cat (object): 1\nred hat (attribute): 1\nsitting (action): 0\nFinal Score: 4",
    "The image matches the caption well, with crisp details.\nFinal Score: 3.5",
    "Final Score:5",
    "Final Score: 4/5",
    "Final Score: 2\n\nOn reflection the colours are off. Final Score: 5",  # the first one counts
]
# (answer, the official value, why ours differs)
UR_DIFFER = [
    ("Final Score: 10", 0.2, "out of 1..5 (the official regex reads its first digit)"),
    ("Final Score: 5.5", 1.1, "out of 1..5"),
    ("Final Score: 0", 0.0, "no score: the official code substitutes 0"),
    ("I cannot evaluate this image.", 0.0, "no score: the official code substitutes 0"),
    ("final score: 4", 0.0, "no score (the label is case-sensitive in both)"),
]


def test_unifiedreward_parity():
    for text in UR_AGREE:
        assert close(ours("unifiedreward", {"score": text})["unifiedreward"], official_unifiedreward(text)), text
    for text, official, why in UR_DIFFER:
        assert close(official_unifiedreward(text), official), text
        assert math.isnan(ours("unifiedreward", {"score": text})["unifiedreward"]), why
    # markdown bold around the number: read here, 0 (no match) in the official code
    assert ours("unifiedreward", {"score": "Final Score: **4**"})["unifiedreward"] == 0.8
    assert official_unifiedreward("Final Score: **4**") == 0.0


SC_OK = '{"reasoning": "The hat is red now and nothing else moved.", "score": [22, 24]}'
PQ_OK = '{"reasoning": "Natural light, no visible artifacts.", "score": [20, 23]}'
VIE_AGREE = [  # (SC answer, PQ answer), read alike by EditScore, Pref-GRPO and FIRM
    (SC_OK, PQ_OK),
    (
        'Here is my evaluation:\n{\n"reasoning" : "The sky became a sunset.",\n"score" : [15, 20]\n}',
        '```json\n{"reasoning": "Slight halo around the roof.", "score": [18.5, 12]}\n```',
    ),
    ('{"reasoning": "Barely changed.", "score": [3, 25]}', '{"reasoning": "Looks fine.", "score": [25, 0]}'),
    ('{"reasoning": "ok", "score": [20, 18, 5]}', '{"score": [10, 11], "reasoning": "soft"}'),  # a third number
]
EDITSCORE_ALSO = [  # answers EditScore's repairs read, as FIRM does (Pref-GRPO gives [0, 0])
    ('{\n"reasoning" : "done",\n"score" : [21, 19],\n}', '{"reasoning": "fine", "score": [17, 22],}'),  # trailing comma
    ("{'reasoning': 'single quotes', 'score': [9, 14]}", PQ_OK),
    ('{"reasoning": "the "red" hat is there", "score": [23, 20]}', PQ_OK),  # unescaped quotes in the reasoning
    ('{reasoning: "unquoted keys", score: [12, 16]}', PQ_OK),
    ("[18, 22]", "[24, 7]"),  # a bare list
]
VIE_DIFFER = [  # EditScore substitutes a number (mid-range, or numbers from prose); FIRM: NaN
    ("The edit looks good overall.", PQ_OK),
    ("I would rate this 7 out of 10.", PQ_OK),
    ("", PQ_OK),
    ('{"reasoning": "too high", "score": [30, 40]}', PQ_OK),
    ('{"reasoning": "one number", "score": 20}', PQ_OK),
    (SC_OK, '{"reasoning": "no scores given"}'),
]


def test_editscore_parity():
    for sc, pq in VIE_AGREE + EDITSCORE_ALSO:
        got, want = ours("editscore", {"sc": sc, "pq": pq}), official_editscore(sc, pq)
        for k, v in want.items():
            assert close(got[k], v), (sc, pq, k, got[k], v)
    for sc, pq in VIE_DIFFER:
        official = official_editscore(sc, pq)["editscore"]
        assert math.isfinite(official), "the official code substitutes a score"
        assert math.isnan(ours("editscore", {"sc": sc, "pq": pq})["editscore"]), (sc, pq)
    # the documented fallbacks: an unreadable answer counts as mid-range, an out-of-range one as 12.5 on 0..10
    assert close(official_editscore("The edit looks good overall.", PQ_OK)["editscore_sc"], 0.5)
    assert close(official_editscore('{"reasoning": "too high", "score": [30, 40]}', PQ_OK)["editscore_sc"], 1.25)


def test_unifiedreward_edit_parity():
    for sc, pq in VIE_AGREE:
        got, want = ours("unifiedreward_edit", {"sc": sc, "pq": pq}), official_unifiedreward_edit(sc, pq)
        assert close(got["unifiedreward_edit_following"], want["following"]), sc
        assert close(got["unifiedreward_edit_quality"], want["quality"]), pq
        assert [got["unifiedreward_edit_success"], got["unifiedreward_edit_overediting"]] == want["sc"]
        assert [got["unifiedreward_edit_naturalness"], got["unifiedreward_edit_artifacts"]] == want["pq"]
        assert close(got["unifiedreward_edit"], (want["following"] + want["quality"]) / 2)
    for sc, pq in EDITSCORE_ALSO:  # Pref-GRPO's strict JSON drops these (0, 0); FIRM reads them as EditScore does
        assert official_unifiedreward_edit(sc, pq)["sc"] == [0.0, 0.0]
        assert math.isfinite(ours("unifiedreward_edit", {"sc": sc, "pq": pq})["unifiedreward_edit"])
    for sc, pq in VIE_DIFFER:
        assert math.isnan(ours("unifiedreward_edit", {"sc": sc, "pq": pq})["unifiedreward_edit"]), (sc, pq)
    assert official_unifiedreward_edit("The edit looks good overall.", PQ_OK)["sc"] == [0.0, 0.0]


def rr_answer(scores, task="gen", *, bold=False, order="justification-first", extra=""):
    """A RationalRewards answer in its trained format; ``scores`` are strings (``"3.5"``, ``"N/A"``) or None
    (section left out)."""
    titles = ["Text Faithfulness", "Physical and Visual Quality", "Text Rendering"]
    if task == "edit":
        titles.insert(1, "Image Faithfulness")
    lines = ["# User Request Analysis", "The user wants a red vintage car by a lake at sunset.", "# Detailed Judgement"]
    n = 0
    for title, s in zip(titles, scores):
        if s is None:
            continue
        n += 1
        score = f"## Score: **{s}**" if bold else f"## Score: {s}"
        just = f"## Justification: The {title.lower()} is judged against the request.{extra}"
        lines += [f"{n}. {title}:", *([just, score] if order == "justification-first" else [score, just])]
    lines += ["# Summary: A solid result with small flaws.", "", "# User Request Refinement:"]
    lines += ["## Refinement Comments: Name the time of day.", "## Refined Request: A red 1960s car by a calm lake"]
    return "\n".join(lines)


RR_GEN_AGREE = [
    rr_answer(["3.5", "3.0", "N/A"]),
    rr_answer(["2.25", "3.75", "1.5"]),
    rr_answer(["4.3", "0.5", "N/A"]),  # clamped to [1, 4] in both
    rr_answer(["3.5 (minor colour drift)", "3", "N/A"], order="score-first"),
]
RR_GEN_DIFFER = [  # (answer, the official value, why FIRM gives NaN)
    (rr_answer(["3.5", None, "N/A"]), 2.5 / 3, "the Physical Quality section is missing: official averages the rest"),
    (rr_answer(["N/A", "3.0", "N/A"]), 2 / 3, "Text Faithfulness is N/A: official averages the rest"),
    ("I cannot evaluate this image.", 0.0, "nothing to read: official substitutes 0"),
    (rr_answer(["3.0", "3.0", "N/A"]).split("2. Physical")[0], 2 / 3, "cut off after the first aspect"),
]
RR_EDIT_AGREE = [
    rr_answer(["3.5", "3.0", "2.5", "N/A"], "edit"),
    rr_answer(["3.5", "3.0", "2.5", "4"], "edit"),
    rr_answer(["3.5", "3.0", "2.5", "N/A"], "edit", bold=True),  # the I2I parser strips the stars
    rr_answer(["4.2", "3.9", "4.1", "N/A"], "edit"),  # not clamped for edits: above 1 in both
]
RR_EDIT_DIFFER = [
    (rr_answer(["3.5", None, "2.5", "N/A"], "edit"), 2.5 / 3, "Image Faithfulness missing: official keeps only TF"),
    ("Sorry, I can't help with that.", 0.0, "nothing to read: official substitutes 0"),
]


def test_rationalrewards_parity():
    for text in RR_GEN_AGREE:
        got = ours("rationalrewards", {"judge": text})
        value, parsed = official_rr_t2i(text)
        assert close(got["rationalrewards"], value), text
        clamp = {k: min(4.0, max(1.0, v)) for k, v in parsed.items() if isinstance(v, float)}
        assert close(got["rationalrewards_text_faithfulness"], (clamp["tf"] - 1) / 3)
        assert close(got["rationalrewards_physical_quality"], (clamp["pq"] - 1) / 3)
    for text, official, why in RR_GEN_DIFFER:
        assert close(official_rr_t2i(text)[0], official), why
        assert math.isnan(ours("rationalrewards", {"judge": text})["rationalrewards"]), why
    for text in RR_EDIT_AGREE:
        got = ours("rationalrewards_edit", {"judge": text})
        value, parsed = official_rr_i2i(text)
        assert close(got["rationalrewards_edit"], value), text
        assert close(got["rationalrewards_edit_image_faithfulness"], (parsed[1] - 1) / 3)
    assert ours("rationalrewards_edit", {"judge": RR_EDIT_AGREE[3]})["rationalrewards_edit"] > 1
    for text, official, why in RR_EDIT_DIFFER:
        assert close(official_rr_i2i(text)[0], official), why
        assert math.isnan(ours("rationalrewards_edit", {"judge": text})["rationalrewards_edit"]), why
    # bold scores: the T2I parser cannot read "**3.0**" and drops the aspect; FIRM reads it
    bold = rr_answer(["2.0", "3.5", "N/A"], bold=True)
    assert official_rr_t2i(bold)[0] == 0.0
    assert close(ours("rationalrewards", {"judge": bold})["rationalrewards"], ((2.0 + 3.5) / 2 - 1) / 3)


def test_wrong_combination_is_seen():
    """The parity tests can see a wrong formula or parser: the same answers through another style's combination give
    other scores."""
    replies = {"sc": '{"reasoning": "x", "score": [10, 22]}', "pq": '{"reasoning": "y", "score": [24, 18]}'}
    right = ours("editscore", replies)["editscore"]
    assert close(right, official_editscore(replies["sc"], replies["pq"])["editscore"])
    mean_based = ours("unifiedreward_edit", replies)["unifiedreward_edit"] / 25  # Pref-GRPO's means, on [0, 1]
    assert abs(right - mean_based) > 0.1
    with pytest.raises(JudgeParseError):  # a VIEScore answer is no RationalRewards answer
        score_replies("rationalrewards_edit", {"judge": replies["sc"]})


# ---------------------------------------------------------------------------------------------------------------
# End to end: the scorer against a real local OpenAI-compatible server

SRC, OUT, GEN = (220, 40, 10), (30, 60, 180), (90, 200, 120)


def _pixels(body):
    """The first pixel of each image of a request, in order (decoded from the base64 data URLs)."""
    out = []
    for m in body["messages"]:
        for p in m["content"] if isinstance(m["content"], list) else []:
            if p["type"] == "image_url":
                url = p["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                out.append(
                    Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB").getpixel((0, 0))
                )
    return out


class FakeJudge:
    """Answers in each judge's format with scores computed from the images it was sent, so a request with the images
    in the wrong places gets other scores. ``"flaky"`` in the text: an unreadable first answer; ``"broken"``: always
    unreadable; ``"huge"``: HTTP 413."""

    def __init__(self):
        self.seen = {}

    def __call__(self, body):
        text, px = prompt_text(body), _pixels(body)
        if "huge" in text:
            return 413, {"error": {"message": "request too large"}}
        n = self.seen[text] = self.seen.get(text, 0) + 1
        if "broken" in text or ("flaky" in text and n == 1):
            return 200, chat_answer("I'd rather not say.")
        if "Final Score" in text:
            return 200, chat_answer(f"red car (object): 1\nFinal Score: {1 + px[0][2] // 64}")
        if "score = [score1, score2]" in text:
            return 200, chat_answer(json.dumps({"reasoning": "r", "score": [px[1][2] // 10, px[0][0] // 10]}))
        if "score = [naturalness, artifacts]" in text:
            return 200, chat_answer(json.dumps({"reasoning": "q", "score": [px[-1][1] // 5, px[-1][2] // 10]}))
        if "# Detailed Judgement" in text:
            scores = [str(1 + px[-1][2] / 85)] + ([str(1 + px[0][0] / 85)] if len(px) == 2 else [])
            return 200, chat_answer(
                rr_answer([*scores, str(1 + px[-1][1] / 85), "N/A"], "edit" if len(px) == 2 else "gen")
            )
        return 200, chat_answer("?")


def _img(color):
    return Image.new("RGB", (24, 16), color)


def _judge(srv, style, **kw):
    kw.setdefault("backoff_s", 0.01)
    return VLMJudgeScorer(VLMJudgeScorer.Config(style=style, endpoints=[srv.url], model="judge-m", **kw))


@pytest.fixture(scope="module")
def server():
    judge = FakeJudge()
    with ScriptedServer(judge, model="judge-m") as srv:
        yield srv, judge


def _bodies(srv, since):
    return srv.bodies[since:]


def test_editscore_end_to_end(server, monkeypatch):
    srv, _ = server
    monkeypatch.setenv("FIRM_JUDGE_API_KEY", "sekret")
    n0 = len(srv.bodies)
    edits = [EditRequest(_img(SRC), _img(OUT), "make the car blue"), EditRequest(_img(SRC), _img(OUT), "broken one")]
    with _judge(srv, "editscore") as sc:
        out = sc(edits)
    # SC: [B(edited) // 10, R(source) // 10] = [18, 22]; PQ: [G(edited) // 5, B(edited) // 10] = [12, 18]
    assert out.values["editscore"][0].item() == pytest.approx(math.sqrt(18 / 25 * 12 / 25))
    assert out.values["editscore_sc"][0].item() == pytest.approx(18 / 25)
    assert out.values["editscore_pq"][0].item() == pytest.approx(12 / 25)
    assert out.values["editscore_prompt_following"][0].item() == pytest.approx(18 / 25)
    assert out.values["editscore_consistency"][0].item() == pytest.approx(22 / 25)
    assert out.errors[0] is None and out.details[0]["answers"][0]["sc"]["parsed"]["scores"] == [18.0, 22.0]
    assert all(math.isnan(v[1].item()) for v in out.values.values())  # only the unreadable request is missing
    assert "unreadable answer after 2 attempt(s)" in out.errors[1]
    bodies = _bodies(srv, n0)
    assert len(bodies) == 2 + 3  # SC + PQ per request, and the broken request's SC answer asked again once
    sc_body = next(b for b in bodies if "make the car blue" in prompt_text(b) and "score1" in prompt_text(b))
    pq_body = next(b for b in bodies if "naturalness" in prompt_text(b) and "broken" not in prompt_text(b))
    assert _pixels(sc_body) == [SRC, OUT] and _pixels(pq_body) == [OUT]
    parts = sc_body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[0]["text"] == "<img1>: " and parts[2]["text"] == "<img2>: "
    assert "Editing instruction: make the car blue" in parts[4]["text"] and "from 0 to 25" in parts[4]["text"]
    assert sc_body["model"] == "judge-m" and sc_body["temperature"] == 0.0 and sc_body["max_tokens"] == 512
    assert srv.headers[n0]["Authorization"] == "Bearer sekret"
    retried = [b for b in bodies if "broken" in prompt_text(b)]
    assert [b["temperature"] for b in retried] == [0.0, 0.7]


def test_wrong_image_order_changes_the_score(server):
    """A template bug that swaps the source and the edited image (or shows the judge the source for quality) gives
    other scores: the end-to-end check would see it."""
    srv, _ = server

    class Swapped(VLMJudgeScorer):
        def _messages(self, template, r, images):
            swapped = EditRequest(r.edited, r.source, r.instruction)
            return super()._messages(template, swapped, images)

    edits = [EditRequest(_img(SRC), _img(OUT), "make the car blue")]
    with _judge(srv, "editscore") as right:
        good = right(edits).values["editscore"][0].item()
    with Swapped(Swapped.Config(style="editscore", endpoints=[srv.url], model="judge-m")) as wrong:
        bad = wrong(edits).values["editscore"][0].item()
    assert abs(good - bad) > 0.1


def test_unifiedreward_edit_end_to_end(server):
    srv, _ = server
    n0 = len(srv.bodies)
    edits = [EditRequest(_img(SRC), _img(OUT), "make it blue flaky"), EditRequest(_img(SRC), _img(OUT), "huge")]
    with _judge(srv, "unifiedreward_edit") as sc:
        out = sc(edits)
    v = {k: t[0].item() for k, t in out.values.items()}
    assert (v["unifiedreward_edit_success"], v["unifiedreward_edit_overediting"]) == (18, 22)
    assert (v["unifiedreward_edit_naturalness"], v["unifiedreward_edit_artifacts"]) == (12, 18)
    assert v["unifiedreward_edit_following"] == 20 and v["unifiedreward_edit_quality"] == 15
    assert v["unifiedreward_edit"] == 17.5
    assert out.details[0]["answers"][0]["sc"]["attempts"] == 2  # the flaky answer was asked again
    assert math.isnan(out.values["unifiedreward_edit"][1].item()) and "too large" in out.errors[1]
    sc_body = next(b for b in _bodies(srv, n0) if "flaky" in prompt_text(b))
    assert [p["type"] for p in sc_body["messages"][0]["content"]] == ["image_url", "image_url", "text"]  # no labels
    assert sc_body["max_tokens"] == 4096


def test_unifiedreward_and_rationalrewards_end_to_end(server):
    srv, _ = server
    n0 = len(srv.bodies)
    gens = [GenRequest(_img(GEN), "a green car by a lake"), GenRequest(_img(OUT), "a blue car")]
    with _judge(srv, "unifiedreward") as ur:
        out = ur(gens)
    assert out.values["unifiedreward"].tolist() == pytest.approx([(1 + 120 // 64) / 5, (1 + 180 // 64) / 5])
    body = next(b for b in _bodies(srv, n0) if "green" in prompt_text(b))  # the requests run concurrently
    assert _pixels(body) == [GEN] and "Text Caption: [a green car by a lake]" in prompt_text(body)

    n0 = len(srv.bodies)
    with _judge(srv, "rationalrewards") as rr:
        out = rr(gens[:1])
    tf, pq = 1 + GEN[2] / 85, 1 + GEN[1] / 85
    assert out.values["rationalrewards"][0].item() == pytest.approx(((tf + pq) / 2 - 1) / 3)
    assert out.values["rationalrewards_physical_quality"][0].item() == pytest.approx((pq - 1) / 3)
    assert out.details[0]["answers"][0]["judge"]["parsed"]["refined_request"] == "A red 1960s car by a calm lake"
    body = _bodies(srv, n0)[0]
    assert body["messages"][0]["role"] == "system" and body["max_tokens"] == 2048
    assert [p["type"] for p in body["messages"][1]["content"]] == ["text", "image_url", "text"]
    assert body["messages"][1]["content"][0]["text"].startswith("User Instruction: a green car by a lake")

    n0 = len(srv.bodies)
    with _judge(srv, "rationalrewards_edit") as rr:
        out = rr([EditRequest(_img(SRC), _img(OUT), "make the car blue")])
    tf, im, pq = 1 + OUT[2] / 85, 1 + SRC[0] / 85, 1 + OUT[1] / 85
    assert out.values["rationalrewards_edit"][0].item() == pytest.approx(((tf + im + pq) / 3 - 1) / 3)
    assert out.values["rationalrewards_edit_image_faithfulness"][0].item() == pytest.approx((im - 1) / 3)
    assert _pixels(_bodies(srv, n0)[0]) == [SRC, OUT]


def test_config_registry_and_prompt_files(server, tmp_path):
    srv, _ = server
    with pytest.raises(ConfigError, match="style"):
        build_scorer({"name": "vlm_judge", "style": "nope"})
    with pytest.raises(ConfigError, match="temperature"):
        build_scorer({"name": "vlm_judge", "style": "editscore", "passes": 4})
    judge = build_scorer({"name": "vlm_judge", "style": "editscore", "endpoints": [srv.url], "model": "judge-m"})
    assert judge.tasks == ("edit",) and judge.primary == "editscore"
    with pytest.raises(TypeError, match="edit requests"):
        judge([GenRequest(_img(GEN), "a car")])
    judge.close()
    dead = VLMJudgeScorer(VLMJudgeScorer.Config(style="unifiedreward", endpoints=[closed_port_url()], max_retries=0))
    out = dead([GenRequest(_img(GEN), "a car")])  # an unreachable endpoint costs the call: missing, with the reason
    assert math.isnan(out.values["unifiedreward"][0].item()) and "CriticEndpointError" in out.errors[0]
    dead.close()

    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder")
    with pytest.raises(ValueError, match="instruction"):
        _judge(srv, "editscore", prompts={"vie_sc": str(bad)})
    mine = tmp_path / "sc.txt"
    mine.write_text("Original <image> edited <image>. Instruction: {instruction}. score = [score1, score2]")
    n0 = len(srv.bodies)
    with _judge(srv, "editscore", prompts={"vie_sc": str(mine)}, passes=2, temperature=0.5) as sc:
        out = sc([EditRequest(_img(SRC), _img(OUT), "make the car blue")])
    body = next(b for b in _bodies(srv, n0) if "Original" in prompt_text(b))
    assert [p.get("text") for p in body["messages"][0]["content"]] == [
        "Original ",
        None,
        " edited ",
        None,
        ". Instruction: make the car blue. score = [score1, score2]",
    ]
    assert len(_bodies(srv, n0)) == 4 and len(out.details[0]["answers"]) == 2  # two passes of SC + PQ
    assert out.values["editscore"][0].item() == pytest.approx(math.sqrt(18 / 25 * 12 / 25))
