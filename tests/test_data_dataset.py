"""Training batches equal NeMo's lhotse dataloader output (teacher_forced.npz, prompts.json)."""

import json

import numpy as np
import pytest
import torch
from lhotse import MonoCut, Recording, SupervisionSegment

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus.data.dataset import DataError, PromptedDataset, collate_ids, encode_cut, loss_mask
from serinus.data.manifest import manifest_to_cuts
from serinus.tokenizer import CanaryTokenizer, UnifiedTokenizer

TOK = FIXTURES / "tokenizers"


@pytest.fixture(scope="module")
def tokenizers():
    agg = CanaryTokenizer(
        {"spl_tokens": TOK / "spl_tokens" / "tokenizer.model"}
        | {l: TOK / l / "tokenizer_spe_bpe_v256" / "tokenizer.model" for l in ("en", "de", "es", "fr")}
    )
    uni = UnifiedTokenizer(TOK / "unified" / "tokenizer_spe_bpe_v1535" / "tokenizer.model")
    return {"tiny_canary2": agg, "tiny_canary2_unified": uni}


@pytest.fixture(scope="module")
def train_cuts():
    return manifest_to_cuts(AUDIO / "manifest_train.jsonl")


@pytest.mark.parametrize("model", ["tiny_canary2", "tiny_canary2_unified"])
def test_batch_equals_nemo_teacher_forced(tokenizers, train_cuts, model):
    ref = np.load(REFERENCE / model / "teacher_forced.npz")
    batch = PromptedDataset(tokenizers[model], "canary2")[train_cuts.subset(first=3)]
    inputs, labels = batch.decoder_inputs_outputs()
    got = {
        "audio": batch.audio, "audio_lens": batch.audio_lens, "prompt": batch.prompt,
        "prompt_lens": batch.prompt_lens, "transcript": batch.transcript, "transcript_lens": batch.transcript_lens,
        "prompted_transcript": batch.prompted_transcript, "prompted_transcript_lens": batch.prompted_transcript_lens,
        "decoder_input_ids": inputs, "labels": labels,
    }  # fmt: skip
    for key, value in got.items():
        assert value.numpy().dtype == ref[key].dtype, key
        np.testing.assert_array_equal(value.numpy(), ref[key], err_msg=key)
    # The prompt mask covers exactly the answer + EOS labels, nothing padded.
    lab = labels.numpy()
    for i in range(3):
        on = np.flatnonzero(batch.loss_mask[i].numpy())
        p, n = int(batch.prompt_lens[i]), int(batch.prompted_transcript_lens[i])
        assert on.tolist() == list(range(p - 1, n - 1))
        assert lab[i, on[-1]] == tokenizers[model].eos_id


@pytest.mark.parametrize("model", ["tiny_canary2", "tiny_canary2_unified"])
def test_training_cases_equal_prompts_json(tokenizers, model):
    cases = json.loads((REFERENCE / model / "prompts.json").read_text())["training_cases_prompt_format_fn"]
    rec = Recording.from_file(AUDIO / "en_01.wav")
    for case in cases:
        # Slots as NeMo's reader leaves them (cut.custom), and as ours does (supervision custom).
        for on_cut in (True, False):
            sup = SupervisionSegment(
                "s", rec.id, 0, rec.duration, text=case["text"], language=case["supervision_language"],
                custom=None if on_cut else dict(case["cut_custom"]),
            )
            cut = MonoCut("c", 0, rec.duration, 0, recording=rec, supervisions=[sup],
                          custom=dict(case["cut_custom"]) if on_cut else None)  # fmt: skip
            # NeMo trains on <unk> silently ('H' is not in the tiny Spanish vocabulary); we refuse unless asked.
            ex = encode_cut(cut, tokenizers[model], "canary2", allow_unk=True)
            assert ex.input_ids == case["input_ids"], case["text"]
            assert ex.context_ids == case["context_ids"] and ex.answer_ids == case["answer_ids"]
            assert ex.mask == case["mask"]
            if case["text"] == "Hola." and model == "tiny_canary2":
                with pytest.raises(DataError, match="cannot encode .* for 'H'"):
                    encode_cut(cut, tokenizers[model], "canary2")


def test_unencodable_text_names_manifest_line(tokenizers, tmp_path):
    (tmp_path / "a.wav").symlink_to(AUDIO / "en_01.wav")
    path = tmp_path / "m.jsonl"
    good = {"audio_filepath": "a.wav", "duration": 3.4384, "text": "the fox", "source_lang": "en", "target_lang": "en"}
    lines = [good, {**good, "text": "the fox ☃"}, {**good, "target_lang": "xx"}, {**good, "pnc": "maybe"}]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    cuts = manifest_to_cuts(path)
    ds = PromptedDataset(tokenizers["tiny_canary2"])
    assert ds[cuts.subset(first=1)].prompted_transcript.shape[0] == 1
    with pytest.raises(DataError, match=rf"{path}:2: the tokenizer cannot encode .*☃"):
        ds[cuts]
    with pytest.raises(DataError, match=rf"{path}:3: .*unknown language 'xx'"):
        ds[[cuts[2]]]
    with pytest.raises(DataError, match=rf"{path}:4: .*pnc"):
        ds[[cuts[3]]]
    with pytest.raises(DataError, match=rf"{path}:2: the tokenizer cannot encode"):
        PromptedDataset(tokenizers["tiny_canary2_unified"])[[cuts[1]]]


def test_slot_defaults_and_token_only_batches(tokenizers, train_cuts):
    agg = tokenizers["tiny_canary2"]
    ds = PromptedDataset(agg, "canary2", slot_defaults={"pnc": "no"}, with_audio=False)
    batch = ds[train_cuts.subset(first=2)]
    assert batch.audio.shape == (2, 0)
    # the manifest says pnc=yes: the entry wins over the default
    assert batch.prompt[0].tolist() == [7, 4, 16, 62, 62, 5, 9, 11, 13]


def test_collate_and_mask_helpers():
    ids, lens = collate_ids([[1, 2, 3], [4]], pad_id=2)
    assert ids.tolist() == [[1, 2, 3], [4, 2, 2]] and lens.tolist() == [3, 1]
    m = loss_mask(torch.tensor([5, 4]), torch.tensor([2, 2]), 5)
    assert m.tolist() == [[False, True, True, True], [False, True, True, False]]
