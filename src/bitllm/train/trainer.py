"""From-scratch training of a 1.58-bit, 1-bit or full-precision decoder with accelerate and a hand-written loop.

The same code runs on one CPU, one GPU or several processes (`accelerate launch` / `torchrun`; DDP). The loop is
short so that resuming is bit-exact: the data position is the step (seeded permutations per epoch), the schedule
is a pure function of the step, and a checkpoint holds model, optimizer, RNG and the loss history.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitllm.errors import BitLLMError
from bitllm.formats.atomic import atomic_directory, atomic_write_bytes
from bitllm.train.config import TrainConfig, lr_at, weight_decay_at
from bitllm.train.data import Corpus, batch_indices, build_corpus, eval_windows, load_tokenizer, unigram_perplexity

CKPT = "checkpoint"  # training state (latent weights, optimizer, RNG, losses), replaced atomically
MODEL = "model"  # the final model: packed bitllm checkpoint, or a plain HF one for the fp twin
TOKENIZER = "tokenizer"
PACK_FORMAT = {"ternary": "i2", "binary": "b1"}


class TrainingDivergedError(BitLLMError):
    """The loss became NaN or inf; the run stopped and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    losses: list[float]
    heldout_ppl: dict[str, float]
    unigram_ppl: dict[str, float]
    step_time_s: float  # mean seconds per optimizer step (the first steps excluded)
    tokens_per_s: float
    params: int
    metrics: dict[str, Any] = field(default_factory=dict)
    is_main_process: bool = True


# --- model ----------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int) -> nn.Module:
    """A random-init transformers decoder of cfg.model's shape; quantized with `quantize_` unless quant is none."""
    from transformers import AutoModelForCausalLM, BitNetConfig, LlamaConfig

    m = cfg.model
    hf_cls = BitNetConfig if m.layout == "bitnet" else LlamaConfig
    hf_cfg = hf_cls(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads, hidden_act=m.hidden_act,
        max_position_embeddings=m.seq_len, tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    if cfg.quant != "none":
        from bitllm.quant.api import quantize_
        from bitllm.quant.config import config_for

        # bitnet has attention/FFN sub-norms before its projections; llama gets the paper's norm inside BitLinear
        quantize_(model, config_for(cfg.quant, input_norm=m.layout == "llama"))
    return model


def compute_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T) batch (HF shifts the labels)."""
    return model(input_ids=input_ids, labels=input_ids).loss


def _param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False}]


def _set_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    lr = lr_at(cfg.recipe, step, cfg.steps)
    wd = weight_decay_at(cfg.recipe, step, cfg.steps)
    for g in opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = wd if g["decay"] else 0.0
    return lr


# --- checkpoints ----------------------------------------------------------------------------------------


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    d.pop("output_dir", None)
    return d


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, state: dict) -> None:
    """Write the training state atomically: readers see the previous checkpoint or this one, never a mix."""
    with atomic_directory(directory) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        py_state = random.getstate()
        full = dict(state, config=cfg.to_dict(), python_random=[py_state[0], list(py_state[1]), py_state[2]])
        (tmp / "state.json").write_text(json.dumps(full) + "\n")


def start_fresh_run(out: Path, cfg, config_file: str, kind: str, outputs: tuple[str, ...], overwrite: bool) -> None:
    """A new (not resumed) run in `out`: refuse to replace an existing checkpoint unless `overwrite`, remove the
    previous run's `outputs` (files or directories), and write the run's config atomically. Main process only."""
    if (out / CKPT / "state.json").exists() and not overwrite:
        raise BitLLMError(f"{out} already holds a {kind} checkpoint; pass --resume to continue it, or "
                          "--overwrite (or another output directory) to start again")
    for name in outputs:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / config_file, cfg.to_json().encode())


def _read_checkpoint(directory: Path) -> tuple[dict, dict, dict, dict]:
    """(state, model, optimizer, rng) of a checkpoint directory; BitLLMError naming the file when one is missing,
    truncated or corrupt (e.g. copied by hand or damaged on disk), instead of a raw zip or JSON error."""
    parts = {}
    for name in ("state.json", "model.pt", "optimizer.pt", "rng.pt"):
        path = directory / name
        try:
            if name.endswith(".json"):
                parts[name] = json.loads(path.read_text())
                missing = {"step", "config", "python_random"} - set(parts[name])
                if missing:
                    raise KeyError(f"no {sorted(missing)}")
            else:
                parts[name] = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as e:
            raise BitLLMError(f"{path}: cannot resume from this checkpoint, the file is missing or corrupt "
                              f"({type(e).__name__}: {e}); start again with --overwrite or another output_dir") from e
    return parts["state.json"], parts["model.pt"], parts["optimizer.pt"], parts["rng.pt"]


def load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig) -> dict:
    state, model_sd, opt_sd, rng = _read_checkpoint(directory)
    if _comparable(state["config"]) != _comparable(cfg.to_dict()):
        raise BitLLMError(f"{directory}: the checkpoint was written by a different config; resume with the config in "
                          f"{directory / 'state.json'} or start a new output_dir")
    model.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))
    return state


def save_model(model: nn.Module, cfg: TrainConfig, tokenizer, directory: Path) -> Path:
    """The final model for the rest of the toolkit: packed (bitllm.save_pretrained) or plain HF (fp twin)."""
    if cfg.quant == "none":
        with atomic_directory(directory) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return directory
    from bitllm.formats.checkpoint import save_pretrained

    return save_pretrained(model, directory, PACK_FORMAT[cfg.quant], tokenizer=tokenizer)


# --- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean NLL) over every window position but the first; windows (n, T)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch].to(device)  # (b, T)
        logits = model(input_ids=x).logits[:, :-1].float()  # (b, T-1, V)
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / max(count, 1))


# --- the loop -------------------------------------------------------------------------------------------


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=not cuda, mixed_precision=mp)


def _prepare_corpus(cfg: TrainConfig, out: Path, accelerator, resuming: bool) -> Corpus:
    """Rank 0 trains (or loads) the tokenizer and saves it; the other ranks load the saved one."""
    tok_dir = out / TOKENIZER
    with accelerator.main_process_first():
        tokenizer = None
        if cfg.data.tokenizer is None and (resuming or not accelerator.is_main_process):
            tokenizer = load_tokenizer(str(tok_dir))
        corpus = build_corpus(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, tokenizer)
        if accelerator.is_main_process and not resuming:
            with atomic_directory(tok_dir) as tmp:
                corpus.tokenizer.save_pretrained(tmp)
    return corpus


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, corpus: Corpus | None = None,
          progress: bool = True) -> TrainResult:
    """Train `cfg` to completion and write under cfg.output_dir: checkpoint/ (resumable training state), model/
    (the final model + tokenizer), tokenizer/, train_config.json, metrics.json, loss.png.

    resume: continue bit-exactly from checkpoint/ if it exists. overwrite: allow a fresh run over an old one.
    corpus: reuse data built by `build_corpus` (e.g. for twins); its tokenizer must be the one saved in tokenizer/.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    ckpt_dir = out / CKPT
    resuming = resume and (ckpt_dir / "state.json").exists()
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    if main and not resuming:
        start_fresh_run(out, cfg, "train_config.json", "training", (CKPT, MODEL), overwrite)
    accelerator.wait_for_everyone()

    if corpus is None:
        corpus = _prepare_corpus(cfg, out, accelerator, resuming)
    elif main and not resuming:
        with atomic_directory(out / TOKENIZER) as tmp:
            corpus.tokenizer.save_pretrained(tmp)
    tokenizer = corpus.tokenizer
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise BitLLMError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise BitLLMError(f"per-process batch {per_rank} is not divisible by micro_batch_size {micro}")

    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(_param_groups(model), lr=cfg.recipe.lr, betas=cfg.recipe.betas, eps=cfg.recipe.eps)
    state = {"step": 0, "losses": [], "lrs": [], "step_times": [], "last_good_checkpoint": None}
    if resuming:
        state = load_checkpoint(ckpt_dir, model, opt, cfg)
        state.pop("config")
        state.pop("python_random")
    model, opt = accelerator.prepare(model, opt)
    model.train()

    blocks = corpus.train
    tokens_per_step = cfg.batch_size * cfg.model.seq_len
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not (main and progress), unit="step",
               desc=f"{cfg.quant} {params / 1e6:.1f}M", dynamic_ncols=True)
    overflows = 0  # consecutive fp16 steps the loss scaler skipped
    try:
        for step in range(state["step"], cfg.steps):
            t0 = time.perf_counter()
            lr = _set_schedule(opt, cfg, step)
            idx = batch_indices(blocks.shape[0], step, cfg.batch_size, cfg.seed)
            mine = idx[accelerator.process_index * per_rank:(accelerator.process_index + 1) * per_rank]
            loss_sum = torch.zeros((), device=accelerator.device)
            n_micro = per_rank // micro
            for j in range(n_micro):
                x = blocks[mine[j * micro:(j + 1) * micro]].to(accelerator.device)  # (micro, T)
                sync = j == n_micro - 1  # all-reduce the gradients once per optimizer step
                ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                with ctx:
                    loss = compute_loss(model, x)
                    accelerator.backward(loss / n_micro)
                loss_sum += loss.detach().float() / n_micro
            loss_val = accelerator.reduce(loss_sum, reduction="mean").item()
            if not math.isfinite(loss_val):
                raise TrainingDivergedError(f"loss is {loss_val} at step {step + 1}; training stopped. "
                                            + resume_advice(state, ckpt_dir))
            if cfg.recipe.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.recipe.grad_clip)
                overflows = check_grad_norm(norm, accelerator, overflows, step,
                                            "training stopped before the update. " + resume_advice(state, ckpt_dir))
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["losses"].append(loss_val)
            state["lrs"].append(lr)
            state["step_times"].append(dt)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and main:
                ppl = _evaluate(accelerator.unwrap_model(model), corpus, cfg)
                state.setdefault("evals", []).append({"step": step + 1, **ppl})
                bar.write(f"step {step + 1}: held-out ppl " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                state["last_good_checkpoint"] = step + 1
                if main:
                    save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), opt, cfg, state)
                accelerator.wait_for_everyone()
                _after_checkpoint(step + 1)
    finally:
        bar.close()

    unwrapped = accelerator.unwrap_model(model)
    result = None
    if main:
        result = _finish(unwrapped, cfg, corpus, state, params, out, world)
    accelerator.wait_for_everyone()
    if result is None:  # other ranks: the numbers rank 0 wrote
        result = _result_from_metrics(out, params, state)
        result.is_main_process = False
    return result


MAX_OVERFLOWS = 30  # consecutive steps an fp16 loss scaler may skip (its scale halves each time) before we give up


def check_grad_norm(norm, accelerator, overflows: int, step: int, advice: str) -> int:
    """The new count of consecutive overflowed steps after a gradient norm of `norm` at `step` (0-based).

    A NaN/inf norm is divergence (the update would poison the weights): TrainingDivergedError, with `advice`. Under
    fp16 mixed precision it is first the loss scaler's overflow, which is routine: its optimizer step skips the
    update and lowers the scale, so only a long run of them means divergence."""
    if math.isfinite(float(norm)):
        return 0
    if getattr(accelerator, "scaler", None) is not None and overflows < MAX_OVERFLOWS:
        return overflows + 1
    raise TrainingDivergedError(f"gradient norm is {float(norm)} at step {step + 1}; {advice}")


def resume_advice(state: dict, ckpt_dir: Path, fix: str = "lower recipe.lr or raise recipe.warmup_steps") -> str:
    """Where a diverged run can continue from (training and conversion share it); `fix` names the knobs."""
    if not state["last_good_checkpoint"]:
        return f"No checkpoint was written yet; {fix} and start again."
    return (f"The last good checkpoint (step {state['last_good_checkpoint']}) is in {ckpt_dir}; {fix}, then "
            "continue it with --resume.")


def _after_checkpoint(step: int) -> None:
    """Hook run on every process after each checkpoint (tests use it to kill a run at a known point)."""


def _evaluate(model: nn.Module, corpus: Corpus, cfg: TrainConfig) -> dict[str, float]:
    return {split: heldout_perplexity(model, eval_windows(ids, cfg.model.seq_len, cfg.data.max_eval_tokens))
            for split, ids in corpus.heldout.items()}


def _finish(model: nn.Module, cfg: TrainConfig, corpus: Corpus, state: dict, params: int, out: Path,
            processes: int) -> TrainResult:
    from bitllm.train.plot import plot_losses

    ppl = _evaluate(model, corpus, cfg)
    uni = {split: unigram_perplexity(corpus.unigram_counts, eval_windows(ids, cfg.model.seq_len, cfg.data.max_eval_tokens))
           for split, ids in corpus.heldout.items()}
    model_dir = save_model(model, cfg, corpus.tokenizer, out / MODEL)
    times = state["step_times"]
    steady = times[2:] if len(times) > 4 else times  # the first steps pay for allocation and warm-up
    step_time = sum(steady) / max(len(steady), 1)
    metrics = {
        "quant": cfg.quant, "layout": cfg.model.layout, "params": params, "steps": state["step"], "processes": processes,
        "train_tokens_seen": state["step"] * cfg.batch_size * cfg.model.seq_len,
        "corpus_train_tokens": corpus.train_tokens, "losses": state["losses"], "lrs": state["lrs"],
        "step_time_s": step_time, "tokens_per_s": cfg.batch_size * cfg.model.seq_len / step_time if step_time else 0.0,
        "heldout_ppl": ppl, "unigram_ppl": uni, "evals": state.get("evals", []),
        "model_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
    }
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    plot_losses({f"{cfg.quant} ({cfg.model.layout})": state["losses"]}, out / "loss.png",
                title=f"{cfg.preset or 'custom'}: training loss")
    return _result(out, model_dir, metrics)


def _result(out: Path, model_dir: Path, m: dict) -> TrainResult:
    return TrainResult(out, model_dir, m["losses"], m["heldout_ppl"], m["unigram_ppl"], m["step_time_s"],
                       m["tokens_per_s"], m["params"], m)


def _result_from_metrics(out: Path, params: int, state: dict) -> TrainResult:
    path = out / "metrics.json"
    if path.exists():
        return _result(out, out / MODEL, json.loads(path.read_text()))
    return TrainResult(out, out / MODEL, state["losses"], {}, {}, 0.0, 0.0, params)
