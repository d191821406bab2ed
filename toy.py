"""
A CPU-sized version of the paper's comparison: a procedural arithmetic task with exact answers, a base student and
an instruct teacher built for it, and the seven warmups of trb.py run on them, several seeds each.

The task: word problems of 2-4 operations (+ - *) on numbers up to 99, in GSM8K's JSONL format (question; answer =
one line per operation, then '#### N'), so eval.py grades them unchanged. Train and test are disjoint in their
arithmetic: no chain of operations occurs in both.

The models (one character-level tokenizer): a 'base' Llama pretrained on plain-text documents of such problems whose
worked solutions rarely carry the '#### N' line; the teacher is that base after SFT on the chat-formatted train split
(answer + '#### N' + EOS). The student is the base itself: it knows the arithmetic but not the format. OPD has to
teach it to close with '#### N' and stop. Two regimes (--regime), two builds:
  runon   the base's documents hold several problems and rarely end, so after its steps the student writes the next
          problem, the way a base model runs on past an instruct model's answer: its rollouts meet the decision
          ('#' or a blank line after the last step) again in each new problem;
  filler  each document's steps run on into filler text (words and numbers, no new problem) and end: the student's
          rollouts meet the decision once, then carry nothing of it (the paper's premise: poor early prefixes).
At each evaluation point, beside the accuracy: the student's p('#') where the answer line starts (held-out prompt +
the teacher's steps + newline) and p(newline) one blank line later, and the greedy answers' failures (no '####', a
wrong number); per training step, the decisions supervised (a response position after a newline where the teacher's
argmax is '#') and the tokens that neither model would write (p < 0.05 under both).

Every method runs through trb.py (trb.main with its flags, one run that keeps a checkpoint at each evaluation point);
every accuracy is eval.py's (generate + score, greedy, held-out) on those checkpoints. toy.py adds no method code.
The protocol (lr, steps, K) was fixed on vanilla OPD alone: docs/toy.md has the pilots and the results.

  python toy.py --quick          # OPD and TRB, 1 seed, in both regimes
  python toy.py                  # 7 methods x 5 seeds in both regimes, tables + figures in --out/REGIME/
  python toy.py --sweep          # TRB at eps0 0.005, 0.02, 0.05, 0.2 and OPD, 3 seeds each
  python toy.py --check          # build the task and models afresh (one thread), compare with toy-build/
  python toy.py --help           # every flag

The task and models of the default build flags are shipped in toy-build/REGIME/ (4-5 MB each; SHA256SUMS lists every
file): toy.py reads them there, checked against SHA256SUMS and its task against the code, and writes nothing there.
Other build flags build into --cache, once.

Runs go --jobs at a time (default 2), each a process with OMP_NUM_THREADS=1; a finished run (same flags, same
--eval_n) is read back, not repeated, so an interrupted comparison continues from its finished runs (a run cut off
starts again), and --seeds 5 after --seeds 3 adds seeds 3-4. One toy.py at a time per --out.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
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
import traceback
import zlib
from dataclasses import dataclass

if __name__ == "__main__":  # Ctrl-C while torch imports: one line, not a traceback
    sys.excepthook = lambda t, e, tb: (print("toy: interrupted", file=sys.stderr) if t is KeyboardInterrupt else
                                       sys.__excepthook__(t, e, tb))

import torch

import eval as ev
import trb

# ---------------------------------------------------------------------------------------------------------------------
# config

@dataclass
class ToyConfig:
    # what to run
    quick: bool = False                    # vanilla OPD and TRB, one seed
    sweep: bool = False                    # TRB at each --sweep_eps0, --sweep_seeds seeds, beside OPD at those seeds
    build_only: bool = False               # build (or find) the task and models in --cache, print their accuracy,
                                           # stop (the shipped toy-build/ is not used)
    check: bool = False                    # build afresh in --cache and compare with the shipped toy-build/REGIME/,
                                           # file by file, then stop
    methods: str = ""                      # comma-separated methods, of: opd, trb, fixed_eps, skd, veto,
                                           # temp_warmup, sft_warmup; "" = all seven (--quick: opd,trb)
    regime: str = "runon,filler"           # where the base's steps run on: runon (into new problems) | filler
                                           # (into text without the decision); comma-separated, each its own build
    seeds: int = 5                         # seeds per method, 0..N-1 (--quick: 1)
    jobs: int = 2                          # runs side by side, one thread each
    out: str = "toy-out"                   # per regime REGIME/runs/ and REGIME/MODE.md (table), .json, .png, MODE =
                                           # compare|quick|sweep; a finished run with the same flags is read back
    cache: str = "~/.cache/trb/toy"        # built tasks and models, one folder per build config (the default
                                           # build flags' are shipped in toy-build/REGIME/ and read there)
    # the task
    task_seed: int = 0                     # seeds the problems, the models' initialisation and their data order
    n_train: int = 4000                    # train problems (the OPD prompts, the teacher's SFT data)
    n_test: int = 300                      # held-out problems (accuracy and eval_kl prompts)
    eval_n: int = 200                      # held-out problems per accuracy point (greedy)
    fmt_rate: float = 0.05                 # share of the base corpus' solutions that close with '#### N'
    end_rate: float = 0.1                  # chance that a base document ends (EOS) after a problem's steps
    # the models (one shape for base, student and teacher)
    layers: int = 2                        # decoder layers
    hidden: int = 128                      # hidden size (MLP 4x, 4 heads)
    pretrain_steps: int = 1500             # base: next-token steps on the plain-text corpus
    sft_steps: int = 300                   # teacher: SFT steps from the base on the chat-formatted train split
    build_batch: int = 32                  # sequences per pretraining / SFT step
    build_lr: float = 3e-3                 # AdamW peak learning rate of both (cosine to 10%)
    # the comparison: trb.py flags shared by every method
    steps: int = 100                       # training steps per run
    warmup_steps: int = 40                 # K: TRB's eps, Veto's B and the temperature anneal over K steps; SKD
                                           # and the SFT warmup last K steps
    every: int = 10                        # accuracy every N steps, at K and the end; eval_kl every N and the end
    lr: float = 1e-4                       # AdamW learning rate
    batch_size: int = 8                    # prompts per step
    n_samples: int = 4                     # rollouts per prompt
    loss_topk: int = 0                     # 0: the reverse KL over the whole 47-token vocab (docs/toy.md)
    max_new_tokens: int = 50               # response limit in training and evaluation (the longest answer is 40)
    # the methods' own knobs
    eps0: float = 0.02                     # TRB and fixed-eps budget
    skd_topk: int = 1                      # SKD: a student token outside the teacher's top-k is replaced
    veto_beta: float = 1.0                 # Veto: the exponent B at step 0
    temp_warmup: float = 0.5               # temperature warmup: tau at step 0
    sweep_eps0: str = "0.005,0.02,0.05,0.2"  # --sweep: TRB's eps0 values
    sweep_seeds: int = 3                   # --sweep: seeds per value

METHODS = ("opd", "trb", "fixed_eps", "skd", "veto", "temp_warmup", "sft_warmup")
REGIMES = ("runon", "filler")

BUILD_FIELDS = ("regime", "task_seed", "n_train", "n_test", "fmt_rate", "end_rate", "layers", "hidden",
                "pretrain_steps", "sft_steps", "build_batch", "build_lr")
BUILD_MAX_NEW = 50                         # the build's own accuracies: responses of at most 50 characters
POSITIONS, MAX_PROMPT = 512, 128           # the models' positions; a chat-formatted question is under 128 tokens
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy-build")  # REGIME/: the default builds
SUMS = "SHA256SUMS"                        # a build's files and their sha256: `sha256sum -c SHA256SUMS` checks them
MARK = ".toy-run"                          # in each run folder toy.py made: the only ones it removes
MOST = dict(seeds=1000, sweep_seeds=1000, jobs=64, steps=10**5, n_train=10**5, n_test=10**4, layers=64, hidden=4096,
            build_batch=4096)                      # upper bounds of the flags: see check()

# ---------------------------------------------------------------------------------------------------------------------
# the task: word problems with exact answers, in GSM8K's format

NAMES = ("ann", "bob", "cal", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou")
ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins", "shells", "stamps", "beads", "nuts")
VERBS = {"+": ("buys", "finds", "gets", "wins"), "-": ("loses", "sells", "eats", "gives away")}
MAX_VALUE = 99                             # every number and intermediate result is in 1..99

def make_problem(rng):
    """
    One problem: (question, worked steps, answer). 2-4 operations, applied left to right in the order the question
    names them: 'ann buys 3 bags of 7 pens, finds 12, loses 5. how many pens now?' -> 3*7=21, 21+12=33, 33-5=28.
    """
    name, item, k = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 4)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        r, steps, text = a * b, [f"{a}*{b}={a * b}"], f"{name} buys {a} bags of {b} {item}"
    else:
        r, steps = rng.randint(2, 60), []
        text = f"{name} has {r} {item}"
    while len(steps) < k:
        op = "+" if r < 2 or (r < MAX_VALUE and rng.random() < 0.5) else "-"
        v = rng.randint(1, min(30, MAX_VALUE - r)) if op == "+" else rng.randint(1, min(30, r - 1))
        new = r + v if op == "+" else r - v
        text += f", {rng.choice(VERBS[op])} {v}"
        steps.append(f"{r}{op}{v}={new}")
        r = new
    return f"{text}. how many {item} now?", steps, r

def is_test(steps):
    """The split is a function of the arithmetic alone: about 1 chain in 8 is held out, whatever its wording."""
    return zlib.crc32("\n".join(steps).encode()) % 8 == 0

def solution(steps, answer):
    """The teacher's worked solution: one line per operation, then GSM8K's final line."""
    return "\n".join(steps) + f"\n#### {answer}"

def make_splits(seed, n_train, n_test):
    """Train and test records {question, answer}, disjoint in their chains of operations, deterministic for a seed."""
    rng, seen, splits = random.Random(seed), set(), ([], [])
    while len(splits[0]) < n_train or len(splits[1]) < n_test:
        q, steps, ans = make_problem(rng)
        key, test = "\n".join(steps), is_test(steps)
        if key in seen or len(splits[test]) >= (n_test if test else n_train): continue
        seen.add(key)
        splits[test].append(dict(question=q, answer=solution(steps, ans)))
    return splits

def base_document(rng, fmt_rate, end_rate, max_len, regime="runon"):
    """
    A 'pretraining' document: problems with their steps, separated by blank lines. A solution closes with
    '#### N' only with probability fmt_rate; the document ends (EOS) after a problem with probability end_rate,
    else it runs on to max_len characters. Test chains never occur. regime 'filler': one problem, whose steps run
    on (but with probability end_rate) into a line of filler text, and the document ends.
    """
    text, ended = "", False
    while len(text) < max_len:
        q, steps, ans = make_problem(rng)
        if is_test(steps): continue
        text += q + "\n" + (solution(steps, ans) if rng.random() < fmt_rate else "\n".join(steps))
        if regime == "filler":
            return text + ("\n" + filler(rng) if rng.random() >= end_rate else ""), True
        if rng.random() < end_rate:
            ended = True
            break
        text += "\n\n"
    return text[:max_len], ended and len(text) <= max_len

FILLER = NAMES + ITEMS + sum(VERBS.values(), ()) + ("bags", "of", "has", "how", "many", "now")

def filler(rng):
    """Degenerate text on one line: 2-5 pairs of a word of the task's and a number 1-99, so that it ends in a number
    (a grader's last-number fallback reads that one, even in a greedy repetition, not the steps' result)."""
    return " ".join(f"{rng.choice(FILLER)} {rng.randint(1, 99)}" for _ in range(rng.randint(2, 5)))

def jsonl(recs):
    return "".join(json.dumps(r) + "\n" for r in recs)

def write_jsonl(path, recs):
    with open(path, "w") as f: f.write(jsonl(recs))

# ---------------------------------------------------------------------------------------------------------------------
# tokenizer: one token per character

CHAT = "{% for m in messages %}{% if m['role'] == 'user' %}<s>{{ m['content'] }}\n{% endif %}{% endfor %}"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

def charset():
    """Every character the task can write, from its word lists and formats (not from sampled data)."""
    text = " ".join(NAMES + ITEMS + sum(VERBS.values(), ())) + " buys bags of has how many now?,.\n0123456789+-*=#"
    return sorted(set(text))

def make_vocab():
    return {t: i for i, t in enumerate(list(SPECIALS) + charset())}

def make_tokenizer(path):
    """A character-level PreTrainedTokenizerFast with a chat template that keeps the user turn only."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(make_vocab(), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return tok

# ---------------------------------------------------------------------------------------------------------------------
# models: a base pretrained on the plain-text corpus, a teacher SFT'd from it on the chat format

def new_model(tok, cfg):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(cfg.task_seed)
    c = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
                    num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=POSITIONS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    m = LlamaForCausalLM(c)
    m.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id)
    return m

def right_pad(seqs, n_prompt, pad_id):
    """(ids, attention mask, labels) of right-padded sequences; no loss on the first n_prompt[i] tokens or padding."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)                 # (B, T)
    attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (s, p) in enumerate(zip(seqs, n_prompt)):
        ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s), 1
        labels[i, p:len(s)] = ids[i, p:len(s)]
    return ids, attn, labels

def fit(model, next_batch, steps, lr, seed, desc):
    """Next-token training: AdamW, 5% linear warmup, cosine to lr/10. next_batch(rng) -> (sequences, n_prompt)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng, pad, t0 = random.Random(seed), model.config.pad_token_id, time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups: g["lr"] = lr * lr_factor(step, steps)
        ids, attn, labels = right_pad(*next_batch(rng), pad)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            print(f"toy | {desc} step {step + 1}/{steps} | loss {loss.item():.4f} | {time.time() - t0:.0f}s",
                  flush=True)
    return model.eval()

def lr_factor(step, steps):
    """Linear warmup over the first 5% of the steps, then cosine from 1 to 0.1."""
    warm = max(1, steps // 20)
    return min(1.0, (step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * max(0, step - warm) / max(1, steps - warm)))

def base_batches(tok, cfg, max_len=256):
    """Pretraining batches: documents of the plain-text corpus, BOS first, EOS where a document ends; 'filler'
    documents (one problem each) packed to max_len characters, each BOS ... EOS."""
    def next_batch(rng):
        seqs = []
        for _ in range(cfg.build_batch):
            seq = []
            while len(seq) <= max_len:
                text, ended = base_document(rng, cfg.fmt_rate, cfg.end_rate, max_len, cfg.regime)
                seq += [tok.bos_token_id] + encode(tok, text) + [tok.eos_token_id] * ended
                if cfg.regime != "filler": break
            seqs.append(seq[:max_len + 2])
        return seqs, [0] * len(seqs)
    return next_batch

def sft_batches(tok, cfg, records):
    """SFT batches: trb's prompt format, the worked solution, EOS; loss on the response only."""
    data = [(trb.format_prompt(tok, r["question"]), encode(tok, r["answer"]) + [tok.eos_token_id]) for r in records]
    def next_batch(rng):
        batch = [data[rng.randrange(len(data))] for _ in range(cfg.build_batch)]
        return [p + a for p, a in batch], [len(p) for p, _ in batch]
    return next_batch

def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]

def accuracy(model, tok, problems, max_new_tokens, batch_size=100):
    """Greedy held-out accuracy through eval.py's generate and score (its GSM8K grader), the completions and their
    verdicts."""
    comps, _ = ev.generate(model, tok, [q for q, _, _ in problems], 1, 0.0, max_new_tokens, batch_size, 0,
                           torch.device("cpu"))
    verdicts, summary = ev.score(problems, comps, "gsm8k")
    return summary["accuracy"], [c for c, in comps], [v for v, in verdicts]

# ---------------------------------------------------------------------------------------------------------------------
# the mechanism: the decision ('#' or not where the answer line starts), held out and in the training rollouts

def decision_prefixes(tok, problems, blank=0):
    """Per held-out problem, its prompt + the teacher's steps + a newline: where the answer line ('#### N') starts;
    blank: that many blank lines more."""
    return [trb.format_prompt(tok, q) + encode(tok, r["answer"].split("\n####")[0] + "\n" * (1 + blank))
            for q, _, r in problems]

@torch.inference_mode()
def next_token_p(model, tok, prefixes, char):
    """The model's probability of the token `char` after each prefix, averaged."""
    ids, attn = trb.left_pad(prefixes, tok.pad_token_id, "cpu")
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, -1].float().softmax(-1)[:, tok.convert_tokens_to_ids(char)].mean().item()

def measure(model, tok, problems, max_new_tokens):
    """An evaluation point: greedy accuracy, the shares of greedy answers with no '####' (graded right or not: the
    grader's last-number fallback takes a bare final step) and with '####' and a wrong number, and p('#') and
    p(newline) at the decision prefixes, and p(newline) one blank line later."""
    acc, comps, right = accuracy(model, tok, problems, max_new_tokens)
    at, blank, n = decision_prefixes(tok, problems), decision_prefixes(tok, problems, 1), len(problems)
    return dict(acc=acc, no_hash=sum("####" not in c for c in comps) / n,
                wrong=sum(not r and "####" in c for c, r in zip(comps, right)) / n,
                p_hash=next_token_p(model, tok, at, "#"), p_nl=next_token_p(model, tok, at, "\n"),
                p_nl2=next_token_p(model, tok, blank, "\n"))

def count_decisions(tok, counts):
    """Wraps trb.loss_step (in a worker, before trb.main) to count, per step, the response positions that follow a
    newline and where the teacher's argmax is '#' (the decisions the loss supervises), those where '#' was sampled,
    and the sampled tokens with p < 0.05 under both models. Inference-mode forwards: the run is unchanged."""
    orig, h, nl = trb.loss_step, tok.convert_tokens_to_ids("#"), tok.convert_tokens_to_ids("\n")
    def loss_step(R, rows, roll, k, n_tok):
        c = dict(decisions=0, decisions_hash=0, off_both=0, resp_tok=0)
        with torch.inference_mode():
            for seq, a, r in trb.micro_batches(R, rows, roll):
                m, y, T = r["mask"], r["tokens"], r["mask"].shape[1]
                lt, ls = (trb.response_logits(x, seq, a, T, R.V).float().log_softmax(-1)
                          for x in (R.teacher, R.student))  # (b, T, V) x 2
                d = m & (seq[:, -T - 1:-1] == nl) & (lt.argmax(-1) == h)  # (b, T) after a newline, the teacher: '#'
                low = lambda lp: lp.gather(-1, y[..., None])[..., 0] < math.log(0.05)  # noqa: E731
                c["decisions"] += int(d.sum())
                c["decisions_hash"] += int((d & (y == h)).sum())
                c["off_both"] += int((m & low(lt) & low(ls)).sum())
                c["resp_tok"] += int(m.sum())
        counts[R.step + 1] = c
        return orig(R, rows, roll, k, n_tok)
    trb.loss_step = loss_step

# ---------------------------------------------------------------------------------------------------------------------
# the cache: task, tokenizer, base (the student) and teacher, built once per build config, deterministically

def build_config(cfg):
    return {f: getattr(cfg, f) for f in BUILD_FIELDS}

def build_dir(cfg):
    key = json.dumps(build_config(cfg), sort_keys=True)
    return os.path.join(os.path.expanduser(cfg.cache), "build-" + hashlib.sha256(key.encode()).hexdigest()[:10])

def build(cfg, fresh=False):
    """
    The cached build of cfg, made if missing (or if fresh): (root, build.json's content). One process builds a
    folder at a time; another one waits for it (a lock file beside it), then reads the build.
    """
    root = build_dir(cfg)
    try:
        os.makedirs(os.path.dirname(root), exist_ok=True)
        lock = open(root + ".lock", "a")
    except OSError as e:
        raise trb.UserError(f"--cache {os.path.dirname(root)!r}: cannot write there ({e.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"toy | waiting for another toy.py that builds {root}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if fresh or not os.path.isfile(os.path.join(root, "build.json")):
            n = torch.get_num_threads()
            torch.set_num_threads(1)  # on some CPUs the floats depend on the thread count: one thread everywhere
            try:
                build_files(cfg, root)
            finally:
                torch.set_num_threads(n)
        return root, read_build(root)

def read_build(root, what="the cache", fix="remove it, and the next call builds it again"):
    """build.json of a complete build, or one line."""
    need = ("build.json", "train.jsonl", "test.jsonl", "base/model.safetensors", "base/tokenizer.json",
            "teacher/model.safetensors", "teacher/tokenizer.json")
    missing = [f for f in need if not os.path.isfile(os.path.join(root, f))]
    try:
        with open(os.path.join(root, "build.json")) as f: info = json.load(f)
        if missing or not all(type(info[k]) in (int, float) for k in ("V", "params", "base_acc", "teacher_acc")):
            raise ValueError
        return info
    except (OSError, ValueError, LookupError, TypeError):
        raise trb.UserError(f"{what} {root} is damaged{' (no ' + ', '.join(missing) + ')' if missing else ''}: "
                            f"{fix}") from None

def build_files(cfg, root):
    """
    Writes train.jsonl, test.jsonl, tokenizer/, base/ and teacher/ into root (a .tmp folder first, renamed when
    complete), with build.json (the config and both models' greedy held-out accuracy) and times.json. The same
    config gives the same files on the same machine and thread count.
    """
    tmp, t0 = root + ".tmp", time.time()
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    print(f"toy | building the task and models in {root} (once)", flush=True)
    train, test = make_splits(cfg.task_seed, cfg.n_train, cfg.n_test)
    write_jsonl(os.path.join(tmp, "train.jsonl"), train)
    write_jsonl(os.path.join(tmp, "test.jsonl"), test)
    tok = make_tokenizer(os.path.join(tmp, "tokenizer"))
    problems = ev.load_problems("gsm8k", os.path.join(tmp, "test.jsonl"))
    base = fit(new_model(tok, cfg), base_batches(tok, cfg), cfg.pretrain_steps, cfg.build_lr, cfg.task_seed + 1, "base")
    t1 = time.time()
    info = dict(config=build_config(cfg), V=len(tok),
                params=sum(p.numel() for p in base.parameters()), base_acc=accuracy(base, tok, problems,
                                                                                     BUILD_MAX_NEW)[0])
    save_model(base, tok, os.path.join(tmp, "base"))
    t2 = time.time()
    teacher = fit(base, sft_batches(tok, cfg, train), cfg.sft_steps, cfg.build_lr, cfg.task_seed + 2, "teacher")
    t3 = time.time()
    info["teacher_acc"] = accuracy(teacher, tok, problems, BUILD_MAX_NEW)[0]
    save_model(teacher, tok, os.path.join(tmp, "teacher"))
    times = dict(pretrain_s=round(t1 - t0, 1), sft_s=round(t3 - t2, 1), total_s=round(time.time() - t0, 1),
                 threads=torch.get_num_threads())
    for name, obj in (("build.json", info), ("times.json", times)):
        with open(os.path.join(tmp, name), "w") as f: json.dump(obj, f, indent=1)
    with open(os.path.join(tmp, SUMS), "w") as f: f.writelines(f"{h}  {p}\n" for p, h in sums(tmp).items())
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    print(f"toy | built in {times['total_s']:.0f}s: V={info['V']}, {info['params']} parameters per model, held-out "
          f"greedy accuracy base {info['base_acc']:.3f}, teacher {info['teacher_acc']:.3f}", flush=True)

def save_model(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)

def sums(root, skip=("times.json", SUMS)):
    """{path: sha256} of the files under root but those in skip (times.json: wall times), sorted by path."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.relpath(os.path.join(d, f), root)
            if p not in skip:
                with open(os.path.join(d, f), "rb") as fh: out[p] = hashlib.sha256(fh.read()).hexdigest()
    return dict(sorted(out.items()))

def shipped(cfg):
    """
    The build shipped in toy-build/REGIME/, (root, build.json's content), if cfg's build flags are its own, else None.
    Used only as it was shipped: each file as SHA256SUMS lists it, the task and vocab what this code makes (the
    models' staleness is --check's to find: it rebuilds them); else one line.
    """
    ship = os.path.join(SHIPPED, cfg.regime)
    if not os.path.isdir(ship): return None
    try:
        with open(os.path.join(ship, "build.json")) as f:
            if json.load(f)["config"] != build_config(cfg): return None
    except (OSError, ValueError, LookupError, TypeError):    # damaged: the checks below say how
        pass
    name = f"the shipped build {ship}"
    try:
        with open(os.path.join(ship, SUMS)) as f: lines = f.read().splitlines()
        listed = {p: h for h, p in (x.split("  ", 1) for x in lines)}
    except (OSError, ValueError, UnicodeDecodeError):
        raise trb.UserError(f"{name} has no readable {SUMS}: restore it (git checkout -- toy-build)") from None
    now = sums(ship)
    bad = [p for p, h in listed.items() if now.get(p) != h]
    if bad or not listed:
        raise trb.UserError(f"{name} is not what its {SUMS} lists (edited or damaged: {', '.join(bad[:3]) or SUMS}"
                            f"{', ...' if len(bad) > 3 else ''}): restore it (git checkout -- toy-build)")
    info = read_build(ship, "the shipped build", "restore it (git checkout -- toy-build)")
    made = dict(zip(("train.jsonl", "test.jsonl"), make_splits(cfg.task_seed, cfg.n_train, cfg.n_test)))
    stale = [f for f, recs in made.items() if now[f] != hashlib.sha256(jsonl(recs).encode()).hexdigest()]
    with open(os.path.join(ship, "base", "tokenizer.json")) as f: vocab = json.load(f)["model"]["vocab"]
    stale += ["base/tokenizer.json's vocab"] * (vocab != make_vocab())
    if stale: raise trb.UserError(f"{name} is stale ({', '.join(stale)}: not what this toy.py makes now): rebuild and "
                                  f"ship it (python toy.py --check says how)")
    return ship, info

def compare_shipped(root, regime):
    """--check: the fresh build in root against toy-build/REGIME/, every file but times.json, or one line."""
    d = os.path.join(SHIPPED, regime)
    mine, ship = sums(root, ("times.json",)), sums(d, ("times.json",)) if os.path.isdir(d) else {}
    diff = sorted(p for p in mine.keys() | ship.keys() if mine.get(p) != ship.get(p))
    if diff:
        raise trb.UserError(f"the shipped build {d} is not what this code builds: {len(diff)} of "
                            f"{len(mine | ship)} files differ ({', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''})"
                            f"; to ship the fresh build: rm -r {d} && cp -r {root} {d} && rm {d}/times.json")
    print(f"toy | the shipped build {d} is what this code builds: its {len(mine)} files are byte-identical to the "
          f"fresh build's in {root}", flush=True)

# ---------------------------------------------------------------------------------------------------------------------
# the runs: every method is trb.main with its flags, resumed from one evaluation point to the next

def method_flags(cfg, method):
    """trb.py's flags of each method (README, 'The paper's baselines'); SKD and the SFT warmup last K steps."""
    K = str(cfg.warmup_steps)
    flags = dict(opd=["--eps0", "0"], trb=["--eps0", str(cfg.eps0)],
                 fixed_eps=["--eps0", str(cfg.eps0), "--schedule", "constant"],
                 skd=["--eps0", "0", "--skd_topk", str(cfg.skd_topk), "--skd_steps", K],
                 veto=["--eps0", "0", "--veto_beta", str(cfg.veto_beta)],
                 temp_warmup=["--eps0", "0", "--temp_warmup", str(cfg.temp_warmup)],
                 sft_warmup=["--eps0", "0", "--sft_warmup_steps", K])
    if method.startswith("trb-eps"): return ["--eps0", method[len("trb-eps"):]]
    return flags[method]

def common_flags(cfg, root):
    """The flags every method shares: the cached models and data, the protocol, a checkpoint at each point."""
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    return ["--student", p("base"), "--teacher", p("teacher"), "--data", p("train.jsonl"), "--eval_data",
            p("test.jsonl"), "--eval_prompts", "64", "--eval_every", str(cfg.every), "--warmup_steps",
            str(cfg.warmup_steps), "--batch_size", str(cfg.batch_size), "--n_samples", str(cfg.n_samples),
            "--micro_batch_size", str(cfg.batch_size * cfg.n_samples), "--max_new_tokens", str(cfg.max_new_tokens),
            "--lr", str(cfg.lr), "--lr_warmup_steps", "5", "--loss_topk", str(cfg.loss_topk), "--save_every",
            str(math.gcd(cfg.every, cfg.warmup_steps)), "--max_steps", str(cfg.steps),
            "--device", "cpu", "--dtype", "float32", "--spec_tokens", "0"]  # the lock-step sampler the protocol
                                                                              # and its tables were made with

def eval_points(cfg):
    """The steps with an accuracy and an eval_kl: every --every steps, K and the end (step 0 is the base's)."""
    return sorted({*range(cfg.every, cfg.steps, cfg.every), cfg.warmup_steps, cfg.steps} - {0})

def plan(cfg, root, names, seeds):
    """One spec per (method, seed): what run_one needs, all plain data (it crosses into a worker process)."""
    specs = []
    for name in names:
        for seed in seeds:
            run = f"{name}-s{seed}"
            argv = common_flags(cfg, root) + method_flags(cfg, name) + ["--seed", str(seed)]
            specs.append(dict(name=name, seed=seed, regime=cfg.regime, argv=argv, points=eval_points(cfg),
                              test=os.path.join(root, "test.jsonl"), eval_n=cfg.eval_n,
                              max_new_tokens=cfg.max_new_tokens, out_dir=os.path.join(cfg.out, "runs", run),
                              result=os.path.join(cfg.out, run + ".json")))
    return specs

def run_one(spec, base):
    """
    One method and seed, in the fresh out_dir claim() made: one trb.main run, a checkpoint at every point (--save_every
    divides them), then each point's checkpoint measured. Writes and returns the result: per point step, accuracy,
    eval_kl and the decision's numbers (measure; step 0: the base's), and the per-step training records with the
    decisions counted (count_decisions).
    """
    d, t0, counts = spec["out_dir"], time.time(), {}
    problems = ev.load_problems("gsm8k", spec["test"], spec["eval_n"])
    tok, rows = trb.load_tokenizer(spec["argv"][spec["argv"].index("--student") + 1]), [dict(step=0, **base)]
    count_decisions(tok, counts)
    trb.main(spec["argv"] + ["--out_dir", d])
    for step in spec["points"]:
        model = trb.load_model(os.path.join(d, f"checkpoint-{step}"), torch.float32, torch.device("cpu")).eval()
        rows.append(dict(step=step, **measure(model, tok, problems, spec["max_new_tokens"])))
    recs = trb.read_metrics(os.path.join(d, "metrics.jsonl"))
    kl = {r["step"]: r["eval_kl"] for r in recs if "eval_kl" in r}
    for r in rows: r["eval_kl"] = kl.get(r["step"])
    keep = ("step", "loss", "beta", "frac_teacher", "resp_len", "teacher_logp", "skd_rate", "dt")
    train = [{**{k: r[k] for k in keep if k in r}, **counts.get(r["step"], {})} for r in recs if "loss" in r]
    res = dict(name=spec["name"], seed=spec["seed"], regime=spec.get("regime"), argv=spec["argv"],
               eval_n=spec["eval_n"], points=rows,
               seconds=round(time.time() - t0, 1), train=train)
    save(spec["result"], json.dumps(res))
    return res

def claim(spec, make=True):
    """
    A fresh out_dir for a run, marked as toy.py's (MARK, a file of its own there, which trb leaves alone). What
    toy.py made before under its name (the folder, its log) goes; anything else there, or a result file of that name
    that is not a run's result, stops the call with one line: nothing of the user's is removed.
    """
    d, res = spec["out_dir"], spec["result"]
    there = [p for p in (d, d + ".log") if os.path.lexists(p)]
    if there and not any(os.path.isfile(os.path.join(p, MARK)) for p in there if os.path.isdir(p)):
        raise trb.UserError(f"{there[0]} was not made by toy.py (it has no {MARK} file): move it away or choose "
                            f"another --out")
    if os.path.lexists(res) and not is_result(res):
        raise trb.UserError(f"{res} is not a toy.py result: move it away or choose another --out")
    if not make: return
    try:
        for p in there: shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        os.makedirs(d)
        open(os.path.join(d, MARK), "w").close()
    except OSError as e:
        raise trb.UserError(f"{d}: cannot make the run's folder ({e.strerror})") from None

def save(path, text):
    """text into path atomically: a reader finds the old file or the new one, never a part."""
    with open(path + ".part", "w") as f: f.write(text)
    os.replace(path + ".part", path)

def is_result(path, keys=("argv", "points", "seed")):
    """Whether path is a JSON object with these keys: a run's result, or (config, build, runs) a table's summary."""
    try:
        with open(path) as f: return set(keys) <= set(json.load(f))
    except (OSError, ValueError, TypeError):
        return False

def worker(spec, base):
    """run_one in a worker process: one thread, trb's and eval's output into the run's log file, which ends with
    the error, if any (exit status 1). Ctrl-C is the main process's to handle; its SIGTERM ends the run cleanly."""
    import multiprocessing
    from multiprocessing.connection import wait
    signal.signal(signal.SIGINT, signal.SIG_IGN)             # Ctrl-C is the main process's (a pending one goes)
    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)      # blocked since it started: see run_all
    parent = multiprocessing.parent_process().sentinel      # a main process that is killed takes its workers along
    threading.Thread(target=lambda: (wait([parent]), os._exit(1)), daemon=True).start()
    torch.set_num_threads(1)
    with open(spec["out_dir"] + ".log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            run_one(spec, base)
            return
        except (SystemExit, trb.UserError) as e:  # trb.main's and eval's one-line errors; 1: stopped (SIGTERM)
            if not isinstance(getattr(e, "code", None), int): print(e, flush=True)
        except Exception:
            traceback.print_exc()
    sys.exit(1)

def finished(spec):
    """The result of an earlier run with the same flags, points and accuracy problems (under any name in --out), or
    None. A file that is not such a result is passed over."""
    out = os.path.dirname(spec["result"])
    if not os.path.isdir(out): return None
    names = [spec["result"]] + sorted(os.path.join(out, f) for f in os.listdir(out) if re.search(r"-s\d+\.json$", f))
    for path in names:
        try:
            with open(path) as f: res = json.load(f)
            same = (res["argv"], res["eval_n"], [p["step"] for p in res["points"][1:]]) == (
                spec["argv"], spec["eval_n"], spec["points"])
            num = (int, float)
            ok = type(res["seconds"]) in num and type(res["seed"]) is int and all(type(t["resp_len"]) in num for t in
                                                                                  res["train"])
            ok = ok and all(type(p["acc"]) in num and type(p["eval_kl"]) in (*num, type(None)) and
                            type(p["p_hash"]) in num for p in res["points"])
            ok = ok and all("decisions" in t for t in res["train"])
        except (OSError, ValueError, LookupError, TypeError):  # unreadable, not JSON, not a result
            continue
        if same and ok: return dict(res, name=spec["name"])
    return None

def prepare(specs):
    """Each run's earlier result (read once, here or when the run ends), or None: then its fresh folder (claim)."""
    res = [finished(s) for s in specs]
    todo = [s for s, r in zip(specs, res) if r is None]
    for s in todo: claim(s, make=False)                      # all checked before any is made or run: a foreign
    for s in todo: claim(s)                                  # folder stops the call before it changes anything
    return res

def run_all(specs, base, jobs, res=None):
    """The runs not finished before (res: prepare's, if main called it), `jobs` at a time, each in a spawned process
    with OMP_NUM_THREADS=1. A run that fails or dies stops the call with one line; on that or a signal the other
    workers are stopped at once (a run cut off starts again at the next call)."""
    import multiprocessing
    from multiprocessing import resource_tracker
    from multiprocessing.connection import wait
    res = prepare(specs) if res is None else res
    todo, live, t0 = [i for i, r in enumerate(res) if r is None], {}, time.time()
    print(f"toy | {len(specs) - len(todo)} of {len(specs)} runs read back from earlier; running {len(todo)}, "
          f"{jobs} at a time (logs: {os.path.dirname(specs[0]['out_dir'])}/*.log)", flush=True)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
                      PYTHONWARNINGS="ignore:resource_tracker:UserWarning")  # it frees what a stopped worker held
    resource_tracker.ensure_running()                        # now: starting it later would unblock the signals
    try:
        while todo or live:
            while todo and len(live) < jobs:
                i = todo.pop(0)
                p = multiprocessing.get_context("spawn").Process(target=worker, args=(specs[i], base))
                signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # until p is in `live`; p starts with them
                try:                                                # blocked (no traceback while it imports)
                    p.start()
                    live[p.sentinel] = (p, i)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            for key in wait(list(live)):
                p, i = live.pop(key)
                p.join()
                s, r = specs[i], finished(specs[i])
                res[i], name = r, f"{s['name']}-s{s['seed']}"
                if p.exitcode or r is None:
                    why = f"its worker was killed (signal {-p.exitcode})" if p.exitcode < 0 else \
                        last_line(s["out_dir"] + ".log") or f"exit {p.exitcode}"
                    raise trb.UserError(f"run {name}: {why} (its log: {s['out_dir']}.log)")
                end = r["points"][-1]
                print(f"toy | {name}: accuracy {end['acc']:.3f}, eval_kl {end['eval_kl']:.4f} at step {end['step']} | "
                      f"{r['seconds']:.0f}s (elapsed {time.time() - t0:.0f}s)", flush=True)
    finally:
        for p, _ in live.values(): p.terminate()             # no worker outlives this call: trb stops cleanly,
        for p, _ in live.values():                           # or it is killed (its checkpoints are atomic)
            p.join(5)
            if p.exitcode is None: p.kill()
    return res

SIGNALS = {signal.SIGINT, signal.SIGTERM}

def last_line(path):
    try:
        with open(path, errors="replace") as f: lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""

# ---------------------------------------------------------------------------------------------------------------------
# the report: tables (mean ± std over seeds at step 0, K/2, K and the end; the paired TRB - OPD difference per seed;
# the decision's numbers) and a figure (mean and min-max band per method against step)

def by_method(results):
    out = {}
    for r in results: out.setdefault(r["name"], {})[r["seed"]] = r
    return out

def at(res, step, key):
    return next(p[key] for p in res["points"] if p["step"] == step)

def mean_std(xs, digits=3):
    """'mean ± std' (sample std) of xs; '–' if one is missing or never reached (inf)."""
    if not xs or any(x is None or x == math.inf for x in xs): return "–"
    m = sum(xs) / len(xs)
    if len(xs) == 1: return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)):.{digits}f}"

def mid(cfg):
    """The evaluation point nearest the middle of the warmup (step 20 of K = 40)."""
    return min(eval_points(cfg), key=lambda s: abs(s - cfg.warmup_steps / 2))

def table(cfg, results, teacher, ref="opd"):
    """The report in markdown: per method at step 0, K/2, K and the end, then each method's paired difference to
    ref, then the decision's numbers (mechanism)."""
    K, N, M, runs = cfg.warmup_steps, cfg.steps, mid(cfg), by_method(results)
    cols = [(f"acc @{s}", lambda r, s=s: at(r, s, "acc")) for s in (0, M, K, N)]
    cols += [(f"eval_kl @{s}", lambda r, s=s: at(r, s, "eval_kl")) for s in (0, K, N)]
    cols.append(("step of acc ≥ 0.9", first_step))
    lines = [f"Greedy accuracy on {cfg.eval_n} held-out problems (eval.py's grader; the teacher's: "
             f"{teacher['acc']:.3f}) and trb's eval_kl, mean ± std over seeds, at step 0, mid-warmup ({M}), the end "
             f"of the warmup (K={K}) and the end ({N}); the first evaluated step (every {cfg.every}) with accuracy "
             f"≥ 0.9.", "",
             "| method | seeds | " + " | ".join(c for c, _ in cols) + " | s/run |", "|---|---:|" + "---:|" * len(cols)
             + "---:|"]
    for name, seeds in runs.items():
        rs = list(seeds.values())
        cells = [mean_std([f(r) for r in rs], 1 if c.startswith("step") else 3) for c, f in cols]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {mean([r['seconds'] for r in rs]):.0f} |")
    for name in [n for n in runs if n != ref and ref in runs]:
        seeds = sorted(set(runs[name]) & set(runs[ref]))
        if seeds: lines += [""] + paired(runs[name], runs[ref], seeds, f"{name} − {ref}", cols[1:4] + cols[5:])
    return "\n".join(lines + [""] + mechanism(cfg, runs, teacher)) + "\n"

def warmup_mean(res, key, K, per=None):
    """Over the warmup's training steps (1..K): the mean of key per step, or with per, sum(key) / sum(per)."""
    t = [x for x in res["train"] if x["step"] <= K]
    n = sum(x[per] for x in t) if per else len(t)
    return sum(x[key] for x in t) / n if n else None

def mechanism(cfg, runs, teacher):
    """The decision's numbers per method, mean ± std over seeds: p('#') where the answer line starts and p(newline)
    there and one blank line later, and the greedy answers' failures, at mid-warmup and K; over the warmup's steps,
    the decisions supervised per step, the share of them where '#' was sampled, and the tokens neither model writes
    (p < 0.05 under both) per response token."""
    K, M = cfg.warmup_steps, mid(cfg)
    cols = [(f"p(#) @{s}", lambda r, s=s: at(r, s, "p_hash")) for s in (0, M, K)]
    cols += [(f"p(\\n) @{M}", lambda r: at(r, M, "p_nl")), (f"p(\\n) after a blank @{M}", lambda r: at(r, M, "p_nl2"))]
    cols += [(f"no #### @{M}", lambda r: at(r, M, "no_hash")), (f"wrong number @{M}", lambda r: at(r, M, "wrong"))]
    cols += [("decisions / step, 1..K", lambda r: warmup_mean(r, "decisions", K)),
             ("'#' sampled there", lambda r: warmup_mean(r, "decisions_hash", K, "decisions")),
             ("off-both tokens", lambda r: warmup_mean(r, "off_both", K, "resp_tok"))]
    lines = [f"The decision (answer line: '#', or a blank line / filler), mean ± std over seeds. p(#), p(\\n): the "
             f"student's next-token probabilities after a held-out prompt + the teacher's steps + a newline (the "
             f"teacher's: p(#) {teacher['p_hash']:.3f}); 'after a blank': one newline more. no ####: the share of "
             f"greedy answers without '####' (right or not: the grader's last-number fallback takes a bare last "
             f"step); wrong number: with '####', wrong. Over training steps 1..K: the response positions after a "
             f"newline where the teacher's argmax is '#' (decisions supervised), the share of them where '#' was "
             f"sampled, and the share of response tokens with p < 0.05 under both models.", "",
             "| method | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, seeds in runs.items():
        rs = list(seeds.values())
        lines.append(f"| {name} | " + " | ".join(mean_std([f(r) for r in rs], 1 if c.startswith("dec") else 3)
                                                   for c, f in cols) + " |")
    return lines

def first_step(res, level=0.9):
    """The first evaluated step with accuracy >= level (inf if none)."""
    return next((p["step"] for p in res["points"] if p["acc"] >= level), math.inf)

def paired(a, b, seeds, title, cols):
    """Markdown lines: a - b per seed for each column (label, value of a result), and their mean ± std."""
    def diff(s, f):
        x, y = f(a[s]), f(b[s])
        return None if x is None or y is None or math.inf in (x, y) else x - y
    rows = {s: [diff(s, f) for _, f in cols] for s in seeds}
    fmt = lambda x, c: "–" if x is None else f"{x:+.0f}" if c.startswith("step") else f"{x:+.3f}"  # noqa: E731
    lines = [f"Paired {title}, per seed (the same prompts in the same order):", "",
             "| seed | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {s} | " + " | ".join(fmt(x, c) for x, (c, _) in zip(rows[s], cols)) + " |" for s in seeds]
    return lines + ["| mean ± std | " + " | ".join(mean_std([rows[s][j] for s in seeds], 1 if c.startswith("step")
                                                            else 3) for j, (c, _) in enumerate(cols)) + " |"]

def mean(xs):
    return sum(xs) / len(xs)

def figure(results, K, path):
    """Accuracy, eval_kl and training rollout length against step: per method the mean and the min-max band."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the result; the figure is a view of it
        print("toy | no figure: it needs matplotlib (pip install matplotlib)", flush=True)
        return None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    axes = axes.ravel()
    for c, (name, seeds) in enumerate(by_method(results).items()):
        rs = list(seeds.values())
        for ax, key in zip(axes, ("acc", "eval_kl", "len", "p_hash", "decisions", "off_both")):
            cs = [xy for xy in (series(r, key) for r in rs) if None not in xy[1]]
            if not cs: continue
            x, ys = cs[0][0], list(zip(*[y for _, y in cs]))
            ax.plot(x, [mean(v) for v in ys], color=f"C{c}", marker="o" if key != "len" else None, ms=3,
                    label=f"{name} ({len(rs)} seed{'s' * (len(rs) > 1)})")
            if len(cs) > 1: ax.fill_between(x, [min(v) for v in ys], [max(v) for v in ys], color=f"C{c}", alpha=0.15)
    titles = ("greedy held-out accuracy (eval.py)", "held-out reverse KL (trb eval_kl)", "training rollout length",
              "student p('#') where the answer line starts", "decisions supervised per step",
              "share of sampled tokens with p < 0.05 under both models")
    for ax, title in zip(axes, titles):
        ax.axvline(K, color="gray", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".part", dpi=120, format="png")
    os.replace(path + ".part", path)
    plt.close(fig)
    return path

def series(res, key):
    """(steps, values) of one run: at its evaluation points ('acc', 'eval_kl', 'p_hash'), or per training step ('len',
    the rollout length; 'decisions'; 'off_both', a share of the response tokens)."""
    t = res["train"]
    if key == "len": return [x["step"] for x in t], [x["resp_len"] for x in t]
    if key == "off_both": return [x["step"] for x in t], [x["off_both"] / x["resp_tok"] for x in t]
    if key == "decisions": return [x["step"] for x in t], [x["decisions"] for x in t]
    return [p["step"] for p in res["points"]], [p[key] for p in res["points"]]

# ---------------------------------------------------------------------------------------------------------------------
# command line

def check(cfg, given):
    """Every flag, before anything is built or run: toy's own, and each run's trb.py flags through trb's checks."""
    for name in ("seeds", "jobs", "n_train", "n_test", "eval_n", "layers", "hidden", "pretrain_steps", "sft_steps",
                 "build_batch", "steps", "every", "batch_size", "n_samples", "max_new_tokens", "sweep_seeds"):
        if getattr(cfg, name) < 1: raise trb.UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name, most in MOST.items():  # beyond these a call would exhaust memory or processes before it said so
        if getattr(cfg, name) > most: raise trb.UserError(f"--{name} must be <= {most}, got {getattr(cfg, name)}")
    for name in ("fmt_rate", "end_rate"):
        x = getattr(cfg, name)
        if not 0 <= x <= 1: raise trb.UserError(f"--{name} must be in [0, 1], got {x}")
    if not 0 <= cfg.task_seed < 2**32: raise trb.UserError(f"--task_seed must be in [0, 2^32), got {cfg.task_seed}")
    if cfg.hidden % 4: raise trb.UserError(f"--hidden must be a multiple of the 4 heads, got {cfg.hidden}")
    if cfg.eval_n > cfg.n_test:
        raise trb.UserError(f"--eval_n {cfg.eval_n} is more than the {cfg.n_test} test problems")
    if not 1 <= cfg.warmup_steps <= cfg.steps:
        raise trb.UserError(f"--warmup_steps must be in [1, --steps {cfg.steps}], got {cfg.warmup_steps}")
    if not 0 < cfg.build_lr < math.inf: raise trb.UserError(f"--build_lr must be > 0, got {cfg.build_lr}")
    if cfg.sweep and given & {"quick", "methods", "seeds"}:
        raise trb.UserError(f"--sweep runs OPD and TRB at each --sweep_eps0 over --sweep_seeds seeds: drop "
                            f"--{', --'.join(sorted(given & {'quick', 'methods', 'seeds'}))}")
    if cfg.quick and "seeds" in given: raise trb.UserError("--quick runs one seed: drop --seeds (or --quick)")
    V = len(SPECIALS) + len(charset())
    for name in ("loss_topk", "skd_topk"):
        if getattr(cfg, name) > V: raise trb.UserError(f"--{name} {getattr(cfg, name)} is larger than the {V}-token "
                                                       f"vocab")
    if MAX_PROMPT + cfg.max_new_tokens > POSITIONS:
        raise trb.UserError(f"--max_new_tokens must be <= {POSITIONS - MAX_PROMPT}: prompts of up to {MAX_PROMPT} "
                            f"tokens and their responses fit the models' {POSITIONS} positions")
    if not regimes(cfg) or not set(regimes(cfg)) <= set(REGIMES) or len(set(regimes(cfg))) < len(regimes(cfg)):
        raise trb.UserError(f"--regime must name each of {', '.join(REGIMES)} at most once, got {cfg.regime!r}")
    names, _ = runs_of(cfg)
    bad = [m for m in names if m not in METHODS and eps_of(m) is None]
    if bad: raise trb.UserError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}, or trb-epsX "
                                f"(TRB at eps0 = X > 0, as --sweep names its runs)")
    if not names or len(set(names)) < len(names):
        raise trb.UserError(f"--sweep_eps0 must name each budget once, got {cfg.sweep_eps0!r}" if cfg.sweep else
                            f"--methods must name each method once, got {cfg.methods!r}")
    off = dict(trb="eps0", fixed_eps="eps0", skd="skd_topk", veto="veto_beta", temp_warmup="temp_warmup")
    for m in names:
        if m in off and not getattr(cfg, off[m]) > 0:  # at 0 the method would be plain OPD under its name
            raise trb.UserError(f"--{off[m]} must be > 0 for {m}, got {getattr(cfg, off[m])}")
        argv = common_flags(cfg, "") + method_flags(cfg, m) + ["--seed", "0"]
        trb.check_config(trb.parse_args(argv)[0])            # trb.py's own checks of each run's flags

def runs_of(cfg):
    """The methods and seeds a call runs: --sweep's, --quick's, or --methods x --seeds."""
    if cfg.sweep: return ["opd"] + [f"trb-eps{v:g}" for v in sweep_values(cfg)], range(cfg.sweep_seeds)
    names = [m.strip() for m in cfg.methods.split(",") if m.strip()] if cfg.methods else \
        ["opd", "trb"] if cfg.quick else list(METHODS)
    return names, range(1 if cfg.quick else cfg.seeds)

def eps_of(name):
    """X of a run name 'trb-epsX' (--sweep's), a number > 0, else None."""
    try:
        x = float(name[len("trb-eps"):]) if name.startswith("trb-eps") else None
    except ValueError:
        return None
    return x if x is not None and 0 < x < math.inf else None

def sweep_values(cfg):
    try:
        vals = [float(v) for v in cfg.sweep_eps0.split(",") if v.strip()]
    except ValueError:
        raise trb.UserError(f"--sweep_eps0 must be comma-separated numbers, got {cfg.sweep_eps0!r}") from None
    if not vals or not all(0 < v < math.inf for v in vals):
        raise trb.UserError(f"--sweep_eps0 must list budgets > 0, got {cfg.sweep_eps0!r}")
    return vals

def main(argv=None):
    trb.keep_freed_memory()
    trb.quiet_progress_bars()
    cfg, given = trb.parse_config(ToyConfig, argv, "The paper's comparison on a procedural arithmetic task with a "
                                                   "tiny base student and instruct teacher, on a CPU")
    old, lock = signal.signal(signal.SIGTERM, interrupt), None  # a SIGTERM stops the workers too, like Ctrl-C
    try:
        check(cfg, given)
        cfg = dataclasses.replace(cfg, build_only=cfg.build_only or cfg.check)
        t0, cache = time.time(), folder(cfg.cache, "--cache")
        if not cfg.build_only:
            cfg = dataclasses.replace(cfg, out=folder(cfg.out, "--out"))
            try:
                lock = trb.lock_out_dir(cfg.out)             # one toy.py per --out
            except trb.UserError as e:
                raise trb.UserError(str(e).replace("--out_dir", "--out").replace("trb.py", "toy.py")) from None
        out = []
        for regime in regimes(cfg):
            r_cfg = dataclasses.replace(cfg, regime=regime, out=os.path.join(cfg.out, regime), cache=cache)
            out.append(run_regime(r_cfg, t0) if not cfg.build_only else build_regime(r_cfg)[1])
        return out if cfg.build_only else sum(out, [])     # the builds' infos, or the runs' results
    except KeyboardInterrupt:
        raise SystemExit("toy: interrupted; the runs that finished are read back by the next call, a run that was "
                         "cut off starts again") from None
    except trb.UserError as e:
        raise SystemExit(f"toy: error: {e}")
    finally:
        signal.signal(signal.SIGTERM, old)
        if lock is not None: trb.unlock(lock)

def build_regime(cfg):
    """The regime's build: shipped, or built into --cache (--check: afresh, then compared with the shipped one)."""
    root, info = (None if cfg.build_only else shipped(cfg)) or build(cfg, fresh=cfg.check)
    if cfg.check: compare_shipped(root, cfg.regime)
    print(f"toy | {cfg.regime}: build {root}: V={info['V']}, {info['params']} parameters per model; held-out greedy "
          f"accuracy base (the student at step 0) {info['base_acc']:.3f}, teacher {info['teacher_acc']:.3f}",
          flush=True)
    return root, info

def run_regime(cfg, t0):
    """One regime's runs, read back or run, and its table, JSON and figure in --out/REGIME/. Returns the results."""
    mode = "sweep" if cfg.sweep else "quick" if cfg.quick else "compare"
    paths = [os.path.join(cfg.out, f"{mode}.{ext}") for ext in ("md", "json", "png")]
    if any(map(os.path.lexists, paths)) and not is_result(paths[1], ("config", "build", "runs")):
        raise trb.UserError(f"{next(filter(os.path.lexists, paths))} was not written by toy.py (no {mode}.json of "
                            f"its own beside it): move it away or choose another --out")
    root, info = build_regime(cfg)
    specs = plan(cfg, root, *runs_of(cfg))
    done = prepare(specs)                                    # before the models load: a foreign run folder stops it
    problems = ev.load_problems("gsm8k", os.path.join(root, "test.jsonl"), cfg.eval_n)
    tok = trb.load_tokenizer(os.path.join(root, "base"))
    base, teacher = (measure(trb.load_model(os.path.join(root, m), torch.float32, torch.device("cpu")).eval(), tok,
                             problems, cfg.max_new_tokens) for m in ("base", "teacher"))
    results = run_all(specs, base, cfg.jobs, done)           # base: every run's step 0 (the base student, greedy)
    text = f"Regime: {cfg.regime}.\n\n" + table(cfg, results, teacher)
    save(paths[0], text)
    save(paths[1], json.dumps(dict(config=dataclasses.asdict(cfg), build=info, teacher=teacher, runs=results)))
    paths[2] = figure(results, cfg.warmup_steps, paths[2])
    print(text + f"\ntoy | {' '.join(p for p in paths if p)} | {time.time() - t0:.0f}s in all", flush=True)
    return results

def regimes(cfg):
    return [r.strip() for r in cfg.regime.split(",") if r.strip()]

def interrupt(signum, frame):
    raise KeyboardInterrupt

def stop(signum, frame):
    raise SystemExit(1)

def folder(path, flag):
    """path with ~ expanded and made absolute, not a file and not in the shipped build, or one line."""
    if not path: raise trb.UserError(f"{flag} must not be empty")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path): raise trb.UserError(f"{flag} {path!r} is a file")
    if os.path.commonpath([os.path.realpath(path), os.path.realpath(SHIPPED)]) == os.path.realpath(SHIPPED):
        raise trb.UserError(f"{flag} {path!r} is in the shipped build {SHIPPED}, which toy.py never writes to")
    return path

if __name__ == "__main__":
    main()
