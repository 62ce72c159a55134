"""Tiny end-to-end runs: the loss falls, checkpoints load, NaN stops cleanly, kill -9 + resume is bit-exact,
and two gloo processes train together."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bitllm.errors import BitLLMError
from bitllm.formats.checkpoint import from_pretrained
from bitllm.train import TrainingDivergedError, train
from bitllm.train import trainer as trainer_mod
from bitllm.train.config import load_config
from train_helpers import tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test process: `make test` runs two xdist workers on two cores, and spinning
    OpenMP threads on an oversubscribed machine slow these runs down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _falls(losses: list[float], by: float = 0.5) -> bool:
    return sum(losses[-5:]) / 5 < losses[0] - by


@pytest.mark.parametrize("quant", ["ternary", "binary", "none"])
def test_tiny_run_loss_falls_and_the_model_loads(tmp_path, quant):
    cfg = tiny_config(tmp_path, quant, steps=40)
    r = train(cfg, progress=False)
    assert _falls(r.losses), r.losses
    assert r.heldout_ppl["in-domain"] < r.unigram_ppl["in-domain"]  # beats the floor of meaning
    model = from_pretrained(r.model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    config = json.loads((r.model_dir / "config.json").read_text())
    assert ("quantization_config" in config) == (quant != "none")
    assert (r.output_dir / "loss.png").stat().st_size > 1000
    assert load_config(r.output_dir / "train_config.json") == cfg


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "ternary", steps=30, save_every=10)
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def poisoned(model, x):
        calls["n"] += 1
        loss = real(model, x)
        return loss * float("nan") if calls["n"] == 16 else loss

    monkeypatch.setattr(trainer_mod, "compute_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 16.*last good checkpoint \(step 10\)"):
        train(cfg, progress=False)
    state = json.loads((tmp_path / "run-ternary" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10 and len(state["losses"]) == 10
    monkeypatch.setattr(trainer_mod, "compute_loss", real)
    r = train(cfg, resume=True, progress=False)  # the kept checkpoint loads and the run completes
    assert len(r.losses) == 30 and r.losses[:10] == state["losses"]
    assert from_pretrained(r.model_dir) is not None


PAUSE_AFTER_CHECKPOINT = textwrap.dedent("""
    import sys, time
    import bitllm.train.trainer as T
    real, calls = T.compute_loss, {"n": 0}
    def compute_loss(model, x):
        calls["n"] += 1
        if calls["n"] == 13:  # step 13, after the step-10 checkpoint and two more steps
            print("PAUSED", flush=True)
            time.sleep(600)
        return real(model, x)
    T.compute_loss = compute_loss
    from bitllm.cli import main
    sys.argv = ["bitllm", "train", *sys.argv[1:]]
    main()
""")


def test_resume_after_kill_9_is_bit_exact(tmp_path):
    cfg = tiny_config(tmp_path, "ternary", steps=20, save_every=10)
    straight = cfg.to_dict() | {"output_dir": str(tmp_path / "straight")}
    killed = cfg.to_dict() | {"output_dir": str(tmp_path / "killed")}
    (tmp_path / "straight.json").write_text(json.dumps(straight))
    (tmp_path / "killed.json").write_text(json.dumps(killed))
    (tmp_path / "pause.py").write_text(PAUSE_AFTER_CHECKPOINT)

    cli = [sys.executable, "-m", "bitllm.cli", "train"]
    subprocess.run(cli + ["-c", str(tmp_path / "straight.json")], env=ENV, check=True, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "pause.py"), "-c", str(tmp_path / "killed.json")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10
    assert not (tmp_path / "killed" / "metrics.json").exists()
    subprocess.run(cli + ["-c", str(tmp_path / "killed.json"), "--resume"], env=ENV, check=True,
                   stderr=subprocess.DEVNULL)
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["losses"]
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())["losses"]
    assert len(a) == 20 and a == b  # identical floats, not merely close


def test_two_gloo_processes_train_and_the_loss_falls(tmp_path):
    cfg = tiny_config(tmp_path, "ternary", steps=30)
    d = cfg.to_dict() | {"output_dir": str(tmp_path / "ddp")}
    (tmp_path / "ddp.json").write_text(json.dumps(d))
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "bitllm.cli", "train", "-c", str(tmp_path / "ddp.json")],
                         env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["processes"] == 2
    assert _falls(m["losses"]), m["losses"]
    assert m["train_tokens_seen"] == 30 * cfg.batch_size * cfg.model.seq_len
    assert time.time() - t0 < 240


def test_fp16_loss_scaler_overflow_skips_the_step_instead_of_stopping(tmp_path, monkeypatch):
    """Under fp16 mixed precision (a GPU) the GradScaler's first steps overflow by design; accelerate's
    clip_grad_norm_ then returns inf. That is the scaler's routine, not divergence. Simulated here with a CPU
    GradScaler started at 2**127."""
    real, scalers = trainer_mod._accelerator, []

    def with_scaler(cfg):
        acc = real(cfg)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
        scalers.append(acc.scaler)
        return acc

    monkeypatch.setattr(trainer_mod, "_accelerator", with_scaler)
    r = train(tiny_config(tmp_path, "ternary", steps=3, save_every=3), progress=False)
    assert len(r.losses) == 3 and all(map(math.isfinite, r.losses))
    assert scalers[0].get_scale() < 2.0**127  # it did overflow, and skipped rather than raised


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path):
    cfg = tiny_config(tmp_path, "ternary", steps=2, save_every=1)
    train(cfg, progress=False)
    ckpt = tmp_path / "run-ternary" / "checkpoint"
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])  # truncated, e.g. copied by hand
    with pytest.raises(BitLLMError, match=r"optimizer\.pt: cannot resume.*missing or corrupt.*--overwrite"):
        train(cfg, resume=True, progress=False)
    (ckpt / "optimizer.pt").write_bytes(data)
    (ckpt / "state.json").write_text("{}")
    with pytest.raises(BitLLMError, match=r"state\.json: cannot resume"):
        train(cfg, resume=True, progress=False)
