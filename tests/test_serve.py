"""`serinus serve`, the real server in a subprocess on loopback, spoken to with httpx and with
OpenAI's own client: every response format against `transcribe()`, batching across clients,
bad uploads, auth, limits, 503 when the queue is full, disconnects, graceful shutdown."""

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")

from conftest import AUDIO, FIXTURES, REPO  # noqa: E402
from serinus import output  # noqa: E402
from serinus import transcribe as tr  # noqa: E402
from serinus.audio import load_audio  # noqa: E402
from serinus.model.canary import CanaryModel  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIPS = ["en_01", "en_02", "en_03", "de_01", "de_02", "es_01", "es_02", "fr_01", "fr_02"]
FORMATS = ["json", "text", "srt", "vtt", "verbose_json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`serinus serve ...` in a subprocess; `url` once /health answers."""

    def __init__(self, *args: str, headers=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "serinus.cli", "serve", "--port", str(self.port),
                                      "--log-level", "warning", *args], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", headers=headers, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /health within 120 s")
            time.sleep(0.2)

    def health(self, headers=None) -> dict:
        return httpx.get(f"{self.url}/health", headers=headers, timeout=5).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def model():
    return CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")


@pytest.fixture(scope="module")
def server():
    """tiny_canary2 (timestamps from frame tokens), an API key, a 1 MB body limit."""
    s = Server("--model", str(FIXTURES / "tiny_canary2.nemo"), "--api-key", KEY, "--max-upload-mb", "1",
               "--max-wait-ms", "100", headers=AUTH)
    yield s
    s.stop()


def wav_bytes(name: str) -> bytes:
    return (AUDIO / f"{name}.wav").read_bytes()


def post(server, fields=None, files=None, endpoint="transcriptions", headers=AUTH, **kwargs):
    return httpx.post(f"{server.url}/v1/audio/{endpoint}", data=fields or {}, files=files, headers=headers,
                      timeout=60, **kwargs)


def expected(model, name, lang, timestamps=None, target=None):
    return tr.transcribe(model, [str(AUDIO / f"{name}.wav")], source_lang=lang, target_lang=target or lang,
                         timestamps=timestamps)[0]


def rounded(items, key):
    return [(x[key].strip(), round(x["start"], 3), round(x["end"], 3)) for x in items]


def check_body(model, fmt, name, lang, body, words=False, target=None):
    """A response body against transcribe()'s result for the same file."""
    if fmt in ("json", "text"):
        hyp = expected(model, name, lang, target=target)
        assert (body.json()["text"] if fmt == "json" else body.text) == (hyp.text if fmt == "json" else hyp.text + "\n")
        return
    hyp = expected(model, name, lang, timestamps=True, target=target)
    if fmt == "verbose_json":
        data = body.json()
        assert data["text"] == hyp.text and data["language"] == lang
        assert data["duration"] == pytest.approx(len(load_audio(AUDIO / f"{name}.wav")) / 16000, abs=1e-3)
        assert [(s["text"], s["start"], s["end"]) for s in data["segments"]] == rounded(hyp.timestamp["segment"], "segment")
        assert hyp.timestamp["segment"]
        if words:
            assert [(w["word"], w["start"], w["end"]) for w in data["words"]] == rounded(hyp.timestamp["word"], "word")
        else:
            assert "words" not in data
    else:
        assert body.text == output.subtitles(hyp, fmt) + "\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_equals_transcribe(server, model, fmt):
    for name, lang in (("en_01", "en"), ("de_01", "de")):
        r = post(server, {"model": "tiny_canary2", "language": lang, "response_format": fmt},
                 {"file": (f"{name}.wav", wav_bytes(name), "audio/wav")})
        assert r.status_code == 200, r.text
        check_body(model, fmt, name, lang, r)


def test_word_timestamps_under_both_field_names(server, model):
    for field in ("timestamp_granularities[]", "timestamp_granularities"):
        r = post(server, {"response_format": "verbose_json", field: ["word", "segment"]},
                 {"file": ("en_02.wav", wav_bytes("en_02"))})
        assert r.status_code == 200, r.text
        check_body(model, "verbose_json", "en_02", "en", r, words=True)


def test_translation_and_canary_fields(server, model):
    r = post(server, {"language": "de", "response_format": "json"}, {"file": ("de_02.wav", wav_bytes("de_02"))},
             endpoint="translations")
    assert r.status_code == 200, r.text
    check_body(model, "json", "de_02", "de", r, target="en")
    r = post(server, {"language": "en", "target_language": "de", "pnc": "no"}, {"file": ("a.wav", wav_bytes("en_03"))})
    assert r.status_code == 200, r.text
    hyp = tr.transcribe(model, [str(AUDIO / "en_03.wav")], source_lang="en", target_lang="de", pnc="no")[0]
    assert r.json()["text"] == hyp.text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks audio.translations deprecated
def test_openai_client(server, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny_canary2"]
    for fmt in FORMATS:
        with open(AUDIO / "fr_01.wav", "rb") as f:
            result = client.audio.transcriptions.create(model="tiny_canary2", file=f, language="fr", response_format=fmt)
        hyp = expected(model, "fr_01", "fr", timestamps=True if fmt in ("srt", "vtt", "verbose_json") else None)
        if fmt == "json":
            assert result.text == hyp.text
        elif fmt == "text":
            assert result == hyp.text + "\n"
        elif fmt == "verbose_json":
            assert result.text == hyp.text and result.segments[0].text == hyp.timestamp["segment"][0]["segment"]
        else:
            assert result == output.subtitles(hyp, fmt) + "\n"
    with open(AUDIO / "es_01.wav", "rb") as f:
        result = client.audio.transcriptions.create(model="tiny_canary2", file=f, language="es",
                                                    response_format="verbose_json", timestamp_granularities=["word"])
    hyp = expected(model, "es_01", "es", timestamps=True)
    assert [w.word for w in result.words] == [w["word"] for w in hyp.timestamp["word"]]
    with open(AUDIO / "de_01.wav", "rb") as f:
        result = client.audio.translations.create(model="tiny_canary2", file=f, extra_body={"language": "de"})
    assert result.text == expected(model, "de_01", "de", target="en").text
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="unknown language"):
        with open(AUDIO / "fr_01.wav", "rb") as f:
            client.audio.transcriptions.create(model="tiny_canary2", file=f, language="xx")


def test_concurrent_clients_are_batched_and_each_gets_its_own_text(server, model):
    before = server.health(AUTH)

    def one(name):
        r = post(server, {"language": name[:2]}, {"file": (f"{name}.wav", wav_bytes(name))})
        return r.status_code, r.json()["text"]

    with ThreadPoolExecutor(len(CLIPS)) as pool:
        results = list(pool.map(one, CLIPS))
    for name, (status, text) in zip(CLIPS, results):
        assert status == 200
        assert text == expected(model, name, name[:2]).text
    after = server.health(AUTH)
    assert after["served"] - before["served"] == len(CLIPS)
    assert after["largest_batch"] >= 2, after  # nine requests within 100 ms did not all decode alone


def tone(seconds=1.0, dtype=np.float32):
    return (0.1 * np.sin(np.arange(int(16000 * seconds)) * 0.05)).astype(dtype)


def wav_of(samples, subtype="PCM_16"):
    buf = io.BytesIO()
    soundfile.write(buf, samples, 16000, format="WAV", subtype=subtype)
    return buf.getvalue()


def nan_wav():
    samples = tone()
    samples[100:103] = np.nan
    return wav_of(samples, "FLOAT")


BAD = [  # (id, fields, files, status, message fragment)
    ("empty", {}, {"file": ("a.wav", b"")}, 400, "empty (0 bytes)"),
    ("truncated", {}, {"file": ("a.wav", wav_bytes("en_01")[:50000])}, 400, "truncated WAV"),
    ("text file", {}, {"file": ("notes.txt", b"not audio at all\n" * 40)}, 400, "not audio this server can decode"),
    ("0-length wav", {}, {"file": ("a.wav", wav_of(np.zeros(0, np.float32)))}, 400, "no samples"),
    ("NaN wav", {}, {"file": ("a.wav", nan_wav())}, 400, "3 NaN/inf sample(s)"),
    ("wrong field", {}, {"audio": ("a.wav", wav_bytes("en_01"))}, 400, "goes in field 'file'"),
    ("unknown field", {"langauge": "en"}, {"file": ("a.wav", wav_bytes("en_01"))}, 400, "unknown field(s) 'langauge'"),
    ("no file", {}, {"model": (None, "x")}, 400, "missing field 'file'"),
    ("path as text", {}, {"file": (None, "/etc/passwd")}, 400, "never opens paths"),
    ("path-like name", {}, {"file": ("../../../../etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n")}, 400,
     "'../../../../etc/passwd': not audio"),
    ("language", {"language": "xx"}, {"file": ("a.wav", wav_bytes("en_01"))}, 400, "unknown language 'xx'"),
    ("slot value", {"pnc": "maybe"}, {"file": ("a.wav", wav_bytes("en_01"))}, 400, "does not accept 'maybe'; allowed: yes"),
    ("format", {"response_format": "xml"}, {"file": ("a.wav", wav_bytes("en_01"))}, 400, "not one of: json, text"),
    ("granularity", {"timestamp_granularities[]": "char"}, {"file": ("a.wav", wav_bytes("en_01"))}, 400, "'char'"),
    ("stream", {"stream": "true"}, {"file": ("a.wav", wav_bytes("en_01"))}, 400, "streaming"),
]


@pytest.mark.parametrize("fields,files,status,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_its_status_and_the_server_goes_on(server, model, fields, files, status, fragment):
    r = post(server, fields, files)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    good = post(server, {}, {"file": ("en_01.wav", wav_bytes("en_01"))})
    assert good.status_code == 200 and good.json()["text"] == expected(model, "en_01", "en").text


def test_not_multipart_and_unknown_route(server):
    r = httpx.post(f"{server.url}/v1/audio/transcriptions", json={"file": "/etc/passwd"}, headers=AUTH)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/audio/speech", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_path_like_file_name_is_only_a_name(server, model):
    r = post(server, {}, {"file": ("/etc/passwd", wav_bytes("en_02"))})
    assert r.status_code == 200 and r.json()["text"] == expected(model, "en_02", "en").text


def test_api_key_is_required_everywhere(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/audio/transcriptions")):
            r = httpx.request(method, f"{server.url}{path}", headers=headers,
                              files={"file": ("a.wav", wav_bytes("en_01"))} if method == "POST" else None)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"


def test_oversize_upload_is_refused_before_it_is_read(server, model):
    big = wav_of(tone(40.0))  # 1.28 MB > 1 MB
    r = post(server, {}, {"file": ("big.wav", big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"

    def chunks():  # no Content-Length: counted as it streams
        boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n"
        yield boundary
        for k in range(0, len(big), 65536):
            yield big[k : k + 65536]
        yield b"\r\n--xyz--\r\n"

    r = httpx.post(f"{server.url}/v1/audio/transcriptions", content=chunks(), timeout=30,
                   headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "limit of 1 MB" in r.json()["error"]["message"]
    good = post(server, {}, {"file": ("en_01.wav", wav_bytes("en_01"))})
    assert good.status_code == 200 and good.json()["text"] == expected(model, "en_01", "en").text


def test_a_client_gone_mid_upload_costs_nothing(server, model):
    before = server.health(AUTH)
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + wav_bytes("en_01")[:20000])
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000\r\n\r\n" + part)
    good = post(server, {}, {"file": ("en_01.wav", wav_bytes("en_01"))})
    assert good.status_code == 200 and good.json()["text"] == expected(model, "en_01", "en").text
    after = server.health(AUTH)
    assert after["served"] == before["served"] + 1 and after["queued"] == 0


# -- a one-at-a-time server with a queue of one: 503, /health while decoding, disconnects, SIGTERM

@pytest.fixture(scope="module")
def small_queue():
    s = Server("--model", str(FIXTURES / "tiny_canary2_v2style.nemo"), "--max-batch", "1", "--queue", "1",
               "--max-wait-ms", "0", "--max-upload-mb", "10")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def long_clip():
    """en_long2 (about two minutes) and its transcript: a request the model takes a while on."""
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2_v2style.nemo")
    return (AUDIO / "en_long2.wav").read_bytes(), tr.transcribe(model, [str(AUDIO / "en_long2.wav")])[0].text


def post_long(server, long_clip, **kwargs):
    return httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("long.wav", long_clip[0])},
                      timeout=kwargs.pop("timeout", 120), **kwargs)


def wait_for(server, condition, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = server.health()
        if condition(health):
            return health
        time.sleep(0.02)
    raise AssertionError(f"timed out; last /health: {health}")


def test_full_queue_answers_503_with_retry_after(small_queue, long_clip):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post_long(small_queue, long_clip), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    for r in responses:
        if r.status_code == 200:
            assert r.json()["text"] == long_clip[1]
        else:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
    assert small_queue.health()["rejected"] == statuses.count(503)


def test_health_answers_while_the_model_decodes_and_a_gone_client_costs_nothing(small_queue, long_clip):
    samples = load_audio(AUDIO / "en_long2.wav")
    longer = wav_of(np.concatenate([samples, samples]))  # about four minutes: the model is busy for a while
    before = small_queue.health()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_long, small_queue, (longer, None))
        start = time.monotonic()
        busy = wait_for(small_queue, lambda h: h["decoding"] == 1)
        assert time.monotonic() - start < 10 and busy["status"] == "ok"
        with pytest.raises(httpx.ReadTimeout):  # queued behind `first`, then the client gives up
            httpx.post(f"{small_queue.url}/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes("en_01"))},
                       timeout=httpx.Timeout(10, read=0.2))
        wait_for(small_queue, lambda h: h["cancelled"] == before["cancelled"] + 1)
        assert first.result().status_code == 200
    after = wait_for(small_queue, lambda h: h["decoding"] == 0 and h["queued"] == 0)
    assert after["served"] == before["served"] + 1  # the abandoned request was never decoded


def test_sigterm_finishes_the_request_in_flight(small_queue, long_clip):
    with ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(post_long, small_queue, long_clip)
        wait_for(small_queue, lambda h: h["decoding"] == 1)
        small_queue.proc.send_signal(signal.SIGTERM)
        r = inflight.result()
    assert r.status_code == 200 and r.json()["text"] == long_clip[1]
    # uvicorn re-raises the signal once it has shut down gracefully
    assert small_queue.proc.wait(30) in (0, -signal.SIGTERM)
