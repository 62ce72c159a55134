"""OneBit's distillation loss (arXiv 2402.11295 §3.3; REFERENCES.md §4.3): pure functions of logits and hidden states.

L = α·s·KL(p_T ‖ p_S) + (1 − α)·CE(student, labels) + β·Σ_layers mean_tokens ‖ĥ_T − ĥ_S‖²,
KL with `batchmean` (summed over tokens and vocabulary, divided by the batch size; no temperature), ĥ the hidden
state L2-normalised per token, layers = indices 0..n_layers−1 of HF's `hidden_states` (embedding output included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T ‖ p_S) summed over tokens and vocabulary, divided by the batch size. Logits (B, T, V)."""
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)  # fp32: bf16 log-probs of a 262k vocab lose the tail
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Σ over layers of the per-token mean of ‖ĥ_T − ĥ_S‖², ĥ = h / ‖h‖ per token; each h (B, T, D).

    Takes the first n_layers entries of HF's hidden_states tuple (n_layers + 1 long), as OneBit does."""
    n = len(teacher_hidden) - 1
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student_hidden[:n], teacher_hidden[:n]):
        d = F.normalize(hs.float(), dim=-1) - F.normalize(ht.float(), dim=-1)  # (B, T, D)
        total = total + d.pow(2).sum(-1).mean()
    return total


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T, V) logits on (B, T) ids."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


@dataclass
class LossParts:
    total: torch.Tensor
    kd: float
    hidden: float
    ce: float


def distill_loss(student_out, teacher_out, input_ids: torch.Tensor, alpha: float, scale: float,
                 beta: float) -> LossParts:
    """OneBit's total loss from HF model outputs (hidden states needed when beta > 0; teacher_out None: CE only)."""
    ce = next_token_ce(student_out.logits, input_ids)
    if teacher_out is None:
        return LossParts(ce, 0.0, 0.0, ce.item())
    kd = kd_kl(student_out.logits, teacher_out.logits)
    total = alpha * scale * kd
    if alpha < 1.0:
        total = total + (1.0 - alpha) * ce
    hid = torch.zeros(())
    if beta > 0:
        hid = hidden_mse(student_out.hidden_states, teacher_out.hidden_states)
        total = total + beta * hid
    return LossParts(total, kd.item(), hid.item(), ce.item())
