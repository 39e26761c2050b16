"""The training loop against NeMo's own numbers, and runs one can watch and trust:
the first loss of a fine-tuning run equals NeMo's training_step on the same batch (loss.json), the
learning-rate schedule equals NeMo's (recorded from NeMo 3.0.0 by tools/record_nemo_lr_schedule.py),
TensorBoard events and the progress bar, a SIGKILLed run resumes to the same weights, and
torchrun with 2 CPU processes (gloo) follows the single-process curve."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import AUDIO, DATA, FIXTURES, REFERENCE, REPO
from serinus import train as T

TRAIN = DATA / "synth-v1" / "asr_train.jsonl"
NEMO = FIXTURES / "tiny_canary2.nemo"


def finetune_config(out_dir, *extra):
    """Fine-tune tiny_canary2 on the three clips of loss.json's batch (en_01..03), in one batch, in order,
    with every source of randomness off (dropout, SpecAugment, dither), as NeMo's recorded step."""
    return T.load_config(None, [  # the defaults: the architecture is the checkpoint's own
        "model.preset=init_from", f"init_from.path={NEMO}", f"tokenizer.from_checkpoint={NEMO}", "tokenizer.dir=null",
        f"train_ds.manifest_filepath={AUDIO / 'manifest.jsonl'}", "train_ds.limit=3", "train_ds.batch_duration=null",
        "train_ds.batch_size=3", "train_ds.shuffle=false", "validation_ds.manifest_filepath=null",
        "model.spec_augment=null", "model.features={dither: 0.0}",
        "model.encoder={dropout: 0.0, dropout_pre_encoder: 0.0, dropout_att: 0.0}", "model.decoder={dropout: 0.0}",
        "trainer.checkpoint_every=0", "trainer.val_check_interval=0", "trainer.log_every=100",
        "optim.lr=1e-3", "optim.warmup_steps=0", f"trainer.out_dir={out_dir}", *extra,
    ])


def _first_batch_loss(cfg) -> float:
    """The loss the loop computes on its first batch (same set-up functions, same task.loss), in eval
    mode as NeMo recorded it (BatchNorm on its running statistics)."""
    from serinus.train import loop

    rt = loop.setup_runtime(cfg["trainer"])
    task = T.make_task(cfg)
    model, _ = loop.build_model(cfg, task, loop.build_tokenizer(cfg, rt), rt)
    cuts = task.attach_num_tokens(loop.load_cuts(cfg["train_ds"]), model)
    sampler = loop.build_sampler(cfg["train_ds"], cuts, 0, 1, 0)
    _, _, first = next(loop.batch_stream(sampler, 0, 0))
    batch = task.dataset(model)[first]
    assert sorted(Path(c.recording.sources[0].source).name for c in batch.cuts) == ["en_01.wav", "en_02.wav", "en_03.wav"]
    model.eval()
    with torch.no_grad():
        return float(task.loss(model, batch, rt.device)[0])


@pytest.mark.parametrize("mask", [False, True])
def test_loop_loss_on_the_fixture_batch_is_nemos_training_step(mask, tmp_path):
    ref = json.loads((REFERENCE / "tiny_canary2" / "loss.json").read_text())
    assert ref["batch_cuts"] == ["en_01", "en_02", "en_03"]
    want = ref[f"loss_use_loss_mask_for_prompt_{str(mask).lower()}"]
    if not mask:
        assert want == ref["training_step_loss_(cfg.use_loss_mask_for_prompt=False)"]
    cfg = finetune_config(tmp_path, f"model.use_loss_mask_for_prompt={str(mask).lower()}")
    assert _first_batch_loss(cfg) == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_finetuning_starts_from_the_checkpoints_own_loss_and_falls(tmp_path):
    ref = json.loads((REFERENCE / "tiny_canary2" / "loss.json").read_text())
    losses = T.train(finetune_config(tmp_path, "model.use_loss_mask_for_prompt=false", "trainer.max_steps=4"))["losses"]
    # in train mode BatchNorm normalises with this batch's statistics, so the first loss is close to
    # the checkpoint's eval-mode loss (2.4238), not equal; a random model would give ln(2176) = 7.7
    assert losses[0] == pytest.approx(ref["loss_use_loss_mask_for_prompt_false"], rel=0.03)
    assert losses[-1] < losses[0]


def test_lr_schedule_is_nemos():
    recorded = json.loads((Path(__file__).parent / "data" / "nemo_lr_schedule.json").read_text())
    model = torch.nn.Linear(2, 2)
    for s in recorded["settings"]:
        schedule = {"CosineAnnealing": "cosine"}.get(s.get("name"), "inverse_sqrt")
        opt, sched = T.build_optimizer(model, {"lr": s["lr"], "betas": [0.9, 0.98], "weight_decay": 0.0,
                                               "warmup_steps": s["warmup_steps"], "min_lr": s["min_lr"],
                                               "schedule": schedule}, s["max_steps"])
        seen = {}
        for step in range(max(map(int, s["lr_at_step"])) + 1):
            seen[str(step)] = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
        for step, lr in s["lr_at_step"].items():
            assert seen[step] == pytest.approx(lr, rel=1e-9), (s, step)


def test_lr_follows_the_time_budget_and_decays_at_the_end():
    optim = {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.0, "warmup_steps": 10, "min_lr": 1e-5}
    model = torch.nn.Linear(2, 2)
    # cosine: the time budget, when further along than the steps, sets where on the curve a step is
    _, cos = T.build_optimizer(model, {**optim, "schedule": "cosine"}, 1000)
    assert cos.lr_at(500, done=0.0) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 490 / 990)))
    assert cos.lr_at(100, done=0.5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert cos.lr_at(100, done=1.0) == pytest.approx(1e-5)
    # decay_fraction: inverse_sqrt as NeMo's until the last 20% of the budget, then linearly down to min_lr
    opt, wsd = T.build_optimizer(model, {**optim, "decay_fraction": 0.2}, 1000)
    plain = T.lr_at(700, 1e-3, 10, 1000, 1e-5)
    assert wsd.lr_at(700) == pytest.approx(plain)
    assert wsd.lr_at(700, done=0.9) == pytest.approx(1e-5 + (plain - 1e-5) * 0.5)
    assert wsd.lr_at(900) == pytest.approx(1e-5 + (T.lr_at(900, 1e-3, 10, 1000, 1e-5) - 1e-5) * 0.5)
    wsd.last_epoch = 499
    wsd.step(done=0.95)  # the optimizer's lr is set for step 500, 95% into the time budget
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 + (T.lr_at(500, 1e-3, 10, 1000, 1e-5) - 1e-5) * 0.25)
    with pytest.raises(T.ConfigError, match="optim.schedule"):
        T.build_optimizer(model, {**optim, "schedule": "linear"}, 10)


def test_tensorboard_events_progress_bar_and_padding(tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    T.train(finetune_config(tmp_path, "trainer.max_steps=3", "trainer.tensorboard=true", "trainer.progress_bar=true"))
    err = capsys.readouterr().err
    assert "3/3" in err and "audio s/s" in err and "loss" in err  # tqdm's bar with its postfix
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags = _scalar_tags(events[0])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/input_padding", "train/output_padding",
                "train/audio_per_second"):
        assert tag in tags, tags
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["input_padding"] < 1.0 and 0.0 <= r["output_padding"] < 1.0 for r in log if "loss" in r)


def _scalar_tags(path) -> set:
    """Tags in a TensorBoard event file, read with tensorboardX's own record reader."""
    from tensorboardX.proto import event_pb2 as pb

    tags = set()
    data = Path(path).read_bytes()
    i = 0
    while i < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        n = int.from_bytes(data[i:i + 8], "little")
        event = pb.Event.FromString(data[i + 12:i + 12 + n])
        tags |= {v.tag for v in event.summary.value}
        i += 12 + n + 4
    return tags


# -- crash safety and resume ----------------------------------------------------------------------

def _cli(out_dir, *extra):
    return [sys.executable, "-m", "serinus.train", f"tokenizer.from_checkpoint={NEMO}", "tokenizer.dir=null", "model.preset=init_from",
            f"init_from.path={NEMO}", f"train_ds.manifest_filepath={AUDIO / 'manifest_train.jsonl'}", "train_ds.limit=8",
            "train_ds.batch_duration=null", "train_ds.batch_size=2", "validation_ds.manifest_filepath=null",
            "model.encoder={dropout: 0.1}", "trainer.val_check_interval=0", "trainer.log_every=1",
            "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3", "trainer.threads=1",
            f"trainer.out_dir={out_dir}", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    from serinus.checkpoint import load_model, read_own_weights

    steps = "trainer.max_steps=16"
    full = subprocess.run(_cli(tmp_path / "full", steps), env=_env(), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once it has written a few checkpoints, wherever it is then
        if len(list((run / "checkpoints").glob("step_*"))) >= 2 and _steps_logged(run) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _steps_logged(run) < 16, "the run finished before it could be killed"

    for ckpt in (run / "checkpoints").glob("step_*"):  # every complete checkpoint loads; none is half-written
        load_model(ckpt / "model")
        torch.load(ckpt / "trainer_state.pt", weights_only=True)
    resumed = subprocess.run(_cli(run, steps, "trainer.resume=true"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = read_own_weights(tmp_path / "full" / "model"), read_own_weights(run / "model")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit on the CPU


def _steps_logged(run) -> int:
    log = run / "log.jsonl"
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.endswith("}") and '"loss"' in line)


# -- torchrun -------------------------------------------------------------------------------------

def test_torchrun_two_cpu_processes_follow_the_single_process_curve(tmp_path):
    """2 ranks x batches of 2 (rank r takes every 2nd batch) = 1 process accumulating 2 batches of 2.
    Nothing random (dropout, SpecAugment, dither): each rank would draw its own masks."""
    common = ["model.encoder={dropout: 0.0, dropout_pre_encoder: 0.0, dropout_att: 0.0}", "model.decoder={dropout: 0.0}",
              "model.use_loss_mask_for_prompt=false", "model.spec_augment=null", "model.features={dither: 0.0}",
              "train_ds.shuffle=false", "trainer.max_steps=6", "trainer.checkpoint_every=0"]
    single = subprocess.run(_cli(tmp_path / "one", *common, "trainer.accumulate_grad_batches=2"), env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2"] + _cli(tmp_path / "two", *common)[1:]
    ddp = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world size 2" in ddp.stdout
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(one) == len(two) == 6
    # the same numbers up to float summation order (gradients all-reduced vs accumulated)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
