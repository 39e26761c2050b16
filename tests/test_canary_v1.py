"""canary-1b (prompt format `canary`, v1): its special-token model and NeMo's prompt defaults.

A tiny random v1 checkpoint (the v1 spl_tokens built here plus the fixtures' en/es/de/fr BPEs)
must transcribe files, arrays and manifests that carry no `task`/`taskname`, as NeMo 3.0.0 does.
The expected prompt ids are built from NeMo's v1 template and the SentencePiece pieces directly,
not from serinus.prompt.
"""

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

from serinus.pipeline import decode
from conftest import AUDIO, FIXTURES
from serinus.audio import FeatureConfig, load_audio
from serinus.data import tokenizers as tk
from serinus.decoding import DecodingConfig
from serinus.model.canary import CanaryConfig, CanaryModel, padded_vocab
from serinus.model.decoder import DecoderConfig
from serinus.model.encoder import EncoderConfig
from serinus.prompt import encode_prompt, resolve_slots
from serinus.tokenizer import CanaryTokenizer

try:  # reading the model proto needs protobuf, which sentencepiece does not require
    from sentencepiece import sentencepiece_model_pb2 as pb
except ImportError:
    pb = None


LANGS = ("en", "es", "de", "fr")

# NeMo's build_canary_1b_special_tokenizer.py list, after CanaryTokenizer.build_special_tokenizer
# prepends DEFAULT_TOKENS (<|nospeech|> <pad> <|endoftext|> <|startoftranscript|> <|pnc|> <|nopnc|>)
# and drops the repeats; SentencePiece adds <unk> first and "▁" last.
NEMO_V1_PIECES = (
    ["<unk>", "<|nospeech|>", "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|pnc|>", "<|nopnc|>",
     "<|transcribe|>", "<|translate|>", "<|en|>", "<|es|>", "<|de|>", "<|fr|>"]
    + [f"<|spltoken{i}|>" for i in range(16)]
    + ["▁"]
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: intra-op threads only cost time, a lot of it on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spl_dir(tmp_path_factory):
    return tk.build_special_tokenizer(tmp_path_factory.mktemp("v1") / "spl_tokens", prompt_format="canary")


@pytest.fixture(scope="module")
def spl_pieces(spl_dir):
    sp = spm.SentencePieceProcessor(model_file=str(spl_dir / "tokenizer.model"))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


@pytest.fixture(scope="module")
def tok(spl_dir):
    t = FIXTURES / "tokenizers"
    models = {"spl_tokens": spl_dir / "tokenizer.model"}
    models.update({lang: t / lang / "tokenizer_spe_bpe_v256" / "tokenizer.model" for lang in LANGS})
    return CanaryTokenizer(models)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = CanaryConfig(
        features=FeatureConfig(),
        encoder=EncoderConfig(n_layers=1, d_model=32, n_heads=2, subsampling_conv_channels=16),
        decoder=DecoderConfig(vocab_size=padded_vocab(tok.vocab_size), hidden_size=32, inner_size=64, num_layers=1,
                              num_attention_heads=2, max_sequence_length=64),
        prompt_format="canary",
        decoding=DecodingConfig(beam_size=1, max_generation_delta=8),
    )
    return CanaryModel(cfg, tok).eval()


def model_proto(path):
    """The model without the machine-specific paths (needs protobuf; else just the pieces)."""
    if pb is None:
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    m.trainer_spec.ClearField("input")
    m.trainer_spec.ClearField("model_prefix")
    return m


def nemo_v1_prompt(pieces, source_lang, target_lang, task, pnc):
    """NeMo's CanaryPromptFormatter on the aggregate tokenizer: map the values to tokens
    (map_manifest_values_to_special_tokens), fill `<|startoftranscript|>|source_lang||task||target_lang||pnc|`,
    then read the string token by token in spl_tokens (spl_tokens is the first sub-tokenizer: offset 0)."""
    task_token = {"asr": "<|transcribe|>", "transcribe": "<|transcribe|>", "ast": "<|translate|>",
                  "translate": "<|translate|>", "s2t_translation": "<|translate|>"}.get(task, task)
    pnc_token = "<|pnc|>" if pnc in ("yes", "1", "True", "true", "pnc", "<|pnc|>") else "<|nopnc|>"
    text = (
        "<|startoftranscript|>|source_lang||task||target_lang||pnc|"
        .replace("|source_lang|", f"<|{source_lang}|>")
        .replace("|task|", task_token)
        .replace("|target_lang|", f"<|{target_lang}|>")
        .replace("|pnc|", pnc_token)
    )
    ids = []
    while text:
        token, text = text[: text.index(">") + 1], text[text.index(">") + 1 :]
        ids.append(pieces.index(token))
    return ids


def test_special_tokenizer_is_nemos(spl_dir, spl_pieces, tmp_path, capsys):
    assert spl_pieces == NEMO_V1_PIECES
    assert tk.canary1_special_tokens() == NEMO_V1_PIECES[1:-1]
    assert (spl_dir / "train_text.txt").read_text().split("\n") == NEMO_V1_PIECES[1:-1]
    # The CLI builds the same model; the canary2 default is unchanged.
    assert tk.main(["special", str(tmp_path / "spl"), "--prompt-format", "canary"]) == 0
    assert "30 pieces" in capsys.readouterr().out
    assert model_proto(tmp_path / "spl" / "tokenizer.model") == model_proto(spl_dir / "tokenizer.model")
    assert len(tk.special_tokens("canary2")) == 1150
    # Extra tokens take the place of the last spare tokens: every other id stays, the vocab stays 30.
    extra = tk.canary1_special_tokens(["summarize", "<|nosummarize|>"])
    assert extra[:-2] == NEMO_V1_PIECES[1:-3] and extra[-2:] == ["<|summarize|>", "<|nosummarize|>"]
    with pytest.raises(ValueError, match="already in the special-token vocabulary"):
        tk.canary1_special_tokens(["translate"])
    with pytest.raises(ValueError, match="unknown prompt format 'canary3'"):
        tk.special_tokens("canary3")


@pytest.mark.skipif(pb is None, reason="reading the SentencePiece model proto needs protobuf")
def test_special_tokenizer_options_are_nemos(spl_dir):
    """Trained as NeMo's create_spt_model trains the fixture's (NeMo-made) canary2 spl_tokens: the
    same trainer and normaliser settings but for the vocab size and the symbols."""
    ours = model_proto(spl_dir / "tokenizer.model")
    nemo = model_proto(FIXTURES / "tokenizers" / "spl_tokens" / "tokenizer.model")
    assert ours.trainer_spec.vocab_size == 30 and list(ours.trainer_spec.user_defined_symbols) == NEMO_V1_PIECES[1:-1]
    for m in (ours, nemo):
        m.trainer_spec.ClearField("vocab_size")
        m.trainer_spec.ClearField("user_defined_symbols")
    assert ours.trainer_spec == nemo.trainer_spec
    assert ours.normalizer_spec == nemo.normalizer_spec
    types = [p.type for p in ours.pieces]
    P = pb.ModelProto.SentencePiece
    assert types == [P.UNKNOWN] + [P.USER_DEFINED] * 28 + [P.NORMAL]


def test_aggregate_special_ids(tok, spl_pieces):
    assert tok.eos_id == spl_pieces.index("<|endoftext|>") == 3
    assert tok.bos_id == spl_pieces.index("<|startoftranscript|>") == 4
    assert tok.pad_id == spl_pieces.index("<pad>") == 2
    assert tok.langs == LANGS and set(tok.prompt_langs) == set(LANGS)
    assert tok.vocab_size == 30 + 4 * 256


def test_prompt_defaults_match_nemo(tok, spl_pieces):
    # NeMo fills a missing task with `asr` and pnc with `yes`.
    for lang in LANGS:
        ids = encode_prompt(tok, "canary", {"source_lang": lang, "target_lang": lang})
        assert ids == nemo_v1_prompt(spl_pieces, lang, lang, "asr", "yes"), lang
    ids = encode_prompt(tok, "canary", {"source_lang": "de", "target_lang": "de", "pnc": "no"})
    assert ids == nemo_v1_prompt(spl_pieces, "de", "de", "asr", "no")
    assert tok.ids_to_tokens(ids) == ["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|de|>", "<|nopnc|>"]
    # Different languages and no task: translation (NeMo would say <|transcribe|> here).
    for src, tgt in (("en", "de"), ("en", "fr"), ("es", "en"), ("<|en|>", "es")):
        ids = encode_prompt(tok, "canary", {"source_lang": src, "target_lang": tgt})
        assert ids == nemo_v1_prompt(spl_pieces, src.strip("<|>"), tgt.strip("<|>"), "ast", "yes"), (src, tgt)
    # A given task is kept, in every spelling NeMo accepts, under `task` or the old `taskname`.
    for task in ("asr", "transcribe", "<|transcribe|>", "ast", "translate", "s2t_translation", "<|translate|>"):
        for key in ("task", "taskname"):
            ids = encode_prompt(tok, "canary", {"source_lang": "en", "target_lang": "de", key: task, "pnc": "no"})
            assert ids == nemo_v1_prompt(spl_pieces, "en", "de", task, "no"), (key, task)
    assert resolve_slots(tok, "canary", {"source_lang": "fr", "target_lang": "fr", "task": None})["task"] == \
        "<|transcribe|>"
    with pytest.raises(ValueError, match=r"slot 'task' does not accept 'summarize'"):
        encode_prompt(tok, "canary", {"source_lang": "en", "target_lang": "en", "task": "summarize"})
    with pytest.raises(ValueError, match=r"needs slot 'target_lang'"):
        encode_prompt(tok, "canary", {"source_lang": "en"})


@pytest.fixture
def captured(monkeypatch):
    """The prompt rows every greedy decoding call gets."""
    rows = []
    real = decode.greedy_decode

    def spy(decoder, states, mask, prompts, *args, **kwargs):
        rows.extend(prompts.tolist())
        return real(decoder, states, mask, prompts, *args, **kwargs)

    monkeypatch.setattr(decode, "greedy_decode", spy)
    return rows


def _check(hyps, n):
    assert len(hyps) == n
    for h in hyps:
        assert h.error is None, h.error
        assert isinstance(h.text, str) and all(0 <= i < 30 + 4 * 256 for i in h.y_sequence)


def test_transcribe_files_arrays_manifest_without_task(model, spl_pieces, captured, tmp_path):
    files = [str(AUDIO / "en_01.wav"), str(AUDIO / "de_01.wav")]
    asr_en = nemo_v1_prompt(spl_pieces, "en", "en", "asr", "yes")

    _check(model.transcribe(files, source_lang="en", target_lang="en", pnc="yes"), 2)
    assert captured == [asr_en, asr_en]

    captured.clear()
    _check(model.transcribe(files), 2)  # NeMo's defaults: en -> en, pnc yes
    assert captured == [asr_en, asr_en]

    captured.clear()
    arrays = [load_audio(f) for f in files]
    assert all(isinstance(a, np.ndarray) and a.ndim == 1 for a in arrays)
    _check(model.transcribe(arrays, source_lang="en", target_lang="en", pnc="yes"), 2)
    assert captured == [asr_en, asr_en]

    captured.clear()
    _check(model.transcribe(files, source_lang="en", target_lang="de", pnc="no"), 2)
    assert captured == [nemo_v1_prompt(spl_pieces, "en", "de", "ast", "no")] * 2

    # A manifest without task fields; each entry's languages choose its task.
    manifest = tmp_path / "m.jsonl"
    entries = [
        {"audio_filepath": files[0], "duration": 3.4, "source_lang": "en", "target_lang": "en"},
        {"audio_filepath": files[1], "duration": 3.0, "source_lang": "de", "target_lang": "en", "pnc": "no"},
        {"audio_filepath": files[0], "duration": 3.4},
    ]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    captured.clear()
    _check(model.transcribe(str(manifest)), 3)
    assert sorted(captured) == sorted([asr_en, nemo_v1_prompt(spl_pieces, "de", "en", "ast", "no"), asr_en])


def test_transcribe_keeps_a_given_task(model, spl_pieces, captured):
    files = [str(AUDIO / "en_01.wav")]
    _check(model.transcribe(files, source_lang="en", target_lang="de", task="asr"), 1)
    _check(model.transcribe(files, source_lang="en", target_lang="de", taskname="translate"), 1)
    assert captured == [nemo_v1_prompt(spl_pieces, "en", "de", "asr", "yes"),
                        nemo_v1_prompt(spl_pieces, "en", "de", "ast", "yes")]


def test_saved_v1_checkpoint_transcribes_the_same(model, spl_pieces, captured, tmp_path):
    model.save_pretrained(tmp_path / "v1")
    loaded = CanaryModel.from_pretrained(str(tmp_path / "v1"))
    assert loaded.cfg.prompt_format == "canary" and loaded.tokenizer.vocab == model.tokenizer.vocab
    files = [str(AUDIO / "es_01.wav")]
    a = model.transcribe(files, source_lang="es", target_lang="es")
    b = loaded.transcribe(files, source_lang="es", target_lang="es")
    _check(a, 1)
    assert a[0].y_sequence == b[0].y_sequence
    assert captured == [nemo_v1_prompt(spl_pieces, "es", "es", "asr", "yes")] * 2
