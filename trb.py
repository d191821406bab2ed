"""
Trust-Region Behavior Blending (TRB) for on-policy distillation, in one file.

On-policy distillation (OPD) trains a student pi_S on its own samples with the
per-prefix reverse KL to a frozen teacher pi_T:

    L(theta) = E_{h} [ KL(pi_S(.|h) || pi_T(.|h)) ]                       (OPD)

TRB changes only where the prefixes h come from. During a warmup of K steps
each token is drawn from the behavior policy

    mu_beta  ~  pi_S^(1-beta) * pi_T^beta                                  (eq. 1)
    beta*    =  max{ beta in [0,1] : KL(mu_beta || pi_S) <= eps }           (eq. 2)

which solves  min_mu KL(mu || pi_T)  s.t.  KL(mu || pi_S) <= eps  per prefix,
recomputed at every decoding step. eps <= 0 gives mu = pi_S; KL(pi_T||pi_S) <= eps
gives mu = pi_T (closed form); otherwise beta* is the root of a monotone
function, since d/dbeta KL(mu_beta||pi_S) = beta * Var_mu[log pi_T - log pi_S] >= 0.
The budget anneals linearly, eps_k = eps0 * max(0, 1 - k/K)   (eq. 3), after which
the run is plain OPD and the teacher no longer runs while decoding.

Design choices
 1. beta* by safeguarded Newton on sqrt(KL(beta)) - sqrt(eps), started at the
    paper's App. E estimate beta0 = sqrt(2 eps / Var_S[log pi_T - log pi_S]),
    falling back to bisection whenever a step leaves the bracket. sqrt(KL) is
    nearly linear in beta, so 2-4 iterations suffice; the feasible end of the
    bracket is returned, so the budget is never exceeded.
 2. KL(mu_beta||pi_S) = beta E_mu[dc] - log E_p[e^(beta dc)] (dc = log pi_T - log pi_S,
    centred) is evaluated from three sums over the row, E_p[e^x - 1 - x], E_p[(e^x - 1) dc]
    and E_p[(e^x - 1) dc^2], whose first two have terms >= 0: float32 holds the budget to
    1e-5 relative at eps = 1e-4. Where e^x could overflow (huge logit gaps), it is summed in
    the log domain as sum_i p_i*(r_i log r_i - r_i + 1), r = mu/p, terms again >= 0.
 3. Temperature divides both sides' logits before blending: mu is blended from
    the two tempered policies, so at tau != 1 the budget is measured against the
    tempered student that would otherwise be sampled.
 4. Tokens impossible under the student (-inf logits, vocab padding, folded EOS)
    stay impossible under mu. Tokens impossible under the teacher are impossible
    under mu for every beta > 0, which costs -log pi_S(allowed) of budget.
 5. EOS ids of student and teacher are folded into one canonical id (the
    student's) with logsumexp, before blending and before the loss (paper App. G).
 6. Both models work on the shared tokenizer vocabulary: logits are sliced to V,
    which drops the differing padding rows of checkpoints of one family.
 7. The loss is the exact reverse KL over the full vocab (--loss_topk 0) or the
    student's renormalised top-k support (paper: k=16), summed over response
    positions (EOS included) and divided by the global number of response tokens
    of the step, so micro-batching and DDP give the same gradient. It and its gradient
    are computed in chunks of positions: extra memory O(chunk*V), not O(B*T*V).
 8. The teacher is re-run once over the finished sequences to score them
    (exact, and cheap next to decoding) instead of storing (B, T, V) logits.
 9. Tokens are drawn by inverse CDF, one uniform per row (torch.multinomial
    draws V exponentials per row, ~6% of a CPU decoding step), from a
    torch.Generator re-seeded from (seed, step, rank) at every step, so
    --resume replays exactly and no two steps share randomness.
10. Checkpoints are written to a sibling temp dir and swapped in by rename; a
    kill mid-save leaves the previous checkpoint (or the new one) intact.

Usage
  python trb.py --student Qwen/Qwen3-0.6B-Base --teacher Qwen/Qwen3-4B --data gsm8k
  torchrun --standalone --nproc_per_node 8 trb.py --student ... --teacher ...
A teacher too large for one GPU is not built in: load it with device_map="auto"
(pipeline across the node's GPUs, one process driving them) or tp_plan="auto"
(tensor parallel under torchrun) and keep the student data-parallel; the
rollout only needs teacher logits for the current token.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
NEG_INF = float("-inf")

# -----------------------------------------------------------------------------
# config

@dataclass
class Config:
    # models
    student: str = "Qwen/Qwen3-0.6B-Base"  # hub name or local dir; trained
    teacher: str = "Qwen/Qwen3-4B"         # hub name or local dir; frozen
    trust_remote_code: bool = False        # never on unless asked
    # data
    data: str = "gsm8k"                    # gsm8k | math | path to .jsonl/.json/.parquet
    prompt_field: str = ""                 # "" = auto-detect question | problem | prompt
    system_prompt: str = SYSTEM_PROMPT     # paper's system prompt
    max_prompt_len: int = 512              # longer prompts are skipped and counted
    eval_data: str = ""                    # held-out prompts for the reverse-KL objective
    eval_prompts: int = 64                 # how many of them
    eval_every: int = 25                   # steps between evals (0 = never)
    # TRB budget (eq. 3)
    eps0: float = 0.02                     # initial KL budget; 0 = vanilla OPD (the baseline)
    warmup_steps: int = 50                 # K: eps reaches 0 at step K
    schedule: str = "linear"               # linear (eq. 3) | constant: fixed-eps blending, never annealed
    # the paper's other warmups, one at a time and with --eps0 0; the defaults are plain TRB
    skd_topk: int = 0                      # SKD: a student token outside the teacher's top-K is replaced by a teacher sample
    skd_steps: int = 0                     # ... during the first N steps
    veto_beta: float = 0.0                 # Veto: loss target Q ~ pi_T * pi_S^B (pi_S detached), B annealed to 0 over K
    temp_warmup: float = 0.0               # sampling temperature rises linearly from this to --temperature over K (0 = off)
    sft_warmup_steps: int = 0              # the first N steps are NLL on teacher samples
    # rollout
    n_samples: int = 4                     # rollouts per prompt
    temperature: float = 1.0               # 0 = greedy
    max_new_tokens: int = 1024
    # optimisation
    max_steps: int = 200
    batch_size: int = 8                    # prompts per step, across all ranks
    micro_batch_size: int = 8              # sequences per forward/backward
    lr: float = 1e-5
    lr_warmup_steps: int = 15              # linear lr warmup, then constant
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    loss_topk: int = 16                    # 0 = full-vocab reverse KL
    loss_chunk: int = 0                    # positions per loss chunk; 0 = auto (1024 on GPU, ~8 MiB of (chunk, V) float32 on CPU)
    grad_ckpt: bool = False                # gradient checkpointing of the student
    # system
    out_dir: str = "out-trb"
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                    # autocast and teacher dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    seed: int = 1337
    resume: bool = False                   # continue from out_dir
    save_every: int = 50                   # steps between checkpoints (0 = only at the end)
    wandb_project: str = ""                # "" = no wandb

class UserError(Exception):
    """Bad input: reported as one line, never as a traceback."""

def _bool(s):
    if s.lower() in ("1", "true", "yes"): return True
    if s.lower() in ("0", "false", "no"): return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="TRB on-policy distillation", allow_abbrev=False)
    for f in dataclasses.fields(Config):
        if f.type is bool:  # `--flag` alone means true
            p.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default)
    cfg = Config(**vars(p.parse_args(argv)))
    check_config(cfg)
    return cfg

def check_config(c):
    for name in ("batch_size", "micro_batch_size", "n_samples", "max_new_tokens", "max_steps", "max_prompt_len"):
        if getattr(c, name) < 1: raise UserError(f"--{name} must be >= 1, got {getattr(c, name)}")
    for name in ("eps0", "warmup_steps", "temperature", "lr", "lr_warmup_steps", "loss_topk", "eval_every", "save_every", "eval_prompts",
                 "skd_topk", "skd_steps", "veto_beta", "temp_warmup", "sft_warmup_steps", "loss_chunk"):
        if not getattr(c, name) >= 0: raise UserError(f"--{name} must be >= 0, got {getattr(c, name)}")  # `not >=` also catches NaN
    if c.dtype not in ("auto", "bfloat16", "float32"): raise UserError(f"--dtype must be auto, bfloat16 or float32, got {c.dtype!r}")
    if c.schedule not in ("linear", "constant"): raise UserError(f"--schedule must be linear or constant, got {c.schedule!r}")
    if (c.skd_topk > 0) != (c.skd_steps > 0): raise UserError("--skd_topk and --skd_steps go together")
    on = [n for n in ("skd_topk", "veto_beta", "temp_warmup", "sft_warmup_steps") if getattr(c, n) > 0]
    if len(on) > 1: raise UserError(f"--{on[0]} and --{on[1]} are different warmups: use one at a time")
    if on and c.eps0 > 0: raise UserError(f"--{on[0]} is a warmup of its own, not a TRB option: use it with --eps0 0")
    if c.schedule == "constant" and c.eps0 == 0: raise UserError("--schedule constant needs --eps0 > 0")

# -----------------------------------------------------------------------------
# init (ddp, device, dtype, seed)

def init_runtime(cfg):
    """Returns (rank, world, device, autocast dtype). Under torchrun, one process per GPU."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if cfg.device == "auto": cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available(): raise UserError(f"--device {cfg.device}: no CUDA device here")
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg.device)
    if cfg.batch_size % world: raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {world} ranks")
    if cfg.dtype == "auto": cfg.dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    return rank, world, torch.device(cfg.device), getattr(torch, cfg.dtype)

# -----------------------------------------------------------------------------
# models, tokenizers, prompts

def _check_path(path):
    """A local directory, or something shaped like a hub name (owner/model)."""
    if os.path.isdir(path): return
    if os.path.exists(path) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) or path.startswith("."):
        raise UserError(f"model {path!r}: no such directory, and not a hub name owner/model")

def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

def load_model(path, dtype, device, trust_remote_code=False):
    from transformers import AutoModelForCausalLM
    _check_path(path)
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, corrupt safetensors, no network: one line, not a traceback
        raise UserError(f"cannot load model {path!r}: {_first_line(e)}") from None
    return m.to(device)

def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer
    _check_path(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load tokenizer {path!r}: {_first_line(e)}") from None

def shared_vocab(s_tok, t_tok, s_model, t_model):
    """V of the shared tokenizer vocab; refuses tokenizers that map it differently."""
    V = min(len(s_tok), len(t_tok))
    s_ids, t_ids = s_tok.convert_ids_to_tokens(list(range(V))), t_tok.convert_ids_to_tokens(list(range(V)))
    for i, (a, b) in enumerate(zip(s_ids, t_ids)):
        if a != b: raise UserError(f"incompatible tokenizers: token id {i} is {a!r} for the student but {b!r} for the teacher")
    for name, m in (("student", s_model), ("teacher", t_model)):
        n = m.get_output_embeddings().weight.shape[0]
        if n < V: raise UserError(f"{name} has {n} output logits, fewer than the {V}-token vocabulary")
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

def format_prompt(tok, question, system=SYSTEM_PROMPT):
    """Token ids of one prompt: the chat template if the tokenizer has one, else plain text."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(f"{system}\n\n{question}\n")["input_ids"]

HUB_DATA = {  # name -> (load_dataset args, prompt field)
    "gsm8k": (("openai/gsm8k", "main"), "question"),
    "math": (("DigitalLearningGmbH/MATH-lighteval",), "problem"),  # the 7.5k MATH train split
}

def load_records(data, split="train"):
    from datasets import load_dataset
    if data in HUB_DATA:
        (args, field), kw = HUB_DATA[data], dict(split=split)
    else:
        if not os.path.isfile(data): raise UserError(f"data {data!r}: no such file, and not one of {sorted(HUB_DATA)}")
        if os.path.getsize(data) == 0: raise UserError(f"data {data!r} is empty")
        ext = data.rsplit(".", 1)[-1].lower()
        if ext not in ("jsonl", "json", "parquet"): raise UserError(f"data {data!r}: expected .jsonl, .json or .parquet")
        args, field, kw = ("parquet" if ext == "parquet" else "json",), None, dict(data_files=data, split="train")
    try:
        return load_dataset(*args, **kw), field
    except Exception as e:  # no network, parse errors: datasets raises many types
        raise UserError(f"cannot read {data!r}: {_first_line(e)}") from None

def load_prompts(data, field=""):
    """List of prompt strings from a hub name or local file, with the field auto-detected."""
    ds, hub_field = load_records(data)
    if len(ds) == 0: raise UserError(f"data {data!r} is empty")
    field = field or hub_field or next((f for f in ("question", "problem", "prompt") if f in ds.column_names), None)
    if field is None or field not in ds.column_names:
        raise UserError(f"data {data!r} has no prompt field {field or '(question|problem|prompt)'}; columns: {ds.column_names}")
    return [str(x) for x in ds[field]]

def left_pad(seqs, pad_id, device):
    """Left-pads lists of token ids into (B, P) ids and attention mask."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)  # (B, P)
    attn = torch.zeros(len(seqs), P, dtype=torch.long)          # (B, P)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, P - len(s):] = 1
    return ids.to(device), attn.to(device)

# -----------------------------------------------------------------------------
# math helpers: EOS folding, the trust-region blend, the budget schedule

def fold_eos(logits, eos_ids):
    """Folds the mass of all EOS ids into eos_ids[0] (logsumexp); the others get -inf."""
    if len(eos_ids) < 2: return logits
    ids = torch.tensor(eos_ids, device=logits.device)
    lse = logits.index_select(-1, ids).float().logsumexp(-1, keepdim=True)  # (..., 1)
    out = logits.index_fill(-1, ids[1:], NEG_INF)                           # (..., V)
    return out.index_copy(-1, ids[:1], lse.to(out.dtype))                   # (..., V)

def token_logp(logits, tokens):
    """log softmax(logits)[tokens] in float32 without materialising the (..., V) log-softmax. (..., V), (...) -> (...)"""
    x = logits.float()
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - x.logsumexp(-1)

def _kl_and_slope(logp, p, dc, beta):
    """KL(mu_beta || p) and its derivative beta*Var_mu[dc], in the log domain (any logits). Off the support logp is -1e30, not -inf."""
    v = (dc * beta.unsqueeze(-1)).add_(logp)                # (N, V) unnormalised log mu
    m = v.amax(-1, keepdim=True)                            # (N, 1)
    mu = (v - m).exp_()                                     # (N, V) one exp serves both mu and log Z
    Z = mu.sum(-1, keepdim=True)                            # (N, 1)
    mu.div_(Z)
    x = v.sub_(m + Z.log()).sub_(logp)                      # (N, V) log(mu/p), from the same exp as mu
    # sum_i p_i (r_i log r_i - r_i + 1) with r = mu/p = e^x: every term >= 0 (design choice 2). p*(r - 1) is
    # p*expm1(min(x, 1)) - mu*expm1(-max(x - 1, 0)): p*expm1(x) where x <= 1 (relative precision near r = 1) and
    # mu - p where x > 1 (no overflow, and p may underflow), with no mask: bool-mask kernels (torch.where,
    # masked_fill) cost as much as ~15 float ops on a CPU.
    pr1 = torch.expm1(x.clamp(max=1)).mul_(p).sub_(torch.expm1((x - 1).clamp_(min=0).neg_()).mul_(mu))  # (N, V)
    kl = (mu * x).sub_(pr1).sum(-1)                         # (N,)
    m1 = mu * dc                                            # (N, V)
    s1 = m1.sum(-1)                                         # (N,) E_mu[dc]
    var = (torch.linalg.vecdot(m1, dc) - s1 ** 2).clamp(min=0)  # (N,) Var_mu[dc]
    return kl, beta * var

def _kl_and_slope_sums(p, dc, sig2, beta):
    """
    KL(mu_beta || p) and its derivative from three sums, with no (N, V) log mu: for x = beta*dc and E_p[dc] = 0,
    Z = E_p[e^x] = 1 + S0, S0 = E_p[e^x - 1 - x] (terms >= 0), KL = beta E_mu[dc] - log Z, E_mu[dc] = S1/Z,
    E_mu[dc^2] = (sigma^2 + S2)/Z, S_k = E_p[(e^x - 1) dc^k] (S1's terms >= 0). A third of _kl_and_slope's passes.
    Only while e^x cannot overflow (beta * max dc <= 50).
    """
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

def _blend(s_logits, t_logits, eps, tol=1e-4, max_iter=60, newton=True):
    """trust_region_blend plus the realised KL(mu||pi_S) and the iterations used (newton=False: plain bisection, for bench.py)."""
    shape, V = s_logits.shape[:-1], s_logits.shape[-1]
    ls = F.log_softmax(s_logits.float().reshape(-1, V), -1)  # (N, V)
    lt = F.log_softmax(t_logits.float().reshape(-1, V), -1)  # (N, V)
    eps = torch.as_tensor(eps, dtype=torch.float32, device=ls.device).expand(shape).reshape(-1)  # (N,)
    # mu_beta for beta > 0 lives where both policies are finite (design choice 4): A.
    d = lt - ls                                              # (N, V) log pi_T - log pi_S; inf/nan off A
    inA = torch.nan_to_num(d * 0 + 1, nan=0.0)               # (N, V) 1 on A, 0 off A (d * 0 is nan there); float, not bool: see above
    off = (inA - 1) * 1e30                                   # (N, V) 0 on A, -1e30 off A
    ps = ls.exp()                                            # (N, V)
    m_out = (ps * (1 - inA)).sum(-1)                         # (N,) student mass off A: exactly 0 when A holds it all
    # KL(mu_beta||pi_S) = KL(mu_beta||p) + c for beta > 0, p = pi_S renormalised on A, c = -log pi_S(A) >= 0.
    c = -torch.log1p(-m_out)                                 # (N,)
    logp = (ls + c[:, None]).clamp_(min=-1e30).add_(off)     # (N, V) <= -1e30 but finite off A: keeps 0 * log 0 out of the sums
    p = (ps * inA).mul_(c.exp()[:, None])                    # (N, V)
    d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)  # (N, V) 0 off A
    dc = d - (p * d).sum(-1, keepdim=True)                   # (N, V) centred under p
    target = eps - c                                         # (N,) budget left for KL(mu||p)
    active = (eps > 0) & (target > 0)                        # rows with beta* > 0
    # App. E: KL(mu_beta||pi_S) ~ beta^2 sigma^2 / 2  =>  beta0 = sqrt(2 eps / sigma^2). The next cumulant,
    # KL ~ sigma^2 beta^2 / 2 + kappa3 beta^3 / 3, corrects it to beta0 (1 - kappa3 beta0 / (3 sigma^2)).
    # A start >= 1 tries the closed form first.
    aim = target * (1 - tol / 2)                             # aim inside the accepted band [target(1 - tol), target]
    pdc2 = p * dc * dc                                       # (N, V)
    sig2, k3 = pdc2.sum(-1), (pdc2 * dc).sum(-1)             # (N,), (N,)
    beta = torch.sqrt(2 * aim.clamp(min=0) / sig2)           # (N,)
    beta = beta * (1 - k3 * beta / (3 * sig2)).clamp(0.5, 1.5)
    beta = beta.nan_to_num(1.0).clamp(max=1.0) if newton else torch.full_like(beta, 0.5)
    lo, hi = torch.zeros_like(eps), torch.full_like(eps, 2.0)  # lo feasible; hi = 2: beta = 1 not yet tried
    kl_lo = torch.zeros_like(eps)
    dmax = dc.amax(-1)                                       # (N,) bounds beta*dc, the exponent of the sums' e^x
    done, it = ~active, 0
    while not bool(done.all()) and it < max_iter:
        it += 1
        if bool((beta * dmax <= 50).all()): kl, slope = _kl_and_slope_sums(p, dc, sig2, beta)  # (N,), (N,)
        else: kl, slope = _kl_and_slope(logp, p, dc, beta)  # log domain: any logits
        ok = (kl <= target) & ~done
        lo, kl_lo = torch.where(ok, beta, lo), torch.where(ok, kl, kl_lo)
        hi = torch.where(~ok & ~done, beta, hi)
        done = done | (ok & ((kl >= target * (1 - tol)) | (beta == 1))) | (hi - lo <= 1e-7 * hi)
        # Newton on sqrt(KL) - sqrt(aim); sqrt(KL) is near-linear in beta (design choice 1).
        rk = kl.clamp(min=0).sqrt()
        nxt = (beta - (rk - aim.sqrt()) * 2 * rk / slope).clamp(max=1.0)
        inside = (nxt > lo) & (nxt < hi) & newton            # NaN/inf steps fail this too
        beta = torch.where(done, beta, torch.where(inside, nxt, (lo + hi.clamp(max=1.0)) / 2))
    beta = torch.where(active, lo, 0.0)                      # (N,) the feasible end of the bracket
    v = torch.addcmul(logp, dc, beta[:, None])               # (N, V) log mu_beta + log Z
    logp_mu = (v - v.logsumexp(-1, keepdim=True)).add_(off.mul_(1e30))  # (N, V) -1e30 * 1e30 = -inf: off A stays impossible
    zero = beta == 0                                         # (N,)
    logp_mu[zero] = ls[zero]                                 # mu = pi_S where beta* = 0
    kl = torch.where(zero, 0.0, kl_lo + c)                   # (N,) realised KL(mu||pi_S)
    return logp_mu.reshape(*shape, V), beta.reshape(shape), kl.reshape(shape), it

def trust_region_blend(s_logits, t_logits, eps):
    """
    Behavior policy of eq. 1-2: mu = pi_S^(1-beta*) pi_T^beta*, with the largest beta* in [0,1]
    such that KL(mu || pi_S) <= eps. s_logits, t_logits: (..., V), any float dtype, already divided
    by the sampling temperature. eps: float or tensor broadcasting to (...).
    Returns logp_mu (..., V) float32 log-probabilities and beta (...) float32.
    """
    logp_mu, beta, _, _ = _blend(s_logits, t_logits, eps)
    return logp_mu, beta

def sample(logits, gen=None):
    """
    One draw per row from softmax(logits) by inverse CDF: the first i with cumsum(p)_i >= u, u ~ U(0, 1].
    torch.multinomial draws one exponential per vocab entry (V random numbers per row: 10 ms per step at
    B=8, V=49152 on a CPU, ~6% of a SmolLM2 decoding step); this draws one per row. The cumsum is float64,
    so the drawn distribution is the float32 softmax itself, and a token with p_i = 0 is never drawn
    (it would need cumsum_{i-1} < u <= cumsum_{i-1}). (B, V) -> (B,)
    """
    c = torch.cumsum(F.softmax(logits.float(), -1), -1, dtype=torch.float64)  # (B, V)
    u = 1 - torch.rand(c.shape[0], 1, dtype=torch.float64, device=c.device, generator=gen)  # (B, 1) in (0, 1]
    return torch.searchsorted(c, u * c[:, -1:]).squeeze(-1)  # (B,) u * total <= total: always in range

def kl_budget(step, eps0, warmup_steps, schedule="linear"):
    """eps_k = eps0 * max(0, 1 - k/K) (eq. 3); K = 0 is pure OPD from step 0. 'constant': eps0 always (fixed-eps baseline)."""
    if schedule == "constant": return eps0
    if warmup_steps <= 0: return 0.0
    return eps0 * max(0.0, 1.0 - step / warmup_steps)

# -----------------------------------------------------------------------------
# rollout

def _check_finite(logits, who, t):
    if torch.isnan(logits).any(): raise UserError(f"NaN in the {who} logits at decode position {t}")

@torch.inference_mode()
def rollout(student, teacher, ids, attn, eps, *, V, eos_ids, pad_id, max_new_tokens, temperature=1.0, gen=None, skd_topk=0):
    """
    Samples B responses token by token from mu (eq. 1-2) with both models' KV caches.
    ids, attn: (B, P) left-padded prompts. eps: float or (B,) per-row budgets; where every
    row has eps <= 0 the teacher is never run. temperature 0 = greedy.
    skd_topk=K: the SKD baseline instead of mu; the student samples, and a token outside the teacher's
    top-K is replaced by a teacher sample.
    Returns tokens, mask (response incl. EOS), beta, kl (realised KL(mu||pi_S)), replaced (SKD) and
    t_logp (teacher log-prob of each token, None when the teacher did not run), all (B, T).
    """
    B = ids.shape[0]
    dev = ids.device
    eps = torch.as_tensor(eps, dtype=torch.float32, device=dev).expand(B)  # (B,)
    use_t = teacher is not None and (bool((eps > 0).any()) or skd_topk > 0)
    tau = temperature if temperature > 0 else 1.0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                 # (B, P) position ids under left padding

    def step(model, x, cache, a, ps):
        out = model(input_ids=x, attention_mask=a, position_ids=ps, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :V], out.cache              # (B, V)

    s_logits, s_cache = step(student, ids, None, attn, pos)
    if use_t: t_logits, t_cache = step(teacher, ids, None, attn, pos)
    next_pos = pos[:, -1:] + 1                               # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=dev)      # (B,)
    toks, masks, betas, kls, tlps, reps = [], [], [], [], [], []

    def draw(logits):  # (B, V) unnormalised log-probs -> (B,)
        if temperature > 0: return sample(logits, gen)
        return logits.argmax(-1)

    for t in range(max_new_tokens):
        _check_finite(s_logits, "student", t)
        s = fold_eos(s_logits.float(), eos_ids)              # (B, V)
        if tau != 1: s = s / tau
        if use_t:
            _check_finite(t_logits, "teacher", t)
            tl = fold_eos(t_logits.float(), eos_ids)         # (B, V)
            if tau != 1: tl = tl / tau
        beta = kl = torch.zeros(B, device=dev)
        rep = torch.zeros(B, dtype=torch.bool, device=dev)
        if skd_topk:
            tok = draw(s)                                    # (B,) the student proposes
            rep = ~(tl.topk(skd_topk, -1).indices == tok[:, None]).any(-1)  # (B,) outside the teacher's top-K
            tok = torch.where(rep, draw(tl), tok)
        elif use_t:
            logp_mu, beta, kl, _ = _blend(s, tl, eps)        # (B, V), (B,), (B,)
            tok = draw(logp_mu)                              # (B,)
        else:
            tok = draw(s)                                    # (B,)
        tok = tok.masked_fill(done, pad_id)
        toks.append(tok); masks.append(~done); betas.append(beta); kls.append(kl); reps.append(rep & ~done)
        if use_t: tlps.append(token_logp(tl, tok))           # (B,)
        done = done | (tok == eos_ids[0])
        if bool(done.all()) or t == max_new_tokens - 1: break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)  # (B, P+t+1)
        s_logits, s_cache = step(student, tok[:, None], s_cache, attn, next_pos)
        if use_t: t_logits, t_cache = step(teacher, tok[:, None], t_cache, attn, next_pos)
        next_pos = next_pos + 1
    m = torch.stack(masks, 1)                                # (B, T)
    return dict(tokens=torch.stack(toks, 1), mask=m, replaced=torch.stack(reps, 1),
                beta=torch.stack(betas, 1) * m, kl=torch.stack(kls, 1) * m,
                t_logp=(torch.stack(tlps, 1) * m) if use_t else None)

# -----------------------------------------------------------------------------
# loss

def reverse_kl(s_logits, t_logits, topk=0, tokens=None):
    """
    Per-position reverse KL(pi_S || pi_T), shape (...). Gradient flows to s_logits only.
    topk=0: full vocabulary; topk=k: the student's top-k tokens, renormalised on both sides
    (the paper's estimator, k=16). tokens (...): the single-sample estimator
    log pi_S(y) - log pi_T(y), whose gradient is the score-function one,
    (log pi_S(y) - log pi_T(y)) * grad log pi_S(y); unbiased only where y ~ pi_S.
    """
    t_logits = t_logits.detach()
    if tokens is not None:
        lp, lq = token_logp(s_logits, tokens), token_logp(t_logits, tokens)  # (...), (...)
        k = (lp - lq).detach()
        return k + k * (lp - lp.detach())
    if topk:
        idx = s_logits.detach().topk(topk, -1).indices       # (..., k)
        s_logits, t_logits = s_logits.gather(-1, idx), t_logits.gather(-1, idx)  # (..., k)
    ls = F.log_softmax(s_logits.float(), -1)                 # (..., V|k)
    lt = F.log_softmax(t_logits.float(), -1)                 # (..., V|k)
    ps = ls.exp()
    return (ps * torch.where(ps > 0, ls - lt, 0.0)).sum(-1)  # (...)

def _chunk_loss(s, t, m, topk, eos_ids, veto):
    s, t = fold_eos(s, eos_ids), fold_eos(t, eos_ids)
    if veto:  # Veto baseline: the target is Q ~ pi_T * pi_S^B with pi_S detached (reverse_kl renormalises)
        t = F.log_softmax(t.float(), -1) + veto * F.log_softmax(s.detach().float(), -1)
    return (reverse_kl(s, t, topk) * m).sum()

class _ChunkedKL(torch.autograd.Function):
    """
    The loss and its gradient, one chunk of positions at a time, in forward. Backward only scales the
    stored gradient: beside that (N, V) gradient, which the logits need anyway, no (N, V) float32
    intermediate ever exists, and nothing is recomputed.
    """
    @staticmethod
    def forward(ctx, s, t, m, topk, eos_ids, veto, chunk):
        grad = torch.zeros_like(s)                           # (N, V) dL/ds, in the logits' dtype
        total = s.new_zeros((), dtype=torch.float32)
        for i in range(0, s.shape[0], chunk):
            if not bool(m[i:i + chunk].any()): continue
            with torch.enable_grad():
                si = s[i:i + chunk].detach().requires_grad_()  # (c, V)
                li = _chunk_loss(si, t[i:i + chunk], m[i:i + chunk], topk, eos_ids, veto)
                (gi,) = torch.autograd.grad(li, si)
            grad[i:i + chunk] = gi
            total += li.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g.to(grad.dtype)), None, None, None, None, None, None

def opd_loss(s_logits, t_logits, mask, topk=0, eos_ids=(), chunk=0, veto=0.0):
    """
    Sum over masked positions of the reverse KL, in chunks of positions whose gradient is taken
    on the spot (design choice 7): peak extra memory is O(chunk * V) beyond the logits' own gradient.
    s_logits, t_logits: (B, T, V); mask: (B, T). veto=B replaces the target pi_T by
    Q ~ pi_T * pi_S^B (the Veto baseline). chunk=0: 1024 positions on a GPU; on a CPU as many as fit
    ~8 MiB of float32 per (chunk, V) buffer, which the allocator reuses instead of mapping fresh pages
    (5x faster than 1024 positions at V=49152).
    """
    V = s_logits.shape[-1]
    if chunk <= 0: chunk = 1024 if s_logits.is_cuda else max(1, 2**21 // V)
    s, t, m = s_logits.reshape(-1, V), t_logits.detach().reshape(-1, V), mask.reshape(-1).float()  # (N, V), (N, V), (N,)
    if s.requires_grad: return _ChunkedKL.apply(s, t, m, topk, list(eos_ids), veto, chunk)
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        total += _chunk_loss(s[i:i + chunk], t[i:i + chunk], m[i:i + chunk], topk, list(eos_ids), veto)
    return total

def response_logits(model, seq, attn, T, V):
    """Logits (B, T, V) at the T positions that predict the response tokens seq[:, -T:]."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                 # (B, P+T)
    out = model(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=T + 1)
    return out.logits[:, :-1, :V]                            # (B, T, V)

# -----------------------------------------------------------------------------
# training loop

def save_checkpoint(out_dir, model, tok, state):
    """Writes out_dir.tmp completely, then swaps it in by rename (design choice 10)."""
    out_dir = os.path.abspath(out_dir)
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt.part"))
    os.replace(os.path.join(tmp, "trainer_state.pt.part"), os.path.join(tmp, "trainer_state.pt"))  # completeness marker
    if os.path.isdir(out_dir):
        for f in os.listdir(out_dir):  # carry over what is not part of the checkpoint (metrics, user files)
            if not os.path.exists(os.path.join(tmp, f)): os.replace(os.path.join(out_dir, f), os.path.join(tmp, f))
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)

def recover_checkpoint(out_dir):
    """Finishes a swap that a kill interrupted: a complete .tmp wins, else the .old one."""
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir): return
    for cand in (out_dir + ".tmp", out_dir + ".old"):
        if os.path.isfile(os.path.join(cand, "trainer_state.pt")):
            os.replace(cand, out_dir)
            return

def load_state(out_dir):
    recover_checkpoint(out_dir)
    path = os.path.join(out_dir, "trainer_state.pt")
    if not os.path.isfile(path): raise UserError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert isinstance(state, dict) and {"step", "optimizer", "config"} <= state.keys()
    except Exception:
        raise UserError(f"--resume: corrupt checkpoint state {path}") from None
    return state

def lr_at(step, cfg):
    return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else cfg.lr

def batch_indices(step, n, cfg, rank, world):
    """Prompt indices of this rank at `step`: a fresh seeded permutation per epoch, a function of step alone."""
    out, per = [], cfg.batch_size // world
    for g in range(step * cfg.batch_size + rank * per, step * cfg.batch_size + (rank + 1) * per):
        epoch, i = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        out.append(int(perm[i]))
    return out

def build_sequences(prompt_ids, roll, pad_id):
    """prompt (B, P) + response (B, T) -> ids, attention mask (B, P+T)."""
    ids, attn = prompt_ids
    seq = torch.cat([ids, roll["tokens"]], 1)                # (B, P+T)
    a = torch.cat([attn, roll["mask"].long()], 1)            # (B, P+T)
    return seq, a

def encode_prompts(tok, prompts, cfg):
    enc, skipped = [], 0
    for q in prompts:
        ids = format_prompt(tok, q, cfg.system_prompt)
        if len(ids) > cfg.max_prompt_len: skipped += 1
        else: enc.append(ids)
    return enc, skipped

def all_reduce(x, world):
    if world > 1: torch.distributed.all_reduce(x)
    return x

def evaluate(student, teacher, prompts, cfg, V, eos_ids, pad_id, device, amp, rank, world):
    """Held-out objective: mean full-vocab reverse KL per token on pure student rollouts."""
    tot = torch.zeros(2, device=device)                      # (sum KL, tokens)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000 + rank)
    mine = prompts[rank::world]
    for i in range(0, len(mine), cfg.micro_batch_size):
        ids, attn = left_pad(mine[i:i + cfg.micro_batch_size], pad_id, device)
        with amp:
            r = rollout(student, None, ids, attn, 0.0, V=V, eos_ids=eos_ids, pad_id=pad_id,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, gen=gen)
            seq, a = build_sequences((ids, attn), r, pad_id)
            with torch.inference_mode():
                T = r["tokens"].shape[1]
                s_l, t_l = response_logits(student, seq, a, T, V), response_logits(teacher, seq, a, T, V)
                tot[0] += opd_loss(s_l, t_l, r["mask"], 0, eos_ids, cfg.loss_chunk)
                tot[1] += r["mask"].sum()
    all_reduce(tot, world)
    return (tot[0] / tot[1].clamp(min=1)).item()

def train(cfg):
    rank, world, device, amp_dtype = init_runtime(cfg)
    master = rank == 0
    amp = torch.autocast(device.type, dtype=amp_dtype) if device.type == "cuda" and amp_dtype != torch.float32 else nullcontext()
    state = load_state(cfg.out_dir) if cfg.resume else None
    if state is not None:  # the schedule, data order and seeds come from the checkpoint
        keep = {k: getattr(cfg, k) for k in ("out_dir", "max_steps", "device", "dtype", "save_every", "eval_every", "wandb_project", "resume")}
        cfg = Config(**{**state["config"], **keep})
    s_path = cfg.out_dir if state is not None else cfg.student
    tok = load_tokenizer(s_path, cfg.trust_remote_code)
    t_tok = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    student = load_model(s_path, torch.float32, device, cfg.trust_remote_code)  # fp32 master weights
    teacher = load_model(cfg.teacher, amp_dtype, device, cfg.trust_remote_code).eval().requires_grad_(False)
    V = shared_vocab(tok, t_tok, student, teacher)
    eos_ids = eos_ids_of((tok, student), (t_tok, teacher))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    prompts, skipped = encode_prompts(tok, load_prompts(cfg.data, cfg.prompt_field), cfg)
    if not prompts: raise UserError(f"data {cfg.data!r}: every prompt is longer than --max_prompt_len {cfg.max_prompt_len}")
    eval_prompts = encode_prompts(tok, load_prompts(cfg.eval_data, cfg.prompt_field), cfg)[0][:cfg.eval_prompts] if cfg.eval_data else []
    if cfg.grad_ckpt: student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else student
    fused = device.type in ("cpu", "cuda")                 # one kernel for all parameters: 4x faster than the per-tensor loop on CPU
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=fused)
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"]); random.setstate(state["rng"]["python"])
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        mpath = os.path.join(cfg.out_dir, "metrics.jsonl")
        if os.path.exists(mpath):  # drop lines past the step we resume from
            with open(mpath) as f: lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
            with open(mpath, "w") as f: f.writelines(lines)
        print(f"trb | V={V} eos={eos_ids} prompts={len(prompts)} skipped_long={skipped} world={world} device={device} dtype={cfg.dtype}")
    wandb = None
    if master and cfg.wandb_project:
        import wandb
        wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    gen = torch.Generator(device=device)
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True)

    def save(step):
        if master:
            state = dict(step=step, optimizer=opt.state_dict(), config=dataclasses.asdict(cfg), world=world,
                         rng=dict(torch=torch.get_rng_state(), python=random.getstate()))
            save_checkpoint(cfg.out_dir, student, tok, state)
        if world > 1: torch.distributed.barrier()

    def log_eval():  # every rank evaluates its shard; the result is all-reduced
        student.eval()
        return evaluate(student, teacher, eval_prompts, cfg, V, eos_ids, pad_id, device, amp, rank, world)

    def write_metrics(rec):
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f: f.write(json.dumps(rec) + "\n")
        if wandb: wandb.log(rec, step=rec["step"])

    do_eval = bool(eval_prompts and cfg.eval_every)
    if do_eval and step == 0:  # the value the held-out curve starts from
        kl0 = log_eval()
        if master:
            bar.write(f"step     0 | eval_kl {kl0:.4f}")
            write_metrics(dict(step=0, eval_kl=kl0))
    while step < cfg.max_steps:
        t0 = time.time()
        eps = kl_budget(step, cfg.eps0, cfg.warmup_steps, cfg.schedule)
        # the baselines' knobs at this step (all inert at their defaults)
        sft = step < cfg.sft_warmup_steps                      # SFT warmup: the teacher samples, the loss is NLL
        skd = cfg.skd_topk if step < cfg.skd_steps else 0     # SKD: token replacement outside the teacher's top-K
        veto = kl_budget(step, cfg.veto_beta, cfg.warmup_steps)  # Veto: exponent B, annealed linearly like eps
        tau = cfg.temperature
        if cfg.temp_warmup: tau = cfg.temp_warmup + (tau - cfg.temp_warmup) * min(1.0, step / cfg.warmup_steps if cfg.warmup_steps else 1.0)
        rows = [prompts[i] for i in batch_indices(step, len(prompts), cfg, rank, world) for _ in range(cfg.n_samples)]
        gen.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)  # design choice 9
        for g in opt.param_groups: g["lr"] = lr_at(step, cfg)
        # rollout: mu during warmup, pi_S after (the teacher stays idle at eps = 0)
        student.eval()
        rolls = []
        for i in range(0, len(rows), cfg.micro_batch_size):
            ids, attn = left_pad(rows[i:i + cfg.micro_batch_size], pad_id, device)
            try:
                with amp:
                    r = rollout(teacher if sft else student, None if sft else teacher, ids, attn, eps, V=V, eos_ids=eos_ids, pad_id=pad_id,
                                max_new_tokens=cfg.max_new_tokens, temperature=tau, gen=gen, skd_topk=skd)
            except UserError as e:
                raise UserError(f"step {step}: {e}; stopping without saving") from None
            rolls.append(((ids, attn), {k: v.clone() if v is not None else v for k, v in r.items()}))  # out of inference mode
        t_roll = time.time() - t0
        # loss: sum of reverse KL over response positions / global response tokens (design choice 7)
        n_tok = all_reduce(torch.tensor(float(sum(r["mask"].sum() for _, r in rolls)), device=device), world)
        student.train()
        stats = torch.zeros(7, device=device)                # loss, beta, kl_mu_s, t_logp, frac_teacher, resp tokens, skd replaced
        for j, (prompt, r) in enumerate(rolls):
            seq, a = build_sequences(prompt, r, pad_id)
            T = r["tokens"].shape[1]
            m = r["mask"]
            with torch.inference_mode(), amp:
                t_l = response_logits(teacher, seq, a, T, V)  # (b, T, V)
                t_lp = token_logp(fold_eos(t_l, eos_ids), r["tokens"])  # (b, T)
            t_l = t_l.clone()  # leave inference mode: autograd may save it
            sync = j == len(rolls) - 1 or world == 1
            with (nullcontext() if sync else model.no_sync()), amp:
                s_l = response_logits(model, seq, a, T, V)    # (b, T, V)
                if sft:  # NLL of the teacher's tokens
                    loss = -(token_logp(fold_eos(s_l, eos_ids), r["tokens"]) * m).sum()
                else:
                    loss = opd_loss(s_l, t_l, m, cfg.loss_topk, eos_ids, cfg.loss_chunk, veto)
                (loss * world / n_tok).backward()
            stats += torch.stack([loss.detach(), r["beta"].sum(), r["kl"].sum(), (t_lp * m).sum(), ((r["beta"] == 1) & m).sum(), m.sum(),
                                  r["replaced"].sum()]).float()
        all_reduce(stats, world)
        loss_v = stats[0].item() / n_tok.item()
        if not math.isfinite(loss_v): raise UserError(f"step {step}: non-finite loss ({loss_v}); stopping without saving")
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        n = stats[5].item()
        rec = dict(step=step, loss=loss_v, eps=eps, beta=stats[1].item() / n, frac_teacher=stats[4].item() / n,
                   kl_mu_s=stats[2].item() / n, teacher_logp=stats[3].item() / n, resp_len=n / (len(rows) * world),
                   tok_per_s=n / t_roll, dt=dt, lr=lr_at(step - 1, cfg), temperature=tau, skd_rate=stats[6].item() / n)
        if cfg.veto_beta: rec["veto_b"] = veto
        if cfg.sft_warmup_steps: rec["sft"] = sft
        if do_eval and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            rec["eval_kl"] = log_eval()
        if master:
            bar.update(1)
            bar.write(f"step {step:5d} | loss {loss_v:.4f} | eps {eps:.4g} | beta {rec['beta']:.3f} | frac_teacher {rec['frac_teacher']:.3f}"
                      f" | kl(mu|s) {rec['kl_mu_s']:.4g} | teacher_logp {rec['teacher_logp']:.3f} | resp_len {rec['resp_len']:.1f}"
                      f" | tok/s {rec['tok_per_s']:.1f} | dt {dt:.2f}s" + (f" | eval_kl {rec['eval_kl']:.4f}" if "eval_kl" in rec else "")
                      + (f" | skd_rate {rec['skd_rate']:.4f}" if skd else ""))
            write_metrics(rec)
        if step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0): save(step)
    bar.close()
    if world > 1: torch.distributed.destroy_process_group()
    return student

def main(argv=None):
    try:
        cfg = parse_args(argv)
        train(cfg)
    except UserError as e:
        raise SystemExit(f"trb: error: {e}")

if __name__ == "__main__":
    main()
