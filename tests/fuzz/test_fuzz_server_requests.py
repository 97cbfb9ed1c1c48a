"""Fuzzing the critic server's request decoding (no model, no HTTP): any JSON body either fails validation with
errors that can be written as JSON, or decodes to a conversation or a 4xx answer; never an exception (HTTP 500)."""

import base64
import io
import json

from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from firm.critics.server import ChatCompletionBody, CriticAPI, _Invalid


class _Tokenizer:
    """One token per whitespace-separated word (enough to exercise the prompt cap)."""

    def get_vocab(self):
        return {"a": 0, "longest-entry": 1}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def _api() -> CriticAPI:
    api = CriticAPI("unused", served_name="fuzz", max_image_pixels=64 * 64, max_prompt_tokens=50, max_images=3)
    api.set_tokenizer(_Tokenizer())
    return api


def _png(size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


image_bytes = st.one_of(
    st.binary(max_size=200),
    st.just(_png()),
    st.just(_png(100)),
    st.binary(max_size=100).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
    st.binary(max_size=100).map(lambda b: _png()[:40] + b),
    st.binary(max_size=100).map(lambda b: b"\xff\xd8\xff" + b),
    st.binary(max_size=100).map(lambda b: b"RIFF\x00\x00\x00\x00WEBP" + b),
)
mime = st.sampled_from(["png", "jpeg", "webp", "tiff", "gif", "PNG"])
image_part = st.builds(
    lambda m, b: {"type": "image_url", "image_url": {"url": f"data:image/{m};base64," + base64.b64encode(b).decode()}},
    mime,
    image_bytes,
)
text_part = st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=120))
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
content = st.one_of(st.text(max_size=120), st.lists(st.one_of(text_part, image_part, junk), max_size=4), junk)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "robot"]), "content": content},
)
body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=3), junk)},
    optional={
        "temperature": st.one_of(st.floats(), st.integers(), st.text(max_size=5)),
        "max_tokens": st.one_of(st.integers(), st.floats()),
        "n": st.integers(-1, 3),
        "stream": st.booleans(),
        "model": st.text(max_size=5),
    },
)


@given(st.one_of(body, junk))
def test_request_decoding_never_raises(raw):
    api = _api()
    try:
        request = ChatCompletionBody.model_validate(raw)
    except ValidationError as e:
        errors = [{"loc": [str(x) for x in err["loc"]], "msg": str(err["msg"])} for err in e.errors()]
        json.dumps(errors, allow_nan=False)  # the 400 answer can always be written
        return
    out = api.decode_request(request)
    if isinstance(out, _Invalid):
        assert out.status in (400, 404, 413, 415) and out.message  # 404: a model name other than the served one
    else:
        temperature, max_new_tokens = out["settings"][:2]
        assert max_new_tokens >= 1 and 0.0 <= temperature <= 2.0
        assert all(m["role"] in ("user", "system", "assistant") for m in out["conversation"])
