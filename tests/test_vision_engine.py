"""Images into a local model, engine side: the real tiny text model with a real tiny
vision projector (tests/mmprojmaker.py), through llama.cpp's libmtmd, in-process.

Cases where llama.cpp could abort run in a subprocess, so that an abort fails one test
instead of ending the run.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import mmprojmaker
import numpy as np
import pytest
from anyad.backends.llama_cpp import vision

pytestmark = pytest.mark.skipif(vision.unavailable_reason() is not None,
                                reason=vision.unavailable_reason() or "")

N_IMAGE = mmprojmaker.TINY_VISION.n_patches  # positions one image takes with the tiny projector
BEFORE = "<|im_start|>user\nLook at this: "
AFTER = " What is it?<|im_end|>\n<|im_start|>assistant\n"


from mmprojmaker import RED, STRIPES
# The classic 1x1 GIF.
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
       b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


@pytest.fixture(scope="module")
def projector(tiny_model: Path) -> Path:
    return mmprojmaker.make_mmproj(tiny_model.parent / mmprojmaker.mmproj_name(tiny_model))


@pytest.fixture(scope="module")
def llm(tiny_model: Path):
    import llama_cpp

    class CountingLlama(llama_cpp.Llama):
        """Counts the tokens llama-cpp-python evaluates: a prompt evaluated again shows here."""

        evaluated = 0

        def eval(self, tokens):  # type: ignore[override]
            self.evaluated += len(tokens)
            super().eval(tokens)

    model = CountingLlama(str(tiny_model), n_ctx=512, n_threads=2, logits_all=False, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def eye(llm, projector: Path) -> vision.Vision:
    return vision.Vision(llm, projector, n_threads=2)


def tokens(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def last_logits(llm) -> np.ndarray:
    """The logits the next token would be sampled from (logits_all is off: only the last row exists)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], check=False, capture_output=True, text=True)


def test_an_image_takes_its_positions_between_the_text(llm, eye):
    llm.reset()
    prompt = eye.eval_prompt(llm, BEFORE + eye.media_marker + AFTER, [RED])

    before, after = tokens(llm, BEFORE), tokens(llm, AFTER)
    assert prompt.n_positions == len(before) + N_IMAGE + len(after)
    assert prompt.tokens[:len(before)] == before and prompt.tokens[-len(after):] == after
    assert llm.n_tokens == prompt.n_positions  # all of it is in the context now


def test_generation_starts_from_the_evaluated_prompt(llm, eye):
    llm.reset()
    prompt = eye.eval_prompt(llm, BEFORE + eye.media_marker + AFTER, [STRIPES])
    start = llm.evaluated
    texts = []
    for chunk in llm.create_completion(prompt.tokens, max_tokens=4, temperature=0.0, stream=True):
        if not texts:
            # Sampled from the logits eval_prompt left: nothing was evaluated before it.
            assert llm.evaluated == start and llm.n_tokens == prompt.n_positions
        texts.append(chunk["choices"][0]["text"])
    assert "".join(texts).strip()
    # Each generated token but the last is evaluated, one at a time; the prompt never again
    # (its image positions hold ids no vocabulary has: evaluating them would fail outright).
    assert llm.evaluated - start == 3

    # A second choice on the same prompt (n > 1) replays only its last token.
    start = llm.evaluated
    again = "".join(c["choices"][0]["text"] for c in
                    llm.create_completion(prompt.tokens, max_tokens=4, temperature=0.0, stream=True))
    assert llm.evaluated - start == 1 + 3
    assert again == "".join(texts)


def test_the_image_reaches_the_model_and_a_resent_one_is_not_encoded_again(llm, eye):
    text = BEFORE + eye.media_marker + AFTER
    n_before = len(tokens(llm, BEFORE))
    llm.reset()
    eye.eval_prompt(llm, text, [RED])
    red = last_logits(llm)

    other = eye.eval_prompt(llm, text, [STRIPES])
    assert other.n_cached == n_before  # the text before the image, not the other image
    stripes = last_logits(llm)
    apart = float(np.abs(red - stripes).max())
    assert apart > 1e-2  # another image, other logits

    # The next turn of a chat sends the same image again: only the last token is evaluated.
    start = llm.evaluated
    same = eye.eval_prompt(llm, text, [STRIPES])
    assert same.n_cached == same.n_positions - 1 and llm.evaluated - start == 1
    # The same logits, to float32 rounding (one token's kernels are not a whole prompt's on
    # every CPU): far nearer to them than the other image's.
    drift = float(np.abs(last_logits(llm) - stripes).max())
    assert drift < 2e-3 and drift < apart / 10


def test_a_text_prompt_never_takes_an_images_positions_for_its_own(llm, eye):
    # The text where the image goes later is longer than the image, so an image's positions
    # left holding this prompt's stale token ids would match it and be reused as text.
    middle = "a small red square drawn by hand on a white page"
    assert len(tokens(llm, middle)) > N_IMAGE
    text_only = tokens(llm, BEFORE + middle + AFTER)
    llm.reset()
    list(llm.create_completion(text_only, max_tokens=1, temperature=0.0))
    fresh = last_logits(llm)

    eye.eval_prompt(llm, BEFORE + eye.media_marker + AFTER, [RED])
    start = llm.evaluated
    list(llm.create_completion(text_only, max_tokens=1, temperature=0.0))
    assert llm.evaluated - start == len(text_only) - len(tokens(llm, BEFORE))
    np.testing.assert_allclose(last_logits(llm), fresh, atol=1e-4)


def test_markers_and_images_must_agree(llm, eye):
    m = eye.media_marker
    for text, images in ((BEFORE + m + m + AFTER, [RED]), (BEFORE + AFTER, [RED]), (BEFORE + m + AFTER, [])):
        with pytest.raises(vision.ImageError) as err:
            eye.eval_prompt(llm, text, images)
        assert err.value.code == "invalid_request" and "image" in err.value.message

    # llama.cpp computes no logits for an image: a reply must start from text after it.
    with pytest.raises(vision.ImageError, match="ends with an image"):
        eye.eval_prompt(llm, BEFORE + m, [RED])


def test_a_prompt_that_fits_only_without_its_image_is_refused(llm, eye):
    n_ctx = llm.n_ctx()
    pad = n_ctx - 8 - len(tokens(llm, BEFORE)) - len(tokens(llm, AFTER))
    text = BEFORE + "x" * pad + eye.media_marker + AFTER
    assert len(tokens(llm, text.replace(eye.media_marker, ""))) < n_ctx

    with pytest.raises(vision.ImageError) as err:
        eye.eval_prompt(llm, text, [RED])
    assert err.value.code == "context_length_exceeded"
    assert f"maximum context length is {n_ctx} tokens" in err.value.message
    assert f"{n_ctx - 8 + N_IMAGE} tokens ({N_IMAGE} of them for 1 image(s))" in err.value.message


BAD_IMAGES_SCRIPT = """
import json, sys
import llama_cpp
from anyad.backends.llama_cpp.vision import ImageError, Vision
model, projector, *paths = sys.argv[1:]
llm = llama_cpp.Llama(model, n_ctx=512, n_threads=2, verbose=False)
eye = Vision(llm, projector, n_threads=2)
text = "<|im_start|>user\\n" + eye.media_marker + "?<|im_end|>\\n<|im_start|>assistant\\n"
seen = {}
for path in paths:
    try:
        eye.eval_prompt(llm, text, [open(path, "rb").read()])
        seen[path.rsplit("/", 1)[-1]] = "read"
    except ImageError as exc:
        seen[path.rsplit("/", 1)[-1]] = exc.code
print(json.dumps(seen))
"""


def test_unreadable_images_are_refused_and_the_process_goes_on(tiny_model, projector, tmp_path):
    jpeg_header = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
                   + b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 60000, 60000, 3) + b"\x01\x11\x00" * 3)
    cases = {
        "garbage": bytes(range(256)) * 4,
        "empty": b"",
        "truncated.png": RED[:len(RED) // 2],
        "bad-data.png": RED[:33] + struct.pack(">I", 20) + b"IDAT" + b"\x00" * 24,
        # Canvases far past any real image, declared in a few bytes: refused before decoding.
        "huge.png": RED[:16] + struct.pack(">II", 100_000, 100_000) + RED[24:],
        "huge.jpeg": jpeg_header,
        "sound.wav": b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + b"\x00" * 24,
        "still.gif": GIF,
        "after-all-that.png": RED,
    }
    paths = []
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))

    done = run_script(BAD_IMAGES_SCRIPT, str(tiny_model), str(projector), *paths)

    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {**{name: "invalid_image" for name in cases}, "still.gif": "read", "after-all-that.png": "read"}


WIDTH_SCRIPT = """
import sys
import llama_cpp
from anyad.backends.llama_cpp.vision import ProjectorError, Vision
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
try:
    Vision(llm, sys.argv[2])
    print("loaded")
except ProjectorError as exc:
    print(exc)
print("still generates:", bool(llm.create_completion(llm.tokenize(b"Hi"), max_tokens=2)["choices"][0]["text"]))
"""


def test_a_projector_for_another_width_is_an_error_not_an_abort(tiny_model, tmp_path):
    wide = mmprojmaker.make_mmproj(tmp_path / "mmproj-wide.gguf", n_embd=96)
    done = run_script(WIDTH_SCRIPT, str(tiny_model), str(wide))

    assert done.returncode == 0, done.stderr[-2000:]
    assert "mismatch between text model (n_embd = 64) and mmproj (n_embd = 96)" in done.stdout
    assert "still generates: True" in done.stdout


def test_projector_bytes_counts_its_tensors(projector, tmp_path):
    wide = mmprojmaker.make_mmproj(tmp_path / "mmproj-wide.gguf", n_embd=96)
    # 32 more output rows: the F16 weight rows of mm.2 and their F32 biases.
    per_row = mmprojmaker.TINY_VISION.n_proj_hidden * 2 + 4
    assert vision.projector_bytes(wide) - vision.projector_bytes(projector) == 32 * per_row
    assert 0 < vision.projector_bytes(projector) < projector.stat().st_size


def test_a_closed_projector_refuses_work_instead_of_crashing(tiny_model, projector):
    import llama_cpp

    model = llama_cpp.Llama(str(tiny_model), n_ctx=128, n_threads=2, verbose=False)
    eye = vision.Vision(model, projector, n_threads=2)
    text = BEFORE + eye.media_marker + AFTER
    assert eye.eval_prompt(model, text, [RED]).n_positions > N_IMAGE
    model.close()  # frees the projector first: it points into the model
    with pytest.raises(RuntimeError, match="closed"):
        eye.eval_prompt(model, text, [RED])
    eye.close()  # a second close is harmless
