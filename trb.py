"""
Trust-Region Behavior Blending (TRB) for on-policy distillation (arXiv 2605.31159), in one file.

On-policy distillation (OPD) trains a student pi_S on its own samples with the per-prefix reverse KL to a frozen
teacher pi_T, L(theta) = E_h [ KL(pi_S(.|h) || pi_T(.|h)) ]. TRB changes only where the prefixes h come from: during
a warmup of K steps each token is drawn from the behavior policy

    mu_beta  ~  pi_S^(1-beta) * pi_T^beta                                                    (eq. 1)
    beta*    =  max{ beta in [0,1] : KL(mu_beta || pi_S) <= eps }                             (eq. 2)
    eps_k    =  eps0 * max(0, 1 - k/K)                                                        (eq. 3)

which solves min_mu KL(mu || pi_T) s.t. KL(mu || pi_S) <= eps, per prefix and decoding step. eps <= 0 gives
mu = pi_S; KL(pi_T || pi_S) <= eps gives mu = pi_T; in between, d/dbeta KL(mu_beta || pi_S) = beta Var_mu[log pi_T -
log pi_S] >= 0, so beta* is the root of a monotone function. After K steps the run is plain OPD: the teacher no
longer runs while decoding.

Design choices (docs/design.md has each in full)
 1. beta* by safeguarded Newton on sqrt(KL(beta)) - sqrt(eps) (near-linear in beta: 2-4 iterations), started at App.
    E's beta0 = sqrt(2 eps / Var_S[log pi_T - log pi_S]), bisecting when a step leaves the bracket.
 2. KL(mu_beta || pi_S) from three sums of terms >= 0 (the fast path), else in the log domain (the reference). The
    solver aims just below eps, so the float64 KL of the sampled mu stays within eps (1 + 1e-5).
 3. Both policies are tempered, then EOS-folded, then blended: the budget is against the student a sampler would use.
 4. Tokens impossible under either policy stay impossible under mu, for every beta > 0.
 5. The EOS ids of student and teacher are folded into the student's (logsumexp; paper App. G), before the blend
    and the loss; the checkpoint's generation_config lists them all, so eval.py, generate() and vLLM stop alike.
 6. Both models work on the shared tokenizer vocabulary: logits are sliced to V (checkpoints pad differently).
 7. The loss is the reverse KL over the full vocab or the student's renormalised top-k (paper: k=16), divided by the
    step's global response-token count (EOS included): micro-batches, DDP and FSDP give one process's gradient. It is
    fused with the output heads, a tile of positions at a time, recomputed in backward: no (B, T, V) logits.
 8. The teacher re-scores the finished sequences in one forward, which returns hidden states (B, T, H), not logits.
 9. Tokens are drawn by inverse CDF from one uniform per original row and step, from a generator seeded by (seed,
    step, rank): --resume replays exactly, whichever rows are still decoding.
10. A step's rows decode as one batch, both models with KV caches; once a quarter has ended, finished rows leave it.
    One host sync per decoding step (plus one per solver iteration); blend and sampler in float32.
11. A run directory holds checkpoint-N folders (from_pretrained loads each) and metrics.jsonl. A save writes
    checkpoint-N.tmp, trainer_state.pt last, and renames it: a kill leaves the previous checkpoint intact. Only the
    newest keeps the optimizer state; a lock keeps a second run off; a non-finite number stops the run unsaved.
12. Multi-GPU: DDP, or FSDP2 (--fsdp) for students beyond one GPU, gathered whole once per rollout for decoding. The
    teacher is replicated; one too large for a GPU is not built in.
13. Speculative sampling from mu (--spec_tokens g): the student drafts g tokens, the teacher scores them in one forward,
    a draft is kept with probability min(1, mu/pi_S) and the first rejected one redrawn from norm(max(0, mu - pi_S)):
    exactly mu, with drafts kept with probability 1 - TV(mu, pi_S) >= 1 - sqrt(eps/2) (Pinsker).

Usage
  python trb.py --student Qwen/Qwen3-0.6B-Base --teacher Qwen/Qwen3-4B --data gsm8k        # one GPU
  torchrun --standalone --nproc_per_node 8 trb.py --student ... --teacher ...              # DDP
  torchrun --nnodes N --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT trb.py --fsdp ...
  python trb.py --help                                                                     # every flag
"""
import argparse
import copy
import ctypes
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections import namedtuple
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch imports: one line, not a traceback
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.excepthook = lambda t, e, tb: (print("trb: interrupted", file=sys.stderr) if t is KeyboardInterrupt else
                                       sys.__excepthook__(t, e, tb))

import torch
import torch.nn.functional as F
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------------------
# config

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

NEG_INF = float("-inf")
MIN_TAU = 1e-3  # the smallest sampling temperature: below it, logits / tau can overflow float32

@dataclass
class Config:
    # models
    student: str = "Qwen/Qwen3-0.6B-Base"  # hub name or local dir; trained
    teacher: str = "Qwen/Qwen3-4B"         # hub name or local dir; frozen
    trust_remote_code: bool = False        # run a model's own code from the hub; off unless asked
    # data
    data: str = "gsm8k"                    # gsm8k | math (hub names) | a local .jsonl, .json or .parquet of prompts
    prompt_field: str = ""                 # the prompt's field; "" = the first of question, problem, prompt
    system_prompt: str = SYSTEM_PROMPT     # the paper's system prompt; "" = no system message
    max_prompt_len: int = 512              # longer prompts (in tokens) are skipped and counted
    eval_data: str = ""                    # held-out prompts for eval_kl (a hub name: its test split); "" = no eval
    eval_prompts: int = 64                 # how many held-out prompts
    eval_every: int = 25                   # steps between evals (0 = never)
    # TRB budget (eq. 3)
    eps0: float = 0.02                     # initial KL budget; 0 = vanilla OPD
    warmup_steps: int = 50                 # K: steps 1..K (as logged) sample from mu, eps = 0 from step K+1
    schedule: str = "linear"               # linear (eq. 3) | constant: fixed-eps blending, never annealed
    # the paper's other warmups, one at a time and with --eps0 0; the defaults are plain TRB
    skd_topk: int = 0                      # SKD: a student token outside the teacher's top-K is resampled...
    skd_steps: int = 0                     # ... from the teacher, during the first N steps
    veto_beta: float = 0.0                 # Veto: target Q ~ pi_T * pi_S^B (pi_S detached), B annealed to 0 over K
    temp_warmup: float = 0.0               # sampling temperature from this to --temperature over K (0 = off)
    sft_warmup_steps: int = 0              # the first N steps are NLL on teacher samples
    # rollout
    n_samples: int = 4                     # rollouts per prompt
    temperature: float = 1.0               # sampling temperature; 0 = greedy
    max_new_tokens: int = 1024             # response length limit
    rollout_batch_size: int = 0            # rows decoded together; 0 = all of this rank's rows of the step
    spec_tokens: int = -1                  # g draft tokens per teacher forward while it blends (exact); 0 = the
                                           # lock-step loop; -1 = auto: 4 on CUDA, 0 on a CPU
    # optimisation
    max_steps: int = 200                   # training steps (on --resume, where the run ends)
    batch_size: int = 8                    # prompts per step, across all ranks
    micro_batch_size: int = 8              # sequences per training forward/backward
    lr: float = 1e-5                       # AdamW learning rate
    lr_warmup_steps: int = 15              # linear lr warmup, then constant
    weight_decay: float = 0.01             # AdamW weight decay
    beta1: float = 0.9                     # AdamW beta1
    beta2: float = 0.999                   # AdamW beta2
    grad_clip: float = 1.0                 # gradient-norm clipping; 0 = off
    loss_topk: int = 16                    # reverse KL on the student's top-k, renormalised; 0 = full vocab
    loss_chunk: int = 0                    # positions per tile of the fused head + loss; 0 = auto
    grad_ckpt: bool = False                # gradient checkpointing of the student
    # LoRA (peft): low-rank adapters train, the student's own weights stay frozen
    lora_r: int = 0                        # adapter rank; 0 = full fine-tuning
    lora_alpha: float = 32.0               # adapter scale alpha (the update is scaled by alpha / r)
    lora_dropout: float = 0.0              # dropout on the adapters' input (training forward only)
    lora_targets: str = "all-linear"       # modules to adapt: all-linear, or comma-separated names (q_proj,v_proj)
    lora_merge: bool = False               # also write student + adapters merged to the last checkpoint's merged/
    # system
    fsdp: bool = False                     # under torchrun: shard the student, its gradients and AdamW state (FSDP2)
    out_dir: str = "out-trb"               # the run directory: checkpoint-N folders and metrics.jsonl
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                    # autocast and teacher dtype: auto (bf16 on CUDA) | bfloat16 | float32
    seed: int = 1337                       # seeds the data order and every step's sampling; 0 <= seed < 2^32
    resume: bool = False                   # continue the run in out_dir; flags given again override its own
    overwrite: bool = False                # start over where a run is; the old one goes at this run's first save
    save_every: int = 50                   # steps between checkpoints (0 = only the last, which is always saved)
    save_total_limit: int = 0              # keep the newest N checkpoints; 0 = all (the paper reports a run's best)
    wandb_project: str = ""                # "" = no wandb

class UserError(Exception):
    """Bad input: reported as one line, never as a traceback."""

def _short(e, n=120):
    """An exception's message on one line, cut at a word if longer than n."""
    m = " ".join(str(e).split()) or type(e).__name__
    return m if len(m) <= n else m[:n].rsplit(" ", 1)[0] + " ..."

# ---------------------------------------------------------------------------------------------------------------------
# the policies: temperature, EOS folding, the shared vocabulary (design choices 3, 5, 6)

def policy_logits(logits, eos_ids, tau=1.0):
    """Logits of the policy a sampler draws from at temperature tau: tempered first, then EOS folded, since a sampler
    stops on any EOS id of the tempered distribution: P(stop) = sum_i p_tau(eos_i) (design choice 3). (..., V)"""
    x = logits.float()
    return fold_eos(x / tau if tau != 1 else x, eos_ids)

def fold_eos(logits, eos_ids):
    """Folds the mass of all EOS ids into eos_ids[0] (logsumexp); the others get -inf. float32 (..., V)."""
    x = logits.float()                                       # the folded logit is written in float32, not bf16
    if len(eos_ids) < 2: return x
    ids = torch.tensor(eos_ids, device=x.device)
    lse = x.index_select(-1, ids).logsumexp(-1, keepdim=True)  # (..., 1)
    return x.index_fill(-1, ids[1:], NEG_INF).index_copy(-1, ids[:1], lse)  # (..., V)

def token_logp(logits, tokens):
    """log softmax(logits)[tokens] in float32, with no (..., V) log-softmax made. (..., V), (...) -> (...)"""
    x = logits.float()
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - x.logsumexp(-1)

def shared_vocab(s_tok, t_tok):
    """V of the shared tokenizer vocab; refuses tokenizers that map it differently (design choice 6)."""
    V = min(len(s_tok), len(t_tok))
    s_ids, t_ids = s_tok.convert_ids_to_tokens(list(range(V))), t_tok.convert_ids_to_tokens(list(range(V)))
    for i, (a, b) in enumerate(zip(s_ids, t_ids)):
        if a != b:
            raise UserError(f"incompatible tokenizers: token id {i} is {a!r} for the student but {b!r} for the teacher")
    return V

def eos_ids_of(*pairs):
    """Union of EOS ids of (tokenizer, model) pairs; the first is canonical (the student's)."""
    ids = []
    for tok, model in pairs:
        gen = getattr(model, "generation_config", None)
        for e in [tok.eos_token_id, getattr(gen, "eos_token_id", None)]:
            for i in (e if isinstance(e, (list, tuple)) else [e]):
                if i is not None and i not in ids: ids.append(int(i))
    if not ids: raise UserError("the student tokenizer has no EOS token")
    return ids

# ---------------------------------------------------------------------------------------------------------------------
# the trust-region blend, eq. 1-2 (design choices 1, 2, 4)

def trust_region_blend(s_logits, t_logits, eps):
    """Behavior policy of eq. 1-2: mu = pi_S^(1-beta*) pi_T^beta*, with the largest beta* in [0,1] such that
    KL(mu || pi_S) <= eps. s_logits, t_logits: (..., V), any float dtype, already divided by the sampling temperature.
    eps: float or tensor broadcasting to (...). Returns logp_mu (..., V) float32 log-probabilities and beta (...)."""
    logp_mu, beta, _, _ = _blend(s_logits, t_logits, eps)
    return logp_mu, beta

def _blend(s_logits, t_logits, eps, tol=1e-4, max_iter=60, newton=True):
    """trust_region_blend, plus the realised KL(mu||pi_S) and the solver's iterations (for the rollout and bench.py)."""
    shape, V = s_logits.shape[:-1], s_logits.shape[-1]
    with torch.autocast(s_logits.device.type, enabled=False):  # float32, even inside an autocast region
        ls = F.log_softmax(s_logits.float().reshape(-1, V), -1)  # (N, V) log pi_S
        lt = F.log_softmax(t_logits.float().reshape(-1, V), -1)  # (N, V) log pi_T
        eps = torch.as_tensor(eps, dtype=torch.float32, device=ls.device).expand(shape).reshape(-1)  # (N,)
        p, logp, dc, c, off = _support(ls, lt)
        beta, kl, it = _solve_beta(p, logp, dc, torch.where(eps > 0, eps - c, 0.0), tol, max_iter, newton)  # (N,) x 2
        # eq. 1: log mu = log pi_S + beta (log pi_T - log pi_S) - log Z, on A; off A mu = 0 (design choice 4)
        v = torch.addcmul(logp, dc, beta[:, None])           # (N, V) log pi_S + beta d + a row constant
        logp_mu = (v - v.logsumexp(-1, keepdim=True)).add_(off.mul_(1e30))  # (N, V) -1e30 * 1e30 = -inf off A
        logp_mu = torch.where(beta[:, None] > 0, logp_mu, ls)  # (N, V) beta* = 0: mu = pi_S exactly
        kl = torch.where(beta > 0, kl + c, 0.0)              # (N,) realised KL(mu||pi_S)
    return logp_mu.reshape(*shape, V), beta.reshape(shape), kl.reshape(shape), it

def _support(ls, lt):
    """Where mu_beta lives and what the solver needs (design choice 4). For beta > 0, mu_beta is supported on A, the
    tokens finite under both policies, and KL(mu_beta||pi_S) = KL(mu_beta||p) + c with p = pi_S renormalised on A
    and c = -log pi_S(A) >= 0. Returns p, log p (finite, <= -1e30 off A), dc = log pi_T - log pi_S centred under p
    (0 off A), c (N,) and off (0 on A, -1e30 off A). ls, lt: (N, V) log-probabilities."""
    d = lt - ls                                              # (N, V) inf or nan off A
    inA = torch.nan_to_num(d * 0 + 1, nan=0.0)               # (N, V) 1 on A, 0 off A: a float mask, not a bool one
    off = (inA - 1) * 1e30                                   # (N, V) 0 on A, -1e30 off A
    ps = ls.exp()                                            # (N, V)
    pA = ps * inA                                            # (N, V) pi_S on A, 0 off A
    m_A = pA.sum(-1)                                         # (N,) pi_S(A)
    # c from the smaller of the two masses: exactly 0 when A holds it all, and no 1 - m_out = 0 overflow when A holds
    # next to nothing (c = inf only below pi_S(A) = 1e-38, i.e. 87 nats, beyond any budget)
    m_out = (ps - pA).sum(-1)                                # (N,) pi_S off A, from exact terms
    c = torch.where(m_A > 0.5, -torch.log1p(-m_out), -torch.log(m_A))  # (N,)
    logp = (ls + c[:, None]).clamp_(min=-1e30).add_(off)     # (N, V) finite off A: keeps 0 * log 0 out of the sums
    p = pA.mul_(c.exp()[:, None])                            # (N, V)
    d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)  # (N, V)
    dc = d - (p * d).sum(-1, keepdim=True)                   # (N, V) centred: E_p[dc] = 0
    return p, logp, dc, c, off

def _solve_beta(p, logp, dc, target, tol=1e-4, max_iter=60, newton=True):
    """The largest beta in [0, 1] with KL(mu_beta||p) <= target, per row, by safeguarded Newton (design choice 1).
    Accepted band: target * [1 - 2 tol, 1 - tol/2]; the margin below target absorbs the float32 rounding of the
    returned log-probs (design choice 2). Returns the feasible end of the bracket, its KL and the iterations used.
    newton=False: plain bisection, for bench.py."""
    # App. E: KL(mu_beta||pi_S) ~ beta^2 sigma^2 / 2  =>  beta0 = sqrt(2 eps / sigma^2). The next cumulant,
    # KL ~ sigma^2 beta^2 / 2 + kappa3 beta^3 / 3, corrects it to beta0 (1 - kappa3 beta0 / (3 sigma^2)).
    # A start at 1 tries the closed form (mu = pi_T) first.
    hi_ok, lo_ok = target * (1 - tol / 2), target * (1 - 2 * tol)  # (N,) the accepted band
    aim = target * (1 - 1.25 * tol)                          # (N,) its centre
    pdc2 = p * dc * dc                                       # (N, V)
    sig2, k3 = pdc2.sum(-1), (pdc2 * dc).sum(-1)             # (N,), (N,)
    beta = torch.sqrt(2 * aim.clamp(min=0) / sig2)           # (N,)
    beta = beta * (1 - k3 * beta / (3 * sig2)).clamp(0.5, 1.5)
    beta = beta.nan_to_num(1.0).clamp(max=1.0) if newton else torch.full_like(beta, 0.5)
    lo, hi = torch.zeros_like(target), torch.full_like(target, 2.0)  # lo feasible; hi = 2: beta = 1 not yet tried
    kl_lo = torch.zeros_like(target)
    dmax = dc.amax(-1)                                       # (N,) bounds beta*dc, the exponent of the fast sums
    done, it = ~(target > 0), 0
    while it < max_iter:
        all_done, fast = torch.stack([done.all(), (beta * dmax <= 50).all()]).tolist()  # one host sync per iteration
        if all_done: break
        it += 1
        kl, slope = _kl_and_slope_sums(p, dc, sig2, beta) if fast else _kl_and_slope(logp, p, dc, beta)  # (N,), (N,)
        ok = (kl <= hi_ok) & ~done
        lo, kl_lo = torch.where(ok, beta, lo), torch.where(ok, kl, kl_lo)
        hi = torch.where(~ok & ~done, beta, hi)
        done = done | (ok & ((kl >= lo_ok) | (beta == 1))) | (hi - lo <= 1e-7 * hi)
        # Newton on sqrt(KL) - sqrt(aim); sqrt(KL) is near-linear in beta (design choice 1)
        rk = kl.clamp(min=0).sqrt()
        nxt = (beta - (rk - aim.sqrt()) * 2 * rk / slope).clamp(max=1.0)
        inside = (nxt > lo) & (nxt < hi) & newton            # NaN/inf steps fail this too
        beta = torch.where(done, beta, torch.where(inside, nxt, (lo + hi.clamp(max=1.0)) / 2))
    return lo, kl_lo, it

def _kl_and_slope_sums(p, dc, sig2, beta):
    """KL(mu_beta || p) and its derivative from three sums, with no (N, V) log mu: for x = beta*dc and E_p[dc] = 0,
    Z = E_p[e^x] = 1 + S0, S0 = E_p[e^x - 1 - x] (terms >= 0), KL = beta E_mu[dc] - log Z, E_mu[dc] = S1/Z,
    E_mu[dc^2] = (sigma^2 + S2)/Z, S_k = E_p[(e^x - 1) dc^k] (S1's terms >= 0). A third of _kl_and_slope's passes.
    Only while e^x cannot overflow (beta * max dc <= 50)."""
    x = dc * beta[:, None]                                  # (N, V)
    e = torch.expm1(x)                                      # (N, V)
    S0 = ((e - x).mul_(p)).sum(-1)                          # (N,)
    q = e.mul_(p).mul_(dc)                                  # (N, V) p (e^x - 1) dc
    S1, S2 = q.sum(-1), torch.linalg.vecdot(q, dc)          # (N,), (N,)
    Z = 1 + S0                                              # (N,)
    m1 = S1 / Z                                             # (N,) E_mu[dc]
    kl = beta * m1 - torch.log1p(S0)                        # (N,)
    var = ((sig2 + S2) / Z - m1 ** 2).clamp(min=0)          # (N,) Var_mu[dc]
    return kl, beta * var

def _kl_and_slope(logp, p, dc, beta):
    """The reference: KL(mu_beta || p) and its slope beta Var_mu[dc] in the log domain, for any logits (logp is -1e30
    off the support, not -inf)."""
    v = (dc * beta.unsqueeze(-1)).add_(logp)                # (N, V) unnormalised log mu
    m = v.amax(-1, keepdim=True)                            # (N, 1)
    mu = (v - m).exp_()                                     # (N, V) one exp serves both mu and log Z
    Z = mu.sum(-1, keepdim=True)                            # (N, 1)
    mu.div_(Z)
    x = v.sub_(m + Z.log()).sub_(logp)                      # (N, V) log(mu/p), from the same exp as mu
    # sum_i p_i (r_i log r_i - r_i + 1) with r = mu/p = e^x: every term >= 0 (design choice 2). p*(r - 1) is
    # p*expm1(min(x, 1)) - mu*expm1(-max(x - 1, 0)): p*expm1(x) where x <= 1 (relative precision near r = 1) and
    # mu - p where x > 1 (no overflow, and p may underflow), with no bool mask (design choice 2).
    pr1 = torch.expm1(x.clamp(max=1)).mul_(p).sub_(torch.expm1((x - 1).clamp_(min=0).neg_()).mul_(mu))  # (N, V)
    kl = (mu * x).sub_(pr1).sum(-1)                         # (N,)
    m1 = mu * dc                                            # (N, V)
    s1 = m1.sum(-1)                                         # (N,) E_mu[dc]
    var = (torch.linalg.vecdot(m1, dc) - s1 ** 2).clamp(min=0)  # (N,) Var_mu[dc]
    return kl, beta * var

# ---------------------------------------------------------------------------------------------------------------------
# schedules (eq. 3, the lr, the baselines' warmups) and the sampler

def kl_budget(step, eps0, warmup_steps, schedule="linear"):
    """eps_k = eps0 * max(0, 1 - k/K) (eq. 3); K = 0: pure OPD from step 0; 'constant': eps0 always (fixed eps)."""
    if schedule == "constant": return eps0
    if warmup_steps <= 0: return 0.0
    return eps0 * max(0.0, 1.0 - step / warmup_steps)

def lr_at(step, cfg):
    """Linear warmup over --lr_warmup_steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else cfg.lr

Knobs = namedtuple("Knobs", "sft skd_topk veto tau")

def warmup_knobs(step, cfg):
    """The paper's other warmups at this step, all inert at their defaults: sft (the teacher samples, the loss is NLL),
    skd_topk (SKD's replacement), veto (Veto's exponent B, annealed like eps) and tau (the sampling temperature,
    rising from --temp_warmup to --temperature over K)."""
    tau = cfg.temperature
    if cfg.temp_warmup:
        tau = cfg.temp_warmup + (tau - cfg.temp_warmup) * min(1.0, step / cfg.warmup_steps if cfg.warmup_steps else 1.0)
    return Knobs(sft=step < cfg.sft_warmup_steps, skd_topk=cfg.skd_topk if step < cfg.skd_steps else 0,
                 veto=kl_budget(step, cfg.veto_beta, cfg.warmup_steps), tau=tau)

def sample(logits, gen=None, u=None):
    """One draw per row from softmax(logits) by inverse CDF: the first i with cumsum(p)_i >= u * sum(p), u ~ U(0, 1]
    (design choice 9). u: (B, 1) float64 in (0, 1], else drawn from gen. The cumsum is float64, so the drawn
    distribution is the float32 softmax itself, and a token with p_i = 0 is never drawn. (B, V) -> (B,)"""
    c = torch.cumsum(F.softmax(logits.float(), -1), -1, dtype=torch.float64)  # (B, V)
    if u is None: u = 1 - torch.rand(c.shape[0], 1, dtype=torch.float64, device=c.device, generator=gen)  # (B, 1)
    tok = torch.searchsorted(c, u * c[:, -1:]).squeeze(-1)  # (B,) u * total <= total: always in range
    return tok.clamp_(max=c.shape[-1] - 1)                   # ... but for NaN logits, which rollout() reports

# ---------------------------------------------------------------------------------------------------------------------
# rollout: one KV-cached decoding batch, finished rows leaving it (design choices 9, 10)

def format_prompt(tok, question, system=SYSTEM_PROMPT):
    """Token ids of one prompt: the chat template if the tokenizer has one (system "": no system message), else
    plain text."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": question}]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template's own refusal (e.g. no system role), or a broken template
            raise UserError(f"the student's chat template fails: {_short(e)}" + (
                "; --system_prompt '' leaves the system message out" if system else "")) from None
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(f"{system}\n\n{question}\n")["input_ids"]

def left_pad(seqs, pad_id, device):
    """Left-pads lists of token ids into (B, P) ids and attention mask."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)  # (B, P)
    attn = torch.zeros(len(seqs), P, dtype=torch.long)          # (B, P)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, P - len(s):] = 1
    return ids.to(device), attn.to(device)

@torch.inference_mode()
def rollout(student, teacher, ids, attn, eps, *, V, eos_ids, pad_id, max_new_tokens, temperature=1.0, gen=None,
            skd_topk=0, compact=0.25, bar=None, spec_tokens=0):
    """Samples B responses token by token from mu (eq. 1-2), decoding with both models' KV caches in one batch.
    ids, attn: (B, P) left-padded prompts. eps: float or (B,) per-row budgets; where every row has eps <= 0 the
    teacher never runs. temperature 0 = greedy. skd_topk: see _next_token. bar: a progress bar, one tick per step.
    Once a fraction `compact` of the batch has emitted EOS (0 = never), finished rows leave it (design choice 10).
    spec_tokens=g > 0: the same distribution by speculative sampling while the teacher blends (spec_rollout). Returns
    tokens, mask (response incl. EOS), beta, kl (realised KL(mu||pi_S)), replaced (SKD), t_logp (the teacher's log-prob
    of each token; None if it did not run), accepted (a kept draft), t_fwd (a teacher forward began), all (B, T)."""
    B, N, dev = ids.shape[0], max_new_tokens, ids.device
    eps = torch.as_tensor(eps, dtype=torch.float32, device=dev).expand(B)  # (B,)
    use_t = teacher is not None and (skd_topk > 0 or bool((eps > 0).any()))
    if use_t and spec_tokens and not skd_topk:
        return spec_rollout(student, teacher, ids, attn, eps, V=V, eos_ids=eos_ids, pad_id=pad_id, gen=gen,
                            max_new_tokens=N, temperature=temperature, compact=compact, g=min(spec_tokens, N))
    tau = temperature if temperature > 0 else 1.0
    out = _outputs(B, N, pad_id, dev)
    rows = torch.arange(B, device=dev)                       # (b,) original row of each row of the decoding batch
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                 # (B, P) position ids under left padding
    s_cache, t_cache = _new_cache(student), _new_cache(teacher) if use_t else None
    s_logits = _decode(student, ids, attn, pos, s_cache, V)  # (b, V)
    t_logits = _decode(teacher, ids, attn, pos, t_cache, V) if use_t else None
    next_pos = pos[:, -1:] + 1                               # (b, 1)
    done = torch.zeros(B, dtype=torch.bool, device=dev)      # (b,)
    for t in range(N):
        u = None if temperature <= 0 else 1 - torch.rand(B, 2, dtype=torch.float64, device=dev, generator=gen)[rows]
        with torch.autocast(dev.type, enabled=False):        # the blend and the sampler run in float32
            s = policy_logits(s_logits, eos_ids, tau)        # (b, V)
            tl = policy_logits(t_logits, eos_ids, tau) if use_t else None
            tok, beta, kl, rep = _next_token(s, tl, eps, u, skd_topk)
        live = ~done
        tok = torch.where(live, tok, pad_id)                 # (b,)
        out["tokens"][rows, t], out["mask"][rows, t] = tok, live
        out["beta"][rows, t], out["kl"][rows, t] = torch.where(live, beta, 0.0), torch.where(live, kl, 0.0)
        out["replaced"][rows, t] = rep & live
        if use_t: out["t_logp"][rows, t] = torch.where(live, token_logp(tl, tok), 0.0)  # pad may be a folded EOS
        out["t_fwd"][rows, t] = live & use_t
        done = done | (tok == eos_ids[0])
        nan = [x.isnan().any() for x in (s_logits, t_logits) if x is not None]
        n_done, *nan = torch.stack([done.sum(), *nan]).tolist()  # the step's one host sync
        for who, bad in zip(("student", "teacher"), nan):
            if bad: raise UserError(f"NaN in the {who} logits at decode position {t}")
        if bar is not None: bar.update(1)
        if n_done == len(rows) or t == N - 1: break
        if compact and n_done >= compact * len(rows):        # enough of the batch is done: drop those rows
            keep = (~done).nonzero().squeeze(1)              # (b',)
            for c in (s_cache, t_cache):
                if c is not None: c.batch_select_indices(keep)
            rows, attn, next_pos, eps, done, tok = (x[keep] for x in (rows, attn, next_pos, eps, done, tok))
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)  # (b, P+t+1)
        s_logits = _decode(student, tok[:, None], attn, next_pos, s_cache, V)
        if use_t: t_logits = _decode(teacher, tok[:, None], attn, next_pos, t_cache, V)
        next_pos = next_pos + 1
    out = {k: v[:, :t + 1] for k, v in out.items()}
    if not use_t: out["t_logp"] = None
    return out

def _outputs(B, N, pad_id, dev):
    """A rollout's per-token outputs, (B, N) each, as finished rows leave them."""
    z = lambda dtype=torch.float32: torch.zeros(B, N, dtype=dtype, device=dev)  # noqa: E731
    return dict(tokens=z(torch.long).fill_(pad_id), mask=z(torch.bool), beta=z(), kl=z(), replaced=z(torch.bool),
                t_logp=z(), accepted=z(torch.bool), t_fwd=z(torch.bool))

@torch.inference_mode()
def spec_rollout(student, teacher, ids, attn, eps, *, V, eos_ids, pad_id, max_new_tokens, g, temperature=1.0,
                 gen=None, compact=0.25):
    """rollout()'s distribution, by speculative sampling with pi_S as the draft and mu as the target (design choice
    13): a block's g drafts, one teacher forward, the first rejection replaced from the residual. Greedy: a draft is
    kept iff it is mu's argmax. Rejected drafts stay in both caches as masked columns; each row's positions continue
    from its own length. Uniforms (draft, keep, residual) are drawn once, (B, N + g, 3): the token at position n is
    a function of its prefix and u[row, n], so compaction and g leave the tokens alone."""
    B, N, dev = ids.shape[0], max_new_tokens, ids.device
    tau, greedy, jj = temperature if temperature > 0 else 1.0, temperature <= 0, torch.arange(g, device=dev)
    U = 1 - torch.rand(N + g, B, 3, dtype=torch.float64, device=dev, generator=gen).transpose(0, 1)  # (B, N+g, 3)
    out = _outputs(B, N + g, pad_id, dev)
    rows, n = torch.arange(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev)  # (b,) row, its length
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                 # (B, P)
    s_cache, t_cache = _new_cache(student), _new_cache(teacher)
    for m, c in ((student, s_cache), (teacher, t_cache)):    # the prompts but their last token, which starts a block
        if ids.shape[1] > 1: _decode(m, ids[:, :-1], attn[:, :-1], pos[:, :-1], c, V)
    y, attn, next_pos, done = ids[:, -1], attn[:, :-1], pos[:, -1:], torch.zeros(B, dtype=torch.bool, device=dev)
    while True:
        b, u = len(rows), U[rows[:, None], n[:, None] + jj]  # (b, g, 3) the uniforms of the block's positions
        attn = torch.cat([attn, attn.new_ones(b, g)], 1)     # (b, L) columns of y, x_1 .. x_{g-1}
        x, s, L = [y], [], attn.shape[1]
        for j in range(g):                                   # the student drafts x_1 .. x_g from pi_S
            s.append(policy_logits(_decode(student, x[-1][:, None], attn[:, :L - g + j + 1], next_pos + j, s_cache,
                                           V), eos_ids, tau))  # (b, V)
            x.append(s[-1].argmax(-1) if greedy else sample(s[-1], u=u[:, j, :1]))
        x, s = torch.stack(x[1:], 1), torch.stack(s, 1)      # (b, g), (b, g, V)
        tl = _decode(teacher, torch.cat([y[:, None], x[:, :-1]], 1), attn, next_pos + jj, t_cache, V, k=g)
        with torch.autocast(dev.type, enabled=False):
            tl = policy_logits(tl.reshape(b, g, -1), eos_ids, tau)  # (b, g, V) the teacher, one forward a block
            logp_mu, beta, kl, _ = _blend(s, tl, eps[:, None].expand(-1, g))  # eq. 1-2 at the g positions
            ls = s.log_softmax(-1)                           # (b, g, V) log pi_S
            lx = lambda t: t.gather(-1, x[..., None]).squeeze(-1)  # noqa: E731  (b, g) at the drafts
            kept = (x == logp_mu.argmax(-1)) if greedy else (u[..., 1].log() + lx(ls) <= lx(logp_mu))  # u <= mu/pi_S
            a = kept.cumprod(1).sum(1)                       # (b,) drafts kept before the first rejection
            i, r = a.clamp(max=g - 1), torch.arange(b, device=dev)  # (b,) where the residual draws
            lm, res = logp_mu[r, i], _residual(logp_mu[r, i], ls[r, i])  # (b, V), (b, V)
            z = lm.argmax(-1) if greedy else sample(res.log(), u=u[r, i, 2:])  # (b,)
        emit = torch.where(jj < a[:, None], x, z[:, None])   # (b, g) the kept drafts, then the residual's token
        ok = (jj <= a[:, None]) & (n[:, None] + jj < N) & ~done[:, None]  # (b, g) emitted by this block
        eos = (emit == eos_ids[0]) & ok
        ok &= eos.cumsum(1) - eos.long() == 0                # nothing after a row's EOS
        e = ok.sum(1)                                        # (b,) tokens emitted
        at = rows[:, None], n[:, None] + jj
        for k, v, d in (("tokens", emit, pad_id), ("mask", ok, False), ("beta", beta, 0.0), ("kl", kl, 0.0),
                        ("t_logp", token_logp(tl, emit), 0.0), ("accepted", jj < a[:, None], False),
                        ("t_fwd", jj == 0, False)):
            out[k][at] = torch.where(ok, v, d)
        attn[:, -g:] = jj <= a[:, None]                      # rejected drafts: masked columns in both caches
        y, n, next_pos = emit[r, (e - 1).clamp(min=0)], n + e, next_pos + e[:, None]
        done = done | eos.any(1) | (n >= N)
        n_done, *nan = torch.stack([done.sum(), s.isnan().any(), tl.isnan().any()]).tolist()  # one host sync
        for who, bad in zip(("student", "teacher"), nan):
            if bad: raise UserError(f"NaN in the {who} logits at decode position {int(n.max())}")
        if n_done == b: break
        if compact and n_done >= compact * b:
            keep = (~done).nonzero().squeeze(1)              # (b',)
            for c in (s_cache, t_cache): c.batch_select_indices(keep)
            rows, attn, next_pos, eps, done, y, n = (t[keep] for t in (rows, attn, next_pos, eps, done, y, n))
    T = int(out["mask"].sum(1).max())
    return {k: v[:, :T] for k, v in out.items()}

def _residual(logp_mu, logp_s):
    """norm(max(0, mu - pi_S)), unnormalised, from (b, V) log-probabilities; mu where rounding left it no mass."""
    mu = logp_mu.exp()
    r = (mu - logp_s.exp()).clamp(min=0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, mu)

def _next_token(s, tl, eps, u, skd_topk=0):
    """One decoding step: the token drawn from mu (eq. 1-2), or from pi_S where the teacher is idle, with beta and
    the realised KL(mu||pi_S). s, tl: (b, V) policy logits; u: (b, 2) uniforms, None = greedy. skd_topk=K: the SKD
    baseline; the student proposes, and a token outside the teacher's top-K is replaced by a teacher sample.
    Returns tok, beta, kl, replaced, all (b,)."""
    draw = lambda x, i: x.argmax(-1) if u is None else sample(x, u=u[:, i:i + 1])  # noqa: E731
    zero = torch.zeros_like(eps)
    if skd_topk:
        tok = draw(s, 0)
        rep = ~(tl.topk(skd_topk, -1).indices == tok[:, None]).any(-1)  # (b,) outside the teacher's top-K
        return torch.where(rep, draw(tl, 1), tok), zero, zero, rep
    if tl is None: return draw(s, 0), zero, zero, zero.bool()
    logp_mu, beta, kl, _ = _blend(s, tl, eps)                # (b, V), (b,), (b,)
    return draw(logp_mu, 0), beta, kl, zero.bool()

def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers 5.x
        return DynamicCache()

def _decode(model, x, attn, pos, cache, V, k=1):
    """One KV-cached forward; logits of the last position (b, V), or of the last k (b, k, V). Our cache object goes
    under the keyword this transformers reads ('cache' in 5.24, 'past_key_values' before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = model(input_ids=x, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=k,
                **{_cache_keyword(type(base)): cache})
    return out.logits[:, -k:, :V].squeeze(1)                 # (b, V) or (b, k, V)

@functools.lru_cache(maxsize=None)
def _cache_keyword(cls):
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"

class TRBLogitsProcessor:
    """TRB's behavior policy inside any HF `student.generate(...)` (and so TRL's trainers): a logits processor that
    turns the student's scores into log mu of eq. 1-2 at every step, the teacher on its own KV cache. attention_mask:
    the prompts' (B, P). EOS ids are folded, logits sliced to V (None: the teacher's count) and tempered as in
    rollout(). eps: a float or (B,); eps <= 0 everywhere gives pi_S. One per generate() call; .betas: each step's beta*.
    Exact only with generate(**TRBLogitsProcessor.EXACT, logits_processor=[proc]) and no penalty (generate's warpers
    and penalties act unseen); masked scores and beam search are refused. do_sample=False decodes argmax mu."""
    EXACT = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0)

    def __init__(self, teacher, eps, attention_mask, *, eos_ids, V=None, temperature=1.0):
        self.eps, self.eos_ids, self.tau = processor_args(teacher, eps, attention_mask, eos_ids, V, temperature)
        self.teacher, self.attn = teacher.eval(), attention_mask
        self.V, self.auto_V = V or teacher.get_output_embeddings().weight.shape[0], V is None
        self.idle = not bool((self.eps > 0).any())
        n = getattr(teacher.config, "max_position_embeddings", None) if hasattr(teacher, "config") else None
        self.room = n - int(attention_mask.sum(-1).max()) if type(n) is int else math.inf  # new tokens that fit it
        self.cache, self.pos, self.prev, self.betas = None, None, None, []

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        self._check(input_ids, scores)
        V, W = self.V, scores.shape[-1]
        if self.idle: return F.pad(policy_logits(scores[:, :V], self.eos_ids, self.tau), (0, W - V), value=NEG_INF)
        first = self.cache is None
        if len(self.betas) > self.room:                      # the teacher would read past its last position
            raise UserError(f"TRBLogitsProcessor: the longest prompt plus {len(self.betas)} new tokens go past the "
                            f"teacher's {self.teacher.config.max_position_embeddings} positions "
                            f"(max_position_embeddings): lower max_new_tokens")
        if first: self.cache, self.pos = _new_cache(self.teacher), (self.attn.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        else: self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], 1)  # (B, P+t)
        x = input_ids if first else input_ids[:, -1:]       # the prompts, then the last token
        t_logits = _decode(self.teacher, x, self.attn, self.pos, self.cache, V)  # (B, V)
        self.pos = self.pos[:, -1:] + 1                      # (B, 1) the next token's position
        with torch.autocast(scores.device.type, enabled=False):
            s, t = (policy_logits(z[:, :V], self.eos_ids, self.tau) for z in (scores, t_logits))  # (B, V) x 2
            logp_mu, beta = trust_region_blend(s, t, self.eps)  # eq. 1-2: (B, V), (B,)
        self.betas.append(beta)
        return F.pad(logp_mu, (0, W - V), value=NEG_INF)    # (B, V') padded logits stay impossible

    def _check(self, input_ids, scores):
        """The first call sees the prompts it was built for, each later one the same rows one token longer (no
        reuse, no beam reordering), and no score arrives masked (-inf). One host sync."""
        prev, self.prev, P = self.prev, input_ids, self.attn.shape
        if prev is None and tuple(input_ids.shape) != tuple(P):
            raise UserError(f"TRBLogitsProcessor: built for prompts {tuple(P)}, called on {tuple(input_ids.shape)}: "
                            f"build one per generate() call from its attention_mask, repeated as generate() repeats "
                            f"the rows for num_return_sequences (repeat_interleave); num_beams > 1 is not supported")
        if prev is not None and input_ids.shape != (prev.shape[0], prev.shape[1] + 1):
            raise UserError("TRBLogitsProcessor: this processor was used by an earlier generate() call; build a new "
                            "one for each call")
        if scores.shape[-1] < self.V or (self.auto_V and scores.shape[-1] != self.V):
            raise UserError(f"TRBLogitsProcessor: the student has {scores.shape[-1]} logits, the teacher "
                            f"{self.teacher.get_output_embeddings().weight.shape[0]} and V is "
                            f"{'not given' if self.auto_V else self.V}: pass V, the shared tokenizer vocabulary's size")
        same = (input_ids[:, :-1] == prev).all() if prev is not None else torch.ones((), device=scores.device).bool()
        same, unmasked = torch.stack([same, ~scores[:, :self.V].isneginf().any()]).tolist()
        if not same: raise UserError("TRBLogitsProcessor: the rows changed between steps (beam search reorders them): "
                                     "it samples one sequence per row, with num_beams=1")
        if not unmasked: raise UserError("TRBLogitsProcessor: the student's scores arrive masked (-inf), by "
                                         "min_new_tokens, bad_words_ids or suppress_tokens: tokens would not be "
                                         "drawn from mu")

def processor_args(teacher, eps, attn, eos_ids, V, tau):
    """TRBLogitsProcessor's inputs, checked: one line each. Returns eps (float32 on the mask's device, () or (B,)), the
    EOS ids as a list (given as generate() takes them: int, list or tensor) and the temperature as a number."""
    where = "TRBLogitsProcessor:"
    if not is_lm(teacher): raise UserError(f"{where} the teacher must be a causal LM, got {type(teacher).__name__}")
    if not (torch.is_tensor(attn) and attn.dim() == 2): raise UserError(f"{where} attention_mask is not (B, P)")
    try:
        eps = torch.as_tensor(eps, dtype=torch.float32, device=attn.device)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{where} eps must be a float or a tensor, got {eps!r:.40}") from None
    if eps.dim() > 1 or eps.numel() not in (1, attn.shape[0]):
        raise UserError(f"{where} eps has shape {tuple(eps.shape)} for {attn.shape[0]} rows: a float or one per row "
                        f"(expanded like the prompts, for num_return_sequences)")
    if not bool(((eps >= 0) & eps.isfinite()).all()): raise UserError(f"{where} eps must be finite and >= 0, got "
                                                                      f"{eps.tolist()}")
    tau = tau.item() if torch.is_tensor(tau) and tau.numel() == 1 else tau
    if not (isinstance(tau, (int, float)) and MIN_TAU <= tau < math.inf):
        raise UserError(f"{where} temperature must be a float >= {MIN_TAU}, got {tau!r} (greedy: do_sample=False)")
    n = teacher.get_output_embeddings().weight.shape[0]
    if V is not None and not (type(V) is int and 0 < V <= n):
        raise UserError(f"{where} V must be an int in [1, {n}], the teacher's logits, got {V!r}")
    eos = eos_ids.reshape(-1).tolist() if torch.is_tensor(eos_ids) else [eos_ids] if type(eos_ids) is int else eos_ids
    if not (isinstance(eos, (list, tuple)) and all(type(i) is int and 0 <= i < (V or n) for i in eos)):
        raise UserError(f"{where} eos_ids {eos_ids!r:.60} must be token ids below V = {V or n}: an int, a list or "
                        f"a tensor")
    eos = list(dict.fromkeys(eos))                           # once each: a repeat would fold its mass in twice
    return eps.reshape(-1) if eps.numel() > 1 else eps.reshape(()), eos, tau

def is_lm(m):
    """A torch model with an output layer (a causal LM): what the rollout, the loss and the processor take logits of."""
    out = m.get_output_embeddings() if isinstance(m, torch.nn.Module) and hasattr(m, "get_output_embeddings") else None
    return getattr(out, "weight", None) is not None

# ---------------------------------------------------------------------------------------------------------------------
# loss: the reverse KL, fused with the output heads (design choices 7, 8)

def reverse_kl(s_logits, t_logits, topk=0):
    """Per-position reverse KL(pi_S || pi_T), shape (...). Gradient flows to s_logits only. topk=0: full vocabulary;
    topk=k: the student's top-k tokens, renormalised on both sides (the paper's estimator, k=16)."""
    t_logits = t_logits.detach()
    if topk:
        idx = s_logits.detach().topk(topk, -1).indices       # (..., k)
        s_logits, t_logits = s_logits.gather(-1, idx), t_logits.gather(-1, idx)  # (..., k)
    ls = F.log_softmax(s_logits.float(), -1)                 # (..., V|k)
    lt = F.log_softmax(t_logits.float(), -1)                 # (..., V|k)
    ps = ls.exp()
    return (ps * torch.where(ps > 0, ls - lt, 0.0)).sum(-1)  # (...)

def opd_loss(s_logits, t_logits, mask, topk=0, prep=None):
    """Sum over masked positions of the reverse KL of prep(s, t) (the caller's: EOS folding, a Veto target), on
    materialised logits (B, T, V), mask (B, T): the readable reference that fused_loss equals."""
    s, t = prep(s_logits, t_logits) if prep is not None else (s_logits, t_logits)
    return torch.where(mask, reverse_kl(s, t, topk), 0.0).sum()  # where, not * m: a masked position may be inf

def loss_prep(eos_ids, veto=0.0):
    """The prep of opd_loss: both sides EOS-folded; veto=B replaces pi_T by Q ~ pi_T pi_S^B, pi_S detached (Veto)."""
    def prep(s, t):
        s, t = fold_eos(s, eos_ids), fold_eos(t, eos_ids)
        if veto: t = F.log_softmax(t, -1) + veto * F.log_softmax(s.detach(), -1)  # reverse_kl renormalises Q
        return s, t
    return prep

def fused_loss(hs, ht, heads, V, fn, *rest, tile=0):
    """Sum over tiles of positions of fn(s, t, *rest): s, t (c, V) the logits that the output heads (student's,
    teacher's; the teacher's gets no gradient) make of the final hidden states hs (n, H_S), ht (n, H_T); rest:
    (n, ...) tensors, split alike. Under autograd each tile is recomputed in its own backward (design choice 7).
    tile=0: 1024 positions on a GPU, else as many as fit ~8 MiB of float32 per (tile, V) buffer."""
    if tile <= 0: tile = 1024 if hs.is_cuda else max(1, 2**21 // V)
    f = lambda a, b, *r: fn(heads[0](a)[:, :V], heads[1](b)[:, :V].detach(), *r)  # noqa: E731
    ckpt = functools.partial(torch.utils.checkpoint.checkpoint, f, use_reentrant=False)
    return sum((ckpt if torch.is_grad_enabled() else f)(*x) for x in zip(*(z.split(tile) for z in (hs, ht, *rest))))

def response_logits(model, seq, attn, T, V):
    """Logits (B, T, V) at the T positions that predict the response tokens seq[:, -T:]."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                 # (B, P+T)
    out = model(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=T + 1)
    return out.logits[:, -T - 1:-1, :V]                      # (B, T, V); a forward may keep them all

def response_hidden(model, seq, attn, T):
    """The final hidden states (B, T, H) at the T positions that predict seq[:, -T:], and the output head (a module)
    that makes the logits of them (design choice 8). The head is handed an empty slice: the forward makes no logits."""
    m = getattr(model, "module", model)                      # DDP's wrapped model
    head, got = m.get_output_embeddings(), []
    def keep(_, x):  # the head's input is kept; the head itself gets none of it
        got.append(x[0][:, -T - 1:-1])
        return (x[0][:, :0],)
    hook = head.register_forward_pre_hook(keep)
    try: response_logits(model, seq, attn, T, 0)
    finally: hook.remove()
    check_head(m.config.get_text_config(), type(m).__name__, bool(got))  # where check_positions reads it
    return got[0], head

def check_head(c, who, hooked=True):
    """The fused loss needs logits = output head(hidden states): a config that scales them is refused, in one line."""
    scaled = [a for a in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap", "logit_scale",
                          "logits_scaling", "lm_head_multiplier")  # logits the head alone does not make
              if getattr(c, a, None) not in ((None,) if "cap" in a else (None, 1))]  # a cap of 1 is tanh
    if not hooked or scaled: raise UserError(f"{who}: the loss needs logits = output head(hidden states), which "
                                             f"{', '.join(scaled) or 'its forward'} breaks")

# ---------------------------------------------------------------------------------------------------------------------
# training loop: budget -> rollout -> score -> loss -> update -> log -> save

def train(cfg, given=None, *, student=None, teacher=None, tokenizer=None):
    """The loop, in the paper's order: budget -> rollout -> score -> loss -> update -> log -> save. Returns the student.
    student, teacher, tokenizer: models already in memory, trained in place (cfg.student and cfg.teacher are then
    labels). given: the flags set on the command line (None: the fields that differ from Config's defaults)."""
    cfg, models = check_start(cfg, student, teacher, tokenizer)
    rank, world, device, amp_dtype = init_runtime(cfg)
    lock = R = None
    try:
        lock = lock_out_dir(cfg.out_dir) if rank == 0 else None
        R = setup(cfg, given, rank, world, device, amp_dtype, models)
        cfg, gen = R.cfg, torch.Generator(device=R.device)
        if R.eval_prompts and cfg.eval_every and R.step == 0: log(R, dict(step=0, eval_kl=evaluate(R)))
        while R.step < cfg.max_steps:
            step, t0 = R.step, time.time()
            eps = kl_budget(step, cfg.eps0, cfg.warmup_steps, cfg.schedule)   # eq. 3
            k = warmup_knobs(step, cfg)                                          # the baselines; inert by default
            rows = [R.prompts[i] for i in batch_indices(step, len(R.prompts), cfg, R.rank, R.world)
                    for _ in range(cfg.n_samples)]
            gen.manual_seed(cfg.seed * 1_000_003 + step * 1009 + R.rank)        # design choice 9
            try:
                roll = rollout_rows(R, rows, eps, k, gen)                        # mu while eps > 0, then pi_S
            except UserError as e:
                raise UserError(f"step {step + 1}: {e}; stopping without saving; {on_disk(R)}") from None
            t_roll = time.time() - t0
            n_tok = all_reduce(roll["mask"].sum().float(), R.world)              # global response tokens
            sums = loss_step(R, rows, roll, k, n_tok)                            # teacher scores, loss, gradient
            S = dict(zip(STATS, all_reduce(torch.stack([sums[s] for s in STATS]), R.world).tolist()))
            for g in R.opt.param_groups: g["lr"] = lr_at(step, cfg)
            gnorm = clip_grad(R)                                                 # the update: clip, check, AdamW
            if not (math.isfinite(S["loss"]) and math.isfinite(gnorm)):
                raise UserError(f"step {step + 1}: non-finite loss ({S['loss'] / max(S['tokens'], 1):.4g}) or "
                                f"gradient norm ({gnorm:.4g}); stopping without saving; {on_disk(R)}")
            R.opt.step()
            R.opt.zero_grad(set_to_none=True)
            R.step = step + 1
            rec = record(R, R.step, eps, k, S, len(rows), t_roll, time.time() - t0)
            if R.eval_prompts and cfg.eval_every and (R.step % cfg.eval_every == 0 or R.step == cfg.max_steps):
                rec["eval_kl"] = evaluate(R)
            log(R, rec)
            if R.step == cfg.max_steps or (cfg.save_every and R.step % cfg.save_every == 0): save(R)
        if cfg.lora_merge and R.master: save_merged(R)      # plain weights beside the adapters, for servers
        if R.master: R.bar.write(f"trb | done at step {R.step}: {on_disk(R)}, which from_pretrained and eval.py load")
    except Done as e:
        if rank == 0: print(f"trb: {e.args[0]}", flush=True)
        return e.args[1]
    except KeyboardInterrupt:
        if R is None: raise Stopped("interrupted before training started") from None
        raise Stopped(f"interrupted after step {R.step}; {on_disk(R)}") from None
    except (MemoryError, RuntimeError) as e:  # torch's out-of-memory errors, CUDA's and the CPU allocator's
        if not isinstance(e, MemoryError) and not re.search("out of memory|can't allocate memory", str(e)): raise
        where = f"in step {R.step + 1}; {on_disk(R)}" if R is not None else "while loading"
        raise UserError(f"out of memory {where}: lower --rollout_batch_size, --micro_batch_size or --batch_size"
                        ) from None
    finally:
        if signal.getsignal(signal.SIGINT) is _interrupt: _ignore_signals()  # over: a late signal changes nothing
        if R is not None: R.bar.close()
        if lock is not None: unlock(lock, failed=R is None)
        if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
    return R.student

STATS = ("loss", "beta", "kl_mu_s", "teacher_logp", "frac_teacher", "tokens", "skd_replaced", "accepted", "t_fwd")

def batch_indices(step, n, cfg, rank, world):
    """Prompt indices of this rank at `step`: a fresh seeded permutation per epoch, a function of step alone."""
    out, per = [], cfg.batch_size // world
    for g in range(step * cfg.batch_size + rank * per, step * cfg.batch_size + (rank + 1) * per):
        epoch, i = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        out.append(int(perm[i]))
    return out

def rollout_rows(R, rows, eps, k, gen, bar=None):
    """The rollouts of `rows` (token-id lists), --rollout_batch_size rows per decoding batch (0: all of them)."""
    bs, parts = R.cfg.rollout_batch_size or len(rows), []
    policy, teacher = (R.teacher, None) if k.sft else (R.student, R.teacher)  # SFT warmup: the teacher samples
    R.student.eval()
    with whole_weights(R):
        for i in range(0, len(rows), bs):
            ids, attn = left_pad(rows[i:i + bs], R.pad_id, R.device)
            with R.amp:
                parts.append(rollout(policy, teacher, ids, attn, eps, V=R.V, eos_ids=R.eos_ids, pad_id=R.pad_id,
                                     max_new_tokens=R.cfg.max_new_tokens, temperature=k.tau, gen=gen,
                                     skd_topk=k.skd_topk, bar=bar, spec_tokens=R.cfg.spec_tokens))
    return cat_rows(parts, R.pad_id)

def cat_rows(parts, pad_id):
    """Rollout dicts of (b_i, T_i) -> one of (sum b_i, max T_i), padded as finished rows, out of inference mode."""
    T = max(p["tokens"].shape[1] for p in parts)
    pad = lambda x, v: F.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
    return {k: None if parts[0][k] is None else torch.cat([pad(p[k], pad_id if k == "tokens" else 0) for p in parts])
            for k in parts[0]}

def micro_batches(R, rows, roll):
    """(seq, attn, rollout slice) per --micro_batch_size rows: prompts re-padded, responses cut to the longest."""
    mb = R.cfg.micro_batch_size
    for i in range(0, len(rows), mb):
        r = {k: v[i:i + mb] for k, v in roll.items() if v is not None}
        T = int(r["mask"].sum(1).max())
        r, (ids, attn) = {k: v[:, :T] for k, v in r.items()}, left_pad(rows[i:i + mb], R.pad_id, R.device)
        yield torch.cat([ids, r["tokens"]], 1), torch.cat([attn, r["mask"].long()], 1), r  # (b, P+T) x 2

def grad_sync(R, last):
    """Gradients are reduced across ranks on a step's last micro-batch only (FSDP2: reduce-scattered)."""
    if R.cfg.fsdp: R.student.set_requires_gradient_sync(last)
    return R.model.no_sync() if R.world > 1 and not last and not R.cfg.fsdp else nullcontext()

def loss_step(R, rows, roll, k, n_tok):
    """Teacher scores, loss and gradient, micro-batch by micro-batch; the loss is divided by the global number of
    response tokens n_tok (design choice 7). Returns the step's sums by name (STATS)."""
    cfg, prep, eos = R.cfg, loss_prep(R.eos_ids, k.veto), R.eos_ids
    def fn(s, t, y):  # a tile's loss (the reverse KL, or the SFT warmup's NLL) and sum of log pi_T(y)
        loss = -token_logp(fold_eos(s, eos), y).sum() if k.sft else reverse_kl(*prep(s, t), cfg.loss_topk).sum()
        return torch.stack([loss, token_logp(fold_eos(t, eos), y).sum()])
    sums = {s: torch.zeros((), device=R.device) for s in STATS}
    batches = list(micro_batches(R, rows, roll))
    R.student.train()
    for j, (seq, a, r) in enumerate(batches):
        m = r["mask"]
        with torch.inference_mode(), R.amp:
            t_h, t_head = response_hidden(R.teacher, seq, a, m.shape[1])  # (b, T, H_T), design choice 8
        with grad_sync(R, j == len(batches) - 1), R.amp:
            s_h, s_head = response_hidden(R.model, seq, a, m.shape[1])    # (b, T, H_S)
            loss, t_lp = fused_loss(s_h[m], t_h[m], (s_head, t_head), R.V, fn, r["tokens"][m], tile=cfg.loss_chunk)
            (loss * R.world / n_tok).backward()
        for name, x in (("loss", loss.detach()), ("beta", r["beta"].sum()), ("kl_mu_s", r["kl"].sum()),
                        ("teacher_logp", t_lp.detach()), ("frac_teacher", ((r["beta"] == 1) & m).sum()),
                        ("tokens", m.sum()), ("skd_replaced", r["replaced"].sum()), ("accepted", r["accepted"].sum()),
                        ("t_fwd", r["t_fwd"].sum())):
            sums[name] += x.float()
    return sums

def clip_grad(R):
    """Clips the gradient norm to --grad_clip (0: no clipping) and returns the norm before clipping."""
    clip = R.cfg.grad_clip if R.cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(R.student.parameters(), clip)  # works on FSDP2's sharded DTensors too
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

def evaluate(R):
    """Held-out objective: mean full-vocab reverse KL per token on pure student rollouts; every rank its shard."""
    cfg, tot, prep = R.cfg, torch.zeros(2, device=R.device), loss_prep(R.eos_ids)  # (sum of KL, tokens)
    gen = torch.Generator(device=R.device).manual_seed(cfg.seed + 10_000 + R.rank)
    mine = R.eval_prompts[R.rank::R.world]
    bs = cfg.rollout_batch_size or max(len(mine), 1)
    with tqdm(total=-(-len(mine) // bs) * cfg.max_new_tokens, desc="eval_kl (decoding steps)", leave=False,
              disable=not (R.master and sys.stderr.isatty()), dynamic_ncols=True) as bar:  # the master's terminal
        for i in range(0, len(mine), bs):
            roll = rollout_rows(R, mine[i:i + bs], 0.0, Knobs(False, 0, 0.0, cfg.temperature), gen, bar)
            with whole_weights(R), torch.inference_mode(), R.amp:  # FSDP2: gathered once for all micro-batches
                for seq, a, r in micro_batches(R, mine[i:i + bs], roll):
                    m = r["mask"]
                    (hs, sh), (ht, th) = (response_hidden(x, seq, a, m.shape[1]) for x in (R.student, R.teacher))
                    tot[0] += fused_loss(hs[m], ht[m], (sh, th), R.V, lambda s, t: reverse_kl(*prep(s, t)).sum(),
                                         tile=cfg.loss_chunk)
                    tot[1] += m.sum()
    all_reduce(tot, R.world)
    return (tot[0] / tot[1].clamp(min=1)).item()

def record(R, step, eps, k, S, n_rows, t_roll, dt):
    """The step's metrics record, by name, from the all-reduced sums S."""
    cfg, n = R.cfg, max(S["tokens"], 1.0)
    rec = dict(step=step, loss=S["loss"] / n, eps=eps, beta=S["beta"] / n, frac_teacher=S["frac_teacher"] / n,
               kl_mu_s=S["kl_mu_s"] / n, teacher_logp=S["teacher_logp"] / n, resp_len=S["tokens"] / (n_rows * R.world),
               tok_per_s=S["tokens"] / t_roll, dt=dt, lr=lr_at(step - 1, cfg), temperature=k.tau)
    if cfg.skd_topk: rec["skd_rate"] = S["skd_replaced"] / n
    if cfg.spec_tokens: rec.update(t_fwd=S["t_fwd"] / n, **dict(accept=S["accepted"] / n) if eps > 0 else {})
    if cfg.veto_beta: rec["veto_b"] = k.veto
    if cfg.sft_warmup_steps: rec["sft"] = k.sft
    return rec

LOG_FMT = dict(loss=".4f", eps=".4g", beta=".3f", frac_teacher=".3f", kl_mu_s=".4g", teacher_logp=".3f",
               resp_len=".1f", tok_per_s=".1f", dt=".2f", eval_kl=".4f", skd_rate=".4f", accept=".3f", t_fwd=".3f")

def log_line(rec):
    return f"step {rec['step']:5d} | " + " | ".join(f"{k} {rec[k]:{f}}" for k, f in LOG_FMT.items() if k in rec)

def log(R, rec):
    """One line on stdout and one JSON line in metrics.jsonl (and wandb), from the master; each checkpoint keeps the
    lines up to its step (a replaced run's metrics.jsonl stays until this run's first checkpoint is in place)."""
    if not R.master: return
    if rec["step"] > R.bar.n: R.bar.update(rec["step"] - R.bar.n)
    R.bar.write(log_line(rec))
    R.history.append(json.dumps(rec) + "\n")
    try:
        if not R.replacing:
            with open(os.path.join(R.cfg.out_dir, METRICS), "a") as f: f.write(R.history[-1])
    except OSError as e:  # out_dir removed, a read-only file, a full disk
        raise UserError(f"step {rec['step']}: cannot write {METRICS} ({e.strerror}); {on_disk(R)}; stopping") from None
    if R.wandb: R.wandb.log(rec, step=rec["step"])

def save(R):
    """Checkpoints the step to out_dir/checkpoint-N with the full EOS set, after checking the weights (design choice
    11); then the older checkpoints keep their weights only, at most --save_total_limit of them. A failed save
    leaves the previous checkpoint as it was."""
    sd = None
    if R.cfg.fsdp:  # FSDP2: the full weights, gathered to the master's CPU (every rank takes part)
        from torch.distributed.checkpoint.state_dict import StateDictOptions as Opts, get_model_state_dict
        sd = get_model_state_dict(R.student, options=Opts(full_state_dict=True, cpu_offload=True))
    d = os.path.join(R.cfg.out_dir, f"checkpoint-{R.step}")
    if R.master:
        params = sd.values() if sd is not None else R.student.parameters()
        if not bool(torch.stack([p.isfinite().all() for p in params]).all()):
            raise UserError(f"step {R.step}: non-finite weights after AdamW; stopping without saving; {on_disk(R)}")
        if R.student.generation_config is not None:  # eval.py, generate() and vLLM stop where training did
            R.student.generation_config.eos_token_id = list(R.eos_ids)
        shutil.rmtree(d + TMP, ignore_errors=True)
    try:
        if R.cfg.fsdp:                                       # every rank writes its shard of AdamW
            if R.master: os.makedirs(d + TMP)
            barrier(R.world)
            sharded_optimizer(R.student, R.opt, d + TMP)
            barrier(R.world)
        if R.master:
            state = dict(step=R.step, config=dataclasses.asdict(R.cfg), world=R.world, run=R.run, history=R.history,
                         rng=dict(torch=torch.get_rng_state(), python=random.getstate()))
            old = [p for _, p in checkpoints(R.cfg.out_dir)] if R.replacing else []  # the run this one replaces
            save_checkpoint(d, R.student, R.tok, state, None if R.cfg.fsdp else R.opt.state_dict(), sd, old)
            replaced, R.replacing = R.replacing, False
            if replaced: write_lines(os.path.join(R.cfg.out_dir, METRICS), R.history)  # the replaced run's go
            prune(R.cfg.out_dir, R.cfg.save_total_limit)
    except Exception as e:  # a full disk, a quota, a failed rename
        shutil.rmtree(d + TMP, ignore_errors=True)
        raise UserError(f"step {R.step}: saving the checkpoint failed ({_short(e)}); {on_disk(R)}; "
                        f"stopping") from None
    barrier(R.world)

# ---------------------------------------------------------------------------------------------------------------------
# plumbing: command line and checks

def main(argv=None):
    keep_freed_memory()
    quiet_progress_bars()
    sigs = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    old = {s: signal.signal(s, _interrupt) for s in sigs}   # SIGTERM stops like Ctrl-C
    try:
        train(*parse_args(argv))
    except KeyboardInterrupt:
        raise SystemExit("trb: interrupted before training started") from None
    except Stopped as e:
        raise SystemExit(f"trb: {e}")
    except UserError as e:
        raise SystemExit(f"trb: error: {e}")
    finally:
        for s, h in old.items(): signal.signal(s, h)

def _bool(s):
    if s.lower() in ("1", "true", "yes"): return True
    if s.lower() in ("0", "false", "no"): return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")

def config_help(cls):
    """[(group, [(field, help)])] from the comments of cls's source, so that they are the --help text."""
    groups = [("options", [])]
    for line in inspect.getsource(cls).splitlines()[2:]:
        code, _, comment = line.partition("  # ")
        indent = len(line) - len(line.lstrip())
        if code.strip() and ":" in code: groups[-1][1].append((code.split(":")[0].strip(), comment.strip()))
        elif line.strip().startswith("#") and indent <= 4: groups.append((line.strip("# "), []))
        elif line.strip().startswith("#"):  # a field's help, continued
            name, h = groups[-1][1][-1]
            groups[-1][1][-1] = (name, h + " " + line.strip("# "))
    return [g for g in groups if g[1]]

def parse_config(cls, argv=None, description=""):
    """cls from the command line, each field a --flag whose help is its comment. Returns (cfg, the flags given)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.error = lambda msg: p.exit(2, f"{os.path.splitext(p.prog)[0]}: error: {msg} (--help lists the flags)\n")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for title, names in config_help(cls):
        g = p.add_argument_group(title)
        for name, h in names:
            f = fields[name]
            if f.type is bool: kw = dict(type=_bool, nargs="?", const=True, metavar="BOOL")  # `--flag` alone: true
            elif f.type is list: kw = dict(nargs="*", metavar="PATH")
            else: kw = dict(type=f.type, metavar=f.type.__name__.upper())
            default = f.default_factory() if f.type is list else f.default
            shown = repr(default) if isinstance(default, str) else default
            g.add_argument(f"--{name}", default=default, help=f"{h} (default: {shown})".replace("%", "%%"), **kw)
    cfg = cls(**vars(p.parse_args(argv)))
    given = {n for n in fields if any(a == f"--{n}" or a.startswith(f"--{n}=") for a in argv)}
    return cfg, given

def parse_args(argv=None):
    return parse_config(Config, argv, "TRB on-policy distillation (arXiv 2605.31159); every flag is a field of "
                                      "trb.Config")

def check_start(cfg, student, teacher, tokenizer):
    """The checks before anything runs (on --resume, check_config waits for the checkpoint's config). Returns cfg,
    local paths absolute, and the models passed to train(), if any (tokenizer: one, or a student's, teacher's pair)."""
    if not isinstance(cfg, Config): raise UserError(f"train(): cfg must be a trb.Config, got {type(cfg).__name__}")
    check_types(dataclasses.asdict(cfg), "train(): cfg")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in out_dir, --overwrite replaces it: pass one of them")
    if not 0 <= cfg.seed < 2**32: raise UserError(f"--seed must be in [0, 2^32), got {cfg.seed}")  # init_runtime's
    check_text(cfg.out_dir, "--out_dir")                     # a path of bytes that are not UTF-8: safetensors fails
    if not cfg.resume: check_config(cfg)
    local = {k: os.path.abspath(v) for k, is_it in (("student", os.path.isdir), ("teacher", os.path.isdir),
             ("data", os.path.isfile), ("eval_data", os.path.isfile)) if (v := getattr(cfg, k)) and is_it(v)}
    cfg = dataclasses.replace(cfg, **local)                  # local paths absolute: --resume works from anywhere
    if student is None and teacher is None and tokenizer is None: return cfg, None
    if student is None or teacher is None or tokenizer is None:
        raise UserError("train(): pass student, teacher and tokenizer together (or none, to load cfg's paths)")
    if cfg.fsdp or not (hasattr(student, "save_pretrained") and is_lm(student)) or student is teacher:
        raise UserError("train(): the student passed in must be a transformers causal LM (save_pretrained) of its "
                        "own, not the teacher, and --fsdp is for students loaded from a path")
    if not is_lm(teacher):
        raise UserError(f"train(): teacher must be a loaded causal LM, not a {type(teacher).__name__}")
    if len(set((getattr(teacher, "hf_device_map", None) or {}).values())) > 1:
        raise UserError("train(): a teacher dispatched over several devices (device_map) is not supported: train() "
                        "runs both models on cfg.device")
    toks = tuple(tokenizer) if isinstance(tokenizer, (tuple, list)) else (tokenizer, tokenizer)
    if len(toks) != 2 or not all(callable(getattr(t, "convert_ids_to_tokens", None)) for t in toks):
        raise UserError(f"train(): tokenizer must be a loaded tokenizer or a (student's, teacher's) pair, not a "
                        f"{type(tokenizer).__name__}" + (f" of {len(toks)}" if len(toks) != 2 else ""))
    if any(p.dtype != torch.float32 for p in student.parameters() if p.requires_grad):
        raise UserError("train(): pass the student in float32, its master weights (bf16 compute is autocast's)")
    if hasattr(student, "peft_config") and cfg.lora_r:
        raise UserError("train(): the student passed in is a PEFT model already: its own adapters train; "
                        "leave cfg.lora_r at 0")
    return cfg, SimpleNamespace(student=student, teacher=teacher, tok=toks[0], t_tok=toks[1])

def check_types(values, where):
    """Config values of the declared types (an int for a float too): a trb.Config built in code, or a checkpoint's."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for k, v in values.items():
        t = fields.get(k)
        if t is not None and not (type(v) is t or (t is float and type(v) is int)):
            raise UserError(f"{where}: {k} is {v!r}, not of type {t.__name__}")

def check_config(c):
    for name in ("batch_size", "micro_batch_size", "n_samples", "max_new_tokens", "max_steps", "max_prompt_len"):
        if not 1 <= (x := getattr(c, name)) <= 2**40: raise UserError(f"--{name} must be >= 1 and <= 2^40, got {x}")
    for name in ("eps0", "warmup_steps", "temperature", "lr", "lr_warmup_steps", "loss_topk", "eval_every",
                 "save_every", "eval_prompts", "skd_topk", "skd_steps", "veto_beta", "temp_warmup", "sft_warmup_steps",
                 "loss_chunk", "weight_decay", "grad_clip", "rollout_batch_size", "lora_r", "lora_alpha",
                 "save_total_limit"):
        x = getattr(c, name)
        if not x >= 0: raise UserError(f"--{name} must be >= 0, got {x}")  # `not >=` also catches NaN
        if isinstance(x, float) and not math.isfinite(x) or x > 2**40:
            raise UserError(f"--{name} must be finite and <= 2^40, got {x}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(c, name) < 1: raise UserError(f"--{name} must be in [0, 1), got {getattr(c, name)}")
    for name in ("temperature", "temp_warmup"):  # logits / tau overflow float32 below MIN_TAU: NaN samples
        x = getattr(c, name)
        if 0 < x < MIN_TAU: raise UserError(f"--{name} must be 0 or >= {MIN_TAU}, got {x}")
    if c.batch_size * c.n_samples > 2**20:
        raise UserError(f"--batch_size x --n_samples is {c.batch_size * c.n_samples} rows a step; at most 2^20")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    if c.dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"--dtype must be auto, bfloat16 or float32, got {c.dtype!r}")
    if c.schedule not in ("linear", "constant"):
        raise UserError(f"--schedule must be linear or constant, got {c.schedule!r}")
    if (c.skd_topk > 0) != (c.skd_steps > 0): raise UserError("--skd_topk and --skd_steps go together")
    on = [n for n in ("skd_topk", "veto_beta", "temp_warmup", "sft_warmup_steps") if getattr(c, n) > 0]
    if len(on) > 1: raise UserError(f"--{on[0]} and --{on[1]} are different warmups: use one at a time")
    if c.spec_tokens < -1: raise UserError(f"--spec_tokens must be -1 (auto) or >= 0, got {c.spec_tokens}")
    if c.skd_topk and c.spec_tokens not in (0, Config.spec_tokens):  # SKD keeps the lock-step loop
        raise UserError("--spec_tokens speeds up TRB's blend; SKD keeps the lock-step loop")
    if on and c.eps0 > 0: raise UserError(f"--{on[0]} is a warmup of its own, not a TRB option: use it with --eps0 0")
    if c.schedule == "constant" and c.eps0 == 0: raise UserError("--schedule constant needs --eps0 > 0")
    if not c.out_dir: raise UserError("--out_dir must not be empty")
    check_text(c.system_prompt, "--system_prompt")
    if not 0 <= c.seed < 2**32: raise UserError(f"--seed must be in [0, 2^32), got {c.seed}")
    if c.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb_project needs wandb: pip install wandb")
    check_lora(c)

def check_lora(c):
    if not 0 <= c.lora_dropout < 1: raise UserError(f"--lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if c.lora_r == 0:
        for k in ("lora_alpha", "lora_dropout", "lora_targets", "lora_merge"):
            if getattr(c, k) != getattr(Config, k): raise UserError(f"--{k} needs --lora_r > 0")
        return
    if importlib.util.find_spec("peft") is None: raise UserError("--lora_r needs peft: pip install peft")
    if c.lora_alpha == 0: raise UserError("--lora_alpha must be > 0")
    if not all(lora_targets(c)): raise UserError(f"--lora_targets {c.lora_targets!r} holds an empty name")
    if c.fsdp: raise UserError("--fsdp with --lora_r is not supported: FSDP2 pays off by sharding gradients and AdamW "
                               "state, which LoRA already shrinks to the adapters; use DDP (no --fsdp)")

# ---------------------------------------------------------------------------------------------------------------------
# plumbing: runtime and setup

def init_runtime(cfg):
    """Returns (rank, world, device, autocast dtype). Under torchrun, one process per GPU."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if cfg.fsdp and not ddp:
        raise UserError("--fsdp runs under torchrun: torchrun --nproc_per_node N trb.py --fsdp ... (N = 1 works)")
    dev = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and int(dev[5:] or 0) >= torch.cuda.device_count():  # none, or not that one
        raise UserError(f"--device {dev}: no such CUDA device here ({torch.cuda.device_count()} found)")
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if dev.startswith("cuda"):
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if dev.startswith("cuda") else "float32")
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    return rank, world, torch.device(dev), getattr(torch, dtype)

def setup(cfg, given, rank, world, device, amp_dtype, models=None):
    """Checkpoint, tokenizers, data, models and optimizer, the cheap checks first: no model loads before the flags,
    out_dir and data are known to be good. models: the student, teacher and tokenizer passed to train()."""
    master, state, changed, done, ckpt = rank == 0, None, [], False, None
    replacing = claim_out_dir(cfg) if master else False      # tidies what a kill left; refuses a run in the way
    barrier(world)
    if cfg.resume:  # the newest checkpoint, which alone holds the optimizer state
        cks = checkpoints(cfg.out_dir)
        if not cks: raise UserError(f"--resume: no checkpoint in {cfg.out_dir}; --overwrite starts over")
        ckpt = cks[-1][1]
        state = load_state(ckpt)
        if not any(os.path.exists(os.path.join(ckpt, f)) for f in ("optimizer.pt", "optimizer")):  # FSDP2: a folder
            raise UserError(f"--resume: {ckpt}, the newest checkpoint, holds no optimizer state (optimizer.pt), which "
                            f"resuming needs: start a new run from its weights with --student {ckpt}")
        given = given if given is not None else {f.name for f in dataclasses.fields(Config)
                                                 if getattr(cfg, f.name) != getattr(Config(), f.name)}
        cfg, changed = resume_config(cfg, given, state)
        check_config(cfg)
        if master:  # metrics.jsonl from the checkpoint's lines; a cut-off save's pruning, at the run's own limit
            write_lines(os.path.join(cfg.out_dir, METRICS), state["history"])
            prune(cfg.out_dir, state["config"].get("save_total_limit", 0))
        done = state["step"] >= cfg.max_steps and (  # a finished run: one line, exit 0
            f"nothing to do: the run in {cfg.out_dir} is at step {state['step']} and --max_steps is "
            f"{cfg.max_steps}; pass --max_steps above {state['step']} to continue it")
        if done and not models: raise Done(done, None)       # no model to load (a student passed in gets its weights)
    if cfg.batch_size % world: raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {world} ranks")
    if cfg.spec_tokens < 0: cfg = dataclasses.replace(cfg, spec_tokens=4 if device.type == "cuda" else 0)  # auto
    if cfg.fsdp and not torch.distributed.is_initialized(): raise UserError("an --fsdp run resumes under torchrun")
    if models: tok, t_tok = models.tok, models.t_tok
    else: tok, t_tok = (load_tokenizer(p, cfg.trust_remote_code, w) for p, w in (
        (ckpt or cfg.student, "student"), (cfg.teacher, "teacher")))
    V = shared_vocab(tok, t_tok)
    for name in ("loss_topk", "skd_topk"):
        if getattr(cfg, name) > V: raise UserError(f"--{name} {getattr(cfg, name)} is larger than the {V}-token vocab")
    prompts, skipped = encode_prompts(tok, load_prompts(cfg.data, cfg.prompt_field, "--data"), cfg, "--data")
    evals, e_skipped = encode_prompts(tok, load_prompts(cfg.eval_data, cfg.prompt_field, "--eval_data"), cfg,
                                      "--eval_data") if cfg.eval_data else ([], 0)
    n = max(map(len, prompts + evals)) + cfg.max_new_tokens  # positions the longest rollout needs
    if (top := max(map(max, prompts + evals))) >= V:         # the teacher reads the same ids
        raise UserError(f"the prompts hold token id {top} ({tok.convert_ids_to_tokens(top)}), beyond the shared "
                        f"{V}-token vocabulary: the teacher's tokenizer lacks it (a chat token of the student's only?)")
    student, teacher = load_pair(cfg, ckpt, models, device, amp_dtype, n)
    if done: raise Done(done, student)
    for who, m in (("student", student), ("teacher", teacher)):  # at least the V logits they are sliced to
        if (n := m.get_output_embeddings().weight.shape[0]) < V:
            raise UserError(f"{who} has {n} output logits, fewer than the {V}-token vocabulary")
    eos_all = eos_ids_of((tok, student), (t_tok, teacher))
    eos_ids = [i for i in eos_all if i < V]                  # one beyond V (a chat token of one tokenizer): dropped
    if not eos_ids: raise UserError(f"no EOS id of the models is in the shared {V}-token vocabulary: {eos_all}")
    if cfg.fsdp: shard(student, device, amp_dtype)           # FSDP2: the student is sharded in place
    ids = [device.index] if device.index is not None else None
    model = torch.nn.parallel.DistributedDataParallel(student, ids) if world > 1 and not cfg.fsdp else student
    trained = [p for p in student.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
    if not trained: raise UserError("the student has no weight that requires grad: nothing would train")
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda"))  # one kernel for all
    if state is not None: load_trainer_state(student, opt, state, cfg, ckpt)
    step, run = (state["step"], state.get("run")) if state else (0, os.urandom(6).hex())  # run: names the run
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()  # CPU too
    pad = tok.pad_token_id if tok.pad_token_id is not None and tok.pad_token_id < V else eos_ids[0]  # teacher's too
    R = SimpleNamespace(cfg=cfg, rank=rank, world=world, master=master, device=device, amp=amp, tok=tok, V=V,
                        eos_ids=eos_ids, pad_id=pad, prompts=prompts, eval_prompts=evals[:cfg.eval_prompts],
                        student=student, teacher=teacher, model=model, opt=opt, step=step, bar=None, wandb=None,
                        replacing=replacing, run=run, history=list(state["history"]) if state else [])
    if master:
        ev = f" eval_prompts={len(R.eval_prompts)} eval_skipped_long={e_skipped}" if cfg.eval_data else ""
        print(f"trb | V={V} eos={eos_ids} prompts={len(prompts)} skipped_long={skipped}{ev} world={world} "
              f"device={device} dtype={amp_dtype} spec_tokens={cfg.spec_tokens}".replace("torch.", ""), flush=True)
        for i in [i for i in eos_all if i >= V]:             # a stop id the models cannot emit: said, not silent
            print(f"trb | EOS id {i} ({max(tok, t_tok, key=len).convert_ids_to_tokens(i)}) is beyond the shared "
                  f"{V}-token vocabulary: dropped from the EOS set, never sampled")
        if replacing: print(f"trb | --overwrite: the run in {cfg.out_dir} is replaced at this run's first save")
        if changed: print(f"trb | resume from step {step}: " + ", ".join(changed), flush=True)
        if cfg.wandb_project:
            R.wandb = importlib.import_module("wandb")
            R.wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    R.bar = tqdm(total=cfg.max_steps, initial=step, disable=not (master and sys.stderr.isatty()), dynamic_ncols=True)
    return R

def load_pair(cfg, ckpt, models, device, amp_dtype, n):
    """The student (fp32 master weights; with --lora_r, with fresh adapters or the checkpoint ckpt's) and the frozen
    teacher, loaded (the student from ckpt on --resume) or passed to train(); n positions must fit both."""
    s_path = ckpt if ckpt and not cfg.lora_r else cfg.student  # LoRA: the checkpoint holds adapters
    student, teacher = (models.student, models.teacher) if models else (s_path, cfg.teacher)
    check_positions(n, cfg, head=True, student=student, teacher=teacher)
    if cfg.lora_r: check_lora_targets(cfg, student)
    if models: student, teacher = student.to(device), teacher.to(device)
    else:
        student = load_model(s_path, torch.float32, device, cfg.trust_remote_code, "student")
        teacher = load_model(cfg.teacher, amp_dtype, device, cfg.trust_remote_code, "teacher")
    teacher.eval().requires_grad_(False)
    if models and ckpt and not cfg.lora_r: load_weights(student, ckpt, cfg)  # --resume: in place
    if cfg.grad_ckpt: enable_grad_ckpt(student)
    if cfg.lora_r: student = with_lora(student, cfg, ckpt)
    return student, teacher

def with_lora(student, cfg, resume_from=None):
    """The student wrapped by PEFT, with fresh LoRA adapters (B = 0: the same function) or a checkpoint's; only they
    train. Their config names the base by its absolute path, where from_pretrained finds it."""
    import peft
    targets = lora_targets(cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls names transformers has deprecated
            if resume_from is not None: m = peft.PeftModel.from_pretrained(student, resume_from, is_trainable=True)
            else: m = peft.get_peft_model(student, peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, task_type=
                                          "CAUSAL_LM", lora_dropout=cfg.lora_dropout, target_modules=targets))
    except Exception as e:  # NoMatchingPeftModuleError (a ValueError), missing or corrupt adapter files
        what = f"--lora_targets {cfg.lora_targets!r}" if resume_from is None else f"the adapters in {resume_from!r}"
        raise UserError(f"{what}: {' '.join(str(e).split())[:160]}") from None
    base = getattr(student, "name_or_path", "") or cfg.student
    m.peft_config["default"].base_model_name_or_path = os.path.abspath(base) if os.path.isdir(base) else base
    if resume_from is None: return m
    from safetensors.torch import load_file
    saved, have = load_file(os.path.join(resume_from, "adapter_model.safetensors")), peft.get_peft_model_state_dict(m)
    if saved.keys() != have.keys():
        raise UserError(f"--resume: the adapters in {resume_from!r} do not fit the student ({len(saved)} saved, "
                        f"{len(have)} expected)")
    return m

def check_lora_targets(cfg, student):
    """--lora_targets must name modules of the student, each of them: tried on a weightless copy (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    c = student.config if hasattr(student, "config") else AutoConfig.from_pretrained(student, trust_remote_code=
                                                                                     cfg.trust_remote_code)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c, trust_remote_code=cfg.trust_remote_code)
        names = [n for n, _ in m.named_modules()]
        for t in [] if cfg.lora_targets == "all-linear" else lora_targets(cfg):
            if not any(n == t or n.endswith("." + t) for n in names):
                raise UserError(f"--lora_targets: {t!r} names no module of the student")
        with_lora(m, cfg)

def lora_targets(cfg):
    """PEFT's target_modules: "all-linear", or the comma-separated names."""
    return cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]

def save_merged(R):
    """--lora_merge: the student with its adapters merged in, as plain weights, in the last checkpoint's merged/."""
    d = os.path.join(R.cfg.out_dir, f"checkpoint-{R.step}", "merged")
    merged = copy.deepcopy(R.student).merge_and_unload()
    merged.generation_config.eos_token_id = list(R.eos_ids)
    try:
        shutil.rmtree(d + TMP, ignore_errors=True)
        merged.save_pretrained(d + TMP, safe_serialization=True)
        R.tok.save_pretrained(d + TMP)
        os.replace(d + TMP, d)
    except OSError as e:
        shutil.rmtree(d + TMP, ignore_errors=True)
        raise UserError(f"--lora_merge: writing {d} failed ({e.strerror}); {on_disk(R)}") from None

def enable_grad_ckpt(m):
    kw = {"use_reentrant": False}
    if hasattr(m, "activation_checkpointing_enable"):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else: m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)  # transformers before 5.2x

def resume_config(cfg, given, state):
    """The checkpoint's config with the flags given again taking over (out_dir, device and dtype always), and what
    changed. The student is the checkpoint's: another --student is refused."""
    here = {"out_dir", "resume", "overwrite", "device", "dtype"}
    old = Config(**{"spec_tokens": 0, **{k: v for k, v in state["config"].items() if k in Config.__dataclass_fields__}})
    new = dataclasses.replace(old, **{k: getattr(cfg, k) for k in set(given) | here})
    same = new.student == old.student or (os.path.isdir(new.student) and os.path.isdir(old.student) and
                                          os.path.samefile(new.student, old.student))
    if not same and not old.lora_r:  # with LoRA, --student is the base under the adapters: it may have moved
        raise UserError(f"--resume trains the student saved in out_dir (the run began from {old.student!r}); "
                        f"--student cannot change: start a new run in another --out_dir for {new.student!r}")
    for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "fsdp"):  # how the state is saved
        if getattr(new, k) != getattr(old, k):
            raise UserError(f"--resume: --{k} cannot change (the run began with {getattr(old, k)}" +
                            ("; 0 is full fine-tuning)" if k == "lora_r" else ")"))
    return new, [f"--{k} {getattr(old, k)} -> {getattr(new, k)}" for k in sorted(given)
                 if k not in here and getattr(old, k) != getattr(new, k)]

def keep_freed_memory():
    """On glibc, freed (B, V) buffers go back to the OS and fault in again at the next decoding step (a CPU TRB step
    up to 1.5x slower, bench.py): keep them in the heap. A no-op where libc is not glibc."""
    with suppress(OSError, AttributeError):                  # no glibc
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)                           # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)                          # M_TRIM_THRESHOLD

def all_reduce(x, world):
    if world > 1: torch.distributed.all_reduce(x)
    return x

def barrier(world):
    if world > 1: torch.distributed.barrier()

# ---------------------------------------------------------------------------------------------------------------------
# plumbing: models, tokenizers, prompts

def _check_path(path, what="model"):
    """A local directory, or something shaped like a hub name (owner/model) while the hub is in reach."""
    if os.path.isdir(path): return
    if os.path.exists(path): raise UserError(f"{what} {path!r} is a file: expected a model directory or a hub name")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) or path.startswith("."):
        raise UserError(f"{what} {path!r}: no such directory, and not a hub name owner/model")
    need_hub(path, what)

def need_hub(name, what):
    """Fails fast where a hub name is asked for and the hub is out of reach (from_pretrained retries for a minute):
    one TCP connect of 3 s at most, skipped offline (HF_HUB_OFFLINE) or behind a proxy."""
    import socket
    from urllib.parse import urlparse
    env = os.environ
    if env.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or any(
            env.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urlparse(env.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise UserError(f"{what} {name!r} is a hub name, and the hub ({host}) cannot be reached: pass a local "
                        f"path instead, or set HF_HUB_OFFLINE=1 to use a copy in the local cache") from None

def quiet_progress_bars():
    """No progress bars of transformers and the hub (loading and writing weights) in a log file or a pipe."""
    if sys.stderr.isatty(): return
    import huggingface_hub.utils
    import transformers.utils.logging
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()

def load_model(path, dtype, device, trust_remote_code=False, what="model"):
    """from_pretrained, refusing weights that do not match the model (they would be left at random init)."""
    from transformers import AutoModelForCausalLM
    _check_path(path, what)
    base = _adapter_base(path)
    if base is not None and not os.path.isdir(base) and (os.path.isabs(base) or base.startswith(".")):
        raise UserError(f"{what} {path!r} holds LoRA adapters whose base model {base!r} is not there (moved?): "
                        f"resume with --student NEW_PATH, or edit base_model_name_or_path in its adapter_config.json")
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()                            # its load report: mismatches are one line of ours
    try:
        m, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    except Exception as e:  # missing files, corrupt safetensors, no network: one line, not a traceback
        raise UserError(f"cannot load {what} {path!r}: {_short(e)}") from None
    finally:
        logging.set_verbosity(level)
    bad = [f"{len(v)} {k.split('_')[0]} ({', '.join(sorted(v)[:3])}{', ...' * (len(v) > 3)})"
           for k in ("missing_keys", "unexpected_keys") if (v := info.get(k))]
    if bad: raise UserError(f"{what} {path!r}: its weights do not match its config: " + "; ".join(bad))
    if os.path.isfile(os.path.join(path, "generation_config.json")) and m.can_generate():  # its EOS set
        from transformers import GenerationConfig
        try:
            gc = GenerationConfig.from_pretrained(path)
        except Exception as e:
            raise UserError(f"{what} {path!r}: its generation_config.json is unreadable ({_short(e)})") from None
        if os.path.isfile(os.path.join(path, "adapter_config.json")): m.generation_config = gc  # LoRA: not the base's
    return m.to(device)

def _adapter_base(path):
    """The base model a LoRA checkpoint names (adapter_config.json), or None."""
    with suppress(OSError, ValueError, AttributeError), open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f).get("base_model_name_or_path")  # else None: no file, or not a JSON object

def check_positions(n, cfg, head=False, **models):
    """The longest prompt plus --max_new_tokens (n) must fit each model's positions, and with head=True its logits
    be its output head's (check_head): read from the configs, before any model loads."""
    from transformers import AutoConfig
    for who, m in models.items():
        try:
            c = m.config if hasattr(m, "config") else AutoConfig.from_pretrained(m, trust_remote_code=
                                                                                 cfg.trust_remote_code)
            c = c.get_text_config()
        except Exception as e:
            raise UserError(f"cannot load the {who}'s config {m!r}: {_short(e)}") from None
        if head: check_head(c, f"the {who} ({type(c).__name__})")
        m = getattr(c, "max_position_embeddings", None)
        if isinstance(m, int) and n > m:
            raise UserError(f"the longest prompt plus --max_new_tokens {cfg.max_new_tokens} is {n} tokens, beyond the "
                            f"{who}'s {m} positions (max_position_embeddings)")

def load_tokenizer(path, trust_remote_code=False, what="model"):
    from transformers import AutoTokenizer
    _check_path(path, what)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load tokenizer {path!r}: {_short(e)}") from None

def load_weights(student, ckpt, cfg):
    """--resume of a student passed to train(): the weights of the checkpoint ckpt (a PEFT student's: its adapters),
    loaded into it in place."""
    if hasattr(student, "peft_config"):
        import peft
        from safetensors.torch import load_file
        path = os.path.join(ckpt, "adapter_model.safetensors")
        saved = load_file(path) if os.path.isfile(path) else {}
        res = peft.set_peft_model_state_dict(student, saved)
        missing, unexpected = set(peft.get_peft_model_state_dict(student)) - set(saved), res.unexpected_keys
    else:
        m = load_model(ckpt, torch.float32, "cpu", cfg.trust_remote_code, "checkpoint")
        missing, unexpected = student.load_state_dict(m.state_dict(), strict=False)
    if missing or unexpected:
        raise UserError(f"--resume: the checkpoint {ckpt} does not fit the student passed in "
                        f"({len(missing)} missing, {len(unexpected)} unexpected weights)")

def encode_prompts(tok, prompts, cfg, what="--data"):
    """Token ids of the prompts within --max_prompt_len, and how many were skipped; all skipped is an error."""
    enc, skipped = [], 0
    for q in prompts:
        ids = format_prompt(tok, q, cfg.system_prompt)
        if len(ids) > cfg.max_prompt_len: skipped += 1
        else: enc.append(ids)
    if not enc: raise UserError(f"{what}: all {skipped} prompts are longer than --max_prompt_len {cfg.max_prompt_len}")
    return enc, skipped

HUB_DATA = {  # name -> (load_dataset args, prompt field)
    "gsm8k": (("openai/gsm8k", "main"), "question"),
    "math": (("DigitalLearningGmbH/MATH-lighteval",), "problem"),  # the 7.5k MATH train split
}

def read_json_records(path, what="data"):
    """Records of a local .jsonl or .json file (a list of objects, or one object per line); bad input is one line."""
    try:
        with open(path, "rb") as f: raw = f.read()
    except OSError as e:
        raise UserError(f"{what} {path!r}: cannot read it ({e.strerror})") from None
    if not raw: raise UserError(f"{what} {path!r} is empty")
    try:
        text = raw.decode("utf-8-sig")                      # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path!r} is not UTF-8 text (byte {e.start})") from None
    try:
        recs = json.loads(text)
        recs = recs if isinstance(recs, list) else [recs]
    except json.JSONDecodeError:
        recs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip(): continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i}: not valid JSON") from None
    for i, r in enumerate(recs, 1):
        if not isinstance(r, dict): raise UserError(f"{what} {path!r}, record {i}: not a JSON object: {str(r)[:40]!r}")
    return recs

def load_records(data, split="train", what="--data"):
    """Records and the prompt field of a hub name (HUB_DATA) or of a local .jsonl, .json or .parquet file."""
    if data in HUB_DATA:
        need_hub(HUB_DATA[data][0][0], what)
        args, field, kw = (*HUB_DATA[data], dict(split=split))
    else:
        if not os.path.isfile(data):
            raise UserError(f"{what} {data!r}: " + ("not a file: expected a .jsonl, .json or .parquet file" if
                            os.path.exists(data) else f"no such file, and not one of {sorted(HUB_DATA)}"))
        ext = data.rsplit(".", 1)[-1].lower()
        if ext not in ("jsonl", "json", "parquet"):
            raise UserError(f"{what} {data!r}: expected .jsonl, .json or .parquet")
        if ext != "parquet": return read_json_records(data, what), None
        args, field, kw = ("parquet",), None, dict(data_files=data, split="train")
    import datasets
    if not sys.stderr.isatty(): datasets.disable_progress_bars()  # no bars, no info lines in a log file
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error lines too: a failure is our one line
    try:
        return list(datasets.load_dataset(*args, **kw)), field
    except Exception as e:  # no network, parse errors: datasets raises many types
        raise UserError(f"cannot read {data!r}: {_short(e)}") from None

def load_prompts(data, field="", what="--data"):
    """Prompt strings from a hub name or local file, the field auto-detected; refuses records without one."""
    recs, hub_field = load_records(data, "test" if what == "--eval_data" else "train", what)  # held out: test split
    if not recs: raise UserError(f"{what} {data!r} is empty")
    field = field or hub_field or next((f for f in ("question", "problem", "prompt") if f in recs[0]), None)
    if field is None or field not in recs[0]:
        raise UserError(f"{what} {data!r} has no prompt field {field or '(question|problem|prompt)'}; "
                        f"fields: {sorted(recs[0])}")
    for i, r in enumerate(recs, 1):
        q = r.get(field)
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{what} {data!r}, record {i}: the prompt {field!r} is {repr(q)[:40]}, "
                            f"not a non-empty string")
        check_text(q, f"{what} {data!r}, record {i}: the prompt {field!r}")
    return [r[field] for r in recs]

def check_text(q, where):
    """Text a tokenizer can take: JSON's \\ud800 escapes decode to lone surrogates, which no UTF-8 can hold."""
    try:
        q.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where} is not valid Unicode (a lone surrogate at character {e.start})") from None

# ---------------------------------------------------------------------------------------------------------------------
# plumbing: the run directory: checkpoint-N folders, metrics.jsonl, the lock (design choice 11)

TMP, DEL, METRICS, LOCK, CK = ".tmp", ".del", "metrics.jsonl", "trb.lock", "checkpoint-[1-9][0-9]*"  # trb's names

def save_checkpoint(d, model, tok, state, optimizer=None, state_dict=None, replaces=()):
    """Writes the checkpoint folder d, out_dir/checkpoint-N: d.tmp in full, trainer_state.pt last, renamed to d (design
    choice 11). optimizer: the AdamW state (FSDP2's shards are in d.tmp already). replaces: a replaced run's
    checkpoints, moved to NAME.del oldest first once d.tmp is complete (the next start finishes a cut-off move); prune
    removes them."""
    tmp = d + TMP
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if hasattr(model, "peft_config"): model.generation_config.save_pretrained(tmp)  # PEFT writes the adapters only
    tok.save_pretrained(tmp)
    if optimizer is not None: torch.save(optimizer, os.path.join(tmp, "optimizer.pt"))
    write_state(tmp, state)                                  # last: the folder is complete
    for p in replaces: os.replace(p, p + DEL)
    os.replace(tmp, d)

def retire(p):  # renamed first: a cut-off removal leaves no checkpoint-N folder behind
    os.replace(p, p + DEL)
    shutil.rmtree(p + DEL)

def checkpoints(d):
    """The complete checkpoints in the run directory d, oldest first: [(step, path)], the folders checkpoint-N that
    hold a trainer_state.pt."""
    found = [(int(f[11:]), os.path.join(d, f)) for f in (os.listdir(d) if os.path.isdir(d) else [])
             if re.fullmatch(CK, f)]
    return sorted((n, p) for n, p in found if _complete(p))

def prune(d, limit):
    """After a save: the older checkpoints keep their weights only, and at most `limit` stay (0: every one)."""
    for f in os.listdir(d): re.fullmatch(CK + re.escape(DEL), f) and shutil.rmtree(os.path.join(d, f))  # replaced
    for _, p in checkpoints(d)[:-limit] if limit > 0 else []: retire(p)
    for _, p in checkpoints(d)[:-1]:
        _remove(os.path.join(p, "optimizer.pt"))
        shutil.rmtree(os.path.join(p, "optimizer"), ignore_errors=True)  # FSDP2's shards

def write_state(p, state):  # atomically: torch.save writes in place
    torch.save(state, os.path.join(p, "trainer_state.part"))
    os.replace(os.path.join(p, "trainer_state.part"), os.path.join(p, "trainer_state.pt"))

def _complete(d):
    return os.path.isfile(os.path.join(d, "trainer_state.pt"))

def on_disk(R):
    """What out_dir holds, for a stopped run's line: what the next start makes of it (claim_out_dir)."""
    d = R.cfg.out_dir
    moved = os.path.isdir(d) and any(re.fullmatch(CK + re.escape(DEL), f) for f in os.listdir(d))  # being removed
    cks, tmp = checkpoints(d), os.path.join(d, f"checkpoint-{R.step}{TMP}")
    if R.replacing and not moved: return f"the run it was to replace in {d} is untouched"
    if _complete(tmp) and (moved or not cks): return f"the next start puts {tmp} in place"
    return f"the newest checkpoint is {cks[-1][1]}" if cks else f"{d} holds no checkpoint"

def write_lines(path, lines):
    """Replaces path's lines atomically, through .trb-NAME.tmp beside it; a failure is one line, the file as it was."""
    tmp = os.path.join(os.path.dirname(path), f".trb-{os.path.basename(path)}{TMP}")
    try:
        with open(tmp, "w") as f: f.writelines(lines)
        os.replace(tmp, path)
    except (OSError, UnicodeError) as e:                    # a full disk; a damaged state's history
        _remove(tmp)
        raise UserError(f"cannot write {path} ({getattr(e, 'strerror', None) or _short(e)})") from None

STATE = dict(step=int, config=dict, world=int, rng=dict, history=list)  # trainer_state.pt's entries

def load_state(d):
    """The trainer_state.pt of the checkpoint folder d, its entries and the config's types checked; bad content is one
    line."""
    path = os.path.join(d, "trainer_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # data only, never code
    except Exception as e:
        raise UserError(f"corrupt checkpoint state {path} ({_short(e)})") from None
    if not isinstance(state, dict): raise UserError(f"corrupt checkpoint state {path} (not a dict)")
    for k, t in STATE.items():
        if k not in state: raise UserError(f"{path} lacks its {k!r} entry")
        if not isinstance(state[k], t) or isinstance(state[k], bool) or (t is int and state[k] < 0) or (
                t is list and not all(isinstance(line, str) for line in state[k])):  # history: metrics.jsonl's lines
            raise UserError(f"{path}: {k!r} is {str(state[k])[:40]!r}, not a valid {k}")
    check_types(state["config"], f"{path}: config")
    return state

def load_trainer_state(student, opt, state, cfg, ckpt):
    """The optimizer and RNG states of --resume; a state that does not fit this student is one line."""
    try:
        if cfg.fsdp: sharded_optimizer(student, opt, ckpt, load=True)
        else: opt.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True))
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        for p, st in opt.state.items() if not cfg.fsdp else ():  # another model's moments: read out of bounds
            for k in ("exp_avg", "exp_avg_sq"):
                if st[k].shape != p.shape: raise ValueError(f"{k} {tuple(st[k].shape)} for a {tuple(p.shape)} weight")
                if not bool(st[k].isfinite().all()): raise ValueError(f"non-finite {k}")
    except Exception as e:  # KeyError, ValueError, TypeError, RuntimeError: a state of another model, or mistyped
        raise UserError(f"--resume: the optimizer or RNG state of {ckpt} is damaged or does not fit ({_short(e)})"
                        ) from None

def read_metrics(path):
    """The records of a metrics.jsonl; a last line cut short (a kill, a full disk) is dropped."""
    def parse(line):
        with suppress(json.JSONDecodeError): return json.loads(line)
    recs = [parse(line) for line in read_lines(path)]
    return [r for r in recs if isinstance(r, dict) and isinstance(r.get("step"), int)]

def read_lines(path):  # [] where there is no file
    if not os.path.isfile(path): return []
    with open(path, encoding="utf-8", errors="replace") as f: return f.readlines()

def _remove(path):
    with suppress(OSError): os.remove(path)

def claim_out_dir(cfg):
    """Readies out_dir, saying each change: leftovers of trb's go (NAME.tmp, NAME.del), but a complete checkpoint-N.tmp
    where none is, or where --overwrite's first save was cut off after it began to move the old run away (to .del),
    is put in place. A fresh run needs no run there, or --overwrite (then it returns True)."""
    d, names = cfg.out_dir, sorted(os.listdir(cfg.out_dir))
    if _complete(d):  # a checkpoint, or a run that a trb.py before checkpoint-N folders saved in out_dir itself
        if not os.path.isfile(os.path.join(d, METRICS)):  # a run kept its metrics beside its checkpoint
            raise UserError(f"--out_dir {d!r} is a checkpoint; pass its run directory, {os.path.dirname(d) or '.'}")
        raise UserError(f"--out_dir {d!r} holds a run saved before trb.py kept checkpoint-N folders: continue it with "
                        f"the trb.py that saved it, or start a new run from its weights with --student {d}")
    if bad := [f for f in names if re.fullmatch(CK, f) and (os.path.islink(os.path.join(d, f)) or
                                                                         not _complete(os.path.join(d, f)))]:
        raise UserError(f"--out_dir {d!r} holds {bad[0]}, which is no checkpoint of trb's (no trainer_state.pt): trb "
                        f"saves under that name; move it away")
    ours = rf"{CK}(\{TMP}|\{DEL})|\.trb-{re.escape(METRICS + TMP)}"  # trb's scratch names
    left = [os.path.join(d, f) for f in names if re.fullmatch(ours, f)]
    tmps = [p for p in left if p.endswith(TMP) and _complete(p) and not os.path.islink(p)]
    if tmps and (any(p.endswith(DEL) for p in left) or not checkpoints(d)):
        for _, p in checkpoints(d): retire(p)                # the run that --overwrite was replacing
        os.replace(tmps[-1], tmps[-1][:-len(TMP)])
        print(f"trb | {left.pop(left.index(tmps[-1]))}: a complete checkpoint whose save was cut off, put in place")
    for p in left:
        if os.path.isdir(p) and not os.path.islink(p): shutil.rmtree(p)
        else: os.remove(p)
        print(f"trb | {p}: removed, what a cut-off save or removal left", flush=True)
    if (cks := checkpoints(d)) and not cfg.overwrite:  # metrics.jsonl begins with the newest checkpoint's lines
        m, lines = os.path.join(d, METRICS), load_state(cks[-1][1])["history"]
        if read_lines(m)[:len(lines)] != lines:  # the replaced run's, where an --overwrite's first save was cut off
            write_lines(m, lines)
            print(f"trb | {m}: rewritten from {cks[-1][1]}", flush=True)
    ran = cks or os.path.isfile(os.path.join(d, METRICS))
    if cfg.resume or not ran: return False
    if cfg.overwrite: return True
    raise UserError(f"--out_dir {cfg.out_dir!r} holds a run ({'checkpoints and ' * bool(cks)}{METRICS}): "
                    f"pass {'--resume to continue it, or ' * bool(cks)}--overwrite to start over")

def lock_out_dir(out_dir):
    """Makes out_dir if needed and holds it for the run, with an fcntl lock on out_dir/trb.lock that names the pid: a
    second run on it, by any path, stops at once. Returns the lock: its file and the directories made for it."""
    import fcntl
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir!r} is {'a file' if os.path.exists(out_dir) else 'a link to nothing'}")
    made, d = [], os.path.abspath(out_dir)                   # the directories this run makes, innermost first
    while not os.path.exists(d): made, d = made + [d], os.path.dirname(d)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fresh = not os.path.exists(os.path.join(out_dir, LOCK))
        f = open(os.path.join(out_dir, LOCK), "a+", opener=lambda p, fl: os.open(p, fl | os.O_NOFOLLOW, 0o666))
    except OSError as e:
        if made: shutil.rmtree(made[-1], ignore_errors=True)
        raise UserError(f"--out_dir {out_dir!r} is not writable: {e.strerror}") from None
    lock = SimpleNamespace(file=f, made=made, fresh=fresh)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(f.fileno()).st_ino != os.stat(f.name).st_ino: raise OSError  # a lock file a failed start removed
    except OSError:  # held by another run
        holder = os.pread(f.fileno(), 64, 0).decode(errors="replace").strip() or "?"
        unlock(lock)
        raise UserError(f"--out_dir {out_dir!r} is in use by another trb.py run (pid {holder})") from None
    try:
        os.ftruncate(f.fileno(), 0)
        os.pwrite(f.fileno(), f"{os.getpid()}\n".encode(), 0)
    except OSError as e:  # a full disk
        unlock(lock, failed=True)
        raise UserError(f"--out_dir {out_dir!r}: cannot write its lock file ({e.strerror})") from None
    return lock

def unlock(lock, failed=False):
    """Releases out_dir. Its lock file stays (a removal would free the lock for a process that opened it), but one made
    for a run that failed before it began goes, with the directories made for it."""
    lock.file.close()
    with suppress(OSError):
        if failed and lock.fresh: os.remove(lock.file.name)
        for d in lock.made: os.rmdir(d)

# ---------------------------------------------------------------------------------------------------------------------
# plumbing: FSDP2 (--fsdp, design choice 12)

def shard(student, device, amp_dtype):
    """fully_shard each decoder layer, then the root; on CUDA, bf16 compute with fp32 reduction and master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = dict(mp_policy=mp) if mp is not None else {}
    for m in [m for m in student.modules() if type(m).__name__ in (student._no_split_modules or [])]:
        fully_shard(m, **kw)
    fully_shard(student, **kw)

@contextmanager
def whole_weights(R):
    """FSDP2: the student's weights are gathered once for decoding and stay whole until the block ends (one full
    copy in the compute dtype), instead of an all-gather per layer and token."""
    if not R.cfg.fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in R.student.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not R.student, recurse=False)  # FSDP2's defaults: the root keeps its own

def sharded_optimizer(student, opt, path, load=False):
    """FSDP2's AdamW state in path/optimizer, by torch.distributed.checkpoint: every rank writes its shard, or reads it
    resharded onto this run's ranks (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    osd = get_optimizer_state_dict(student, opt)             # load: the layout to load into
    (dcp.load if load else dcp.save)(osd, checkpoint_id=os.path.join(path, "optimizer"))
    if load: set_optimizer_state_dict(student, opt, optim_state_dict=osd)

# ---------------------------------------------------------------------------------------------------------------------
# plumbing: signals

class Stopped(UserError):
    """A run stopped by SIGINT or SIGTERM: one line, and the checkpoint is intact."""

class Done(Exception):
    """--resume of a run at or past --max_steps: args (its one line, the student train() returns); exit 0."""

def _interrupt(signum=None, frame=None):
    """The first SIGINT or SIGTERM stops the run; later ones are ignored, so that the stop's line comes out whole."""
    _ignore_signals()
    raise KeyboardInterrupt

def _ignore_signals(final=False):  # a no-op while stopping (SIG_IGN: a race error); at exit SIG_IGN: shutdown keeps it
    for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, signal.SIG_IGN if final else lambda *_: None)


if __name__ == "__main__":
    try:
        main()
    finally:  # the process is ending: a late signal must not replace its exit status (1, or 0) with its own
        _ignore_signals(final=True)
