"""`serinus align`: forced alignment of a given transcript with the packed CTC model."""

import json

import pytest

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus import CanaryModel
from serinus.align import align_audio, main
from serinus.audio import load_audio

V2 = FIXTURES / "tiny_canary2_v2style.nemo"


@pytest.fixture(scope="module")
def v2_model():
    return CanaryModel.from_pretrained(V2)


def _gt_case(clip):
    """NeMo's alignment of the clip's ground-truth text with timestamp_type ['word', 'segment']."""
    cases = json.loads((REFERENCE / "tiny_canary2_v2style" / "alignment_gt.json").read_text())["cases"]
    return next(c for c in cases if c["name"] == clip and c["timestamp_type"] not in ("all", "char"))


@pytest.mark.parametrize("clip", ["en_01", "de_02", "fr_01"])
def test_align_audio_matches_nemo_from_audio(v2_model, clip):
    """End to end from the audio file: CTC forward + Viterbi + NeMo's word/segment rules."""
    case = _gt_case(clip)
    expected = case["timestamp"]
    result = align_audio(v2_model, load_audio(AUDIO / f"{clip}.wav"), case["text"])
    assert result["word"] == expected["word"]
    assert result["segment"] == expected["segment"]
    assert result["aligned"] and result["unknown_characters"] == []


def test_unknown_characters_are_reported(v2_model, capsys):
    rc = main([str(AUDIO / "en_01.wav"), "The quick brown fox 狐 jumps.", "--model", str(V2)])
    out, err = capsys.readouterr()
    assert rc == 0
    result = json.loads(out)
    assert result["unknown_characters"] == ["狐"]
    assert [w["word"] for w in result["word"]] == ["The", "quick", "brown", "fox", "狐", "jumps."]
    assert "狐" in err


def test_srt_output(tmp_path):
    out = tmp_path / "a.srt"
    rc = main([str(AUDIO / "en_02.wav"), "It's almost nine. And the meeting has not started yet.",
               "--model", str(V2), "--format", "srt", "--output", str(out)])
    assert rc == 0
    text = out.read_text()
    assert text.startswith("1\n00:00:00,")
    assert "2\n" in text and "And the meeting has not started yet." in text


def test_checkpoint_without_aligner_is_refused(capsys):
    rc = main([str(AUDIO / "en_01.wav"), "hello", "--model", str(FIXTURES / "tiny_canary2.nemo")])
    assert rc == 2
    assert "packs no CTC aligner" in capsys.readouterr().err


def test_a_ctc_model_aligns_on_its_own(tmp_path, capsys):
    """`serinus align --model CTC_MODEL`: the CTC model a Canary checkpoint packs, saved as a CTC model of its
    own (what `serinus train` with model.type ctc writes), gives NeMo's times by itself."""
    from serinus.checkpoint import load_ctc_model, save_ctc_model

    ctc = load_ctc_model(V2)
    folder = save_ctc_model(ctc, ctc.tokenizer, tmp_path / "ctc")
    case = _gt_case("en_01")
    out = tmp_path / "times.json"
    assert main([str(AUDIO / "en_01.wav"), case["text"], "--model", str(folder), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["word"] == case["timestamp"]["word"] and result["segment"] == case["timestamp"]["segment"]
