"""
GSM8K and MATH exact match for a trb.py checkpoint, for each checkpoint of a run, or for any HF causal LM: pass@1
averaged over n samples.

  python eval.py --model out-trb --task gsm8k [--limit 100]       # a run directory: its newest checkpoint
  python eval.py --model out-trb --checkpoints all --plot          # each kept checkpoint: step, accuracy, the best
  python eval.py --model out-trb/checkpoint-200 --task math500 --data_file ../shared/data/math500/test.jsonl
  python eval.py --plot out-trb out-opd --plot_out compare.png      # curves of trb.py runs (metrics.jsonl)

Data: gsm8k = openai/gsm8k (main, test); math500 = HuggingFaceH4/MATH-500 (test); math = the full 5,000-problem
MATH test split of DigitalLearningGmbH/MATH-lighteval. --data_file reads the same field names from local JSONL.
Prompts are trb.py's (same chat template, same system prompt). Generation is trb.rollout at eps = 0: the
same batched, left-padded, KV-cached loop as training, which bench.py measures against HF generate.
Grading: the last \\boxed{...}, else '#### x', else the last 'the answer is x' or 'Answer: x', else (GSM8K) the last
number; compared by normalised string equality, then (GSM8K) as numbers, then by math-verify (Hugging Face's grader).
  - '#### x' is an answer where x starts with a number or a LaTeX command: '#### Step 1: ...' and '#### 1. Eggs' are
    markdown headings. GSM8K takes 'the answer is x' and 'Answer: x' likewise ('the answer is right' is none).
  - GSM8K: a number followed by a unit, words or punctuation is that number ('18 dollars', '**18**', '$1,080.00',
    '18!', '18%'); a number followed by an operator and a number is not ('18 - 3', '1/2', '3:30': graded whole). A
    minus after a word or a digit is no sign: the last number of '10-20' is 20.
  - Run-ons: GSM8K's '#### x' closes a solution, so a base model that writes a new problem after its first '#### x'
    is graded on that x, whatever follows. In both tasks a line that opens a new problem (Question:, Problem:, Q:,
    Human:, User:) after a stated answer (\\boxed, '#### x', 'the answer is x') ends the completion there; after a
    bare last number it does not (sub-questions 'Q: ... A: 9' before a \\boxed{} answer are no run-on).
  - Markdown bold and the unicode minus sign are read as plain text; LaTeX's thousands separator {,} is a comma.
  - A hedge between two values ('18 or 20', '18 to 20', 'between 18 and 20', 'either 18 or 20') is graded whole,
    so it equals no single gold.
"""
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while torch imports: one line, not a traceback
    sys.excepthook = lambda t, e, tb: (print("eval: interrupted", file=sys.stderr) if t is KeyboardInterrupt else
                                       sys.__excepthook__(t, e, tb))

import torch

import trb

TASKS = {  # task -> (hub dataset args, split, problem field)
    "gsm8k": (("openai/gsm8k", "main"), "test", "question"),
    "math500": (("HuggingFaceH4/MATH-500",), "test", "problem"),
    "math": (("DigitalLearningGmbH/MATH-lighteval",), "test", "problem"),
}

# -----------------------------------------------------------------------------
# answer extraction and grading

def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces) or \\boxed x; None if there is none."""
    i = text.rfind("\\boxed")
    if i < 0: return None
    j = i + len("\\boxed")
    if text[j:j + 1] == "{":
        depth = 0
        for k in range(j, len(text)):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0: return text[j + 1:k].strip()
        return None
    m = re.match(r"\s+([^\s$]+)", text[j:])
    return m.group(1).rstrip(".") if m else None

NUM = r"(?:(?<![\w)])-)?\$?\d+(?:,\d{3})*(?:\.\d+)?"  # a sign only after no word or number: 10-20 is not -20
LEAD = NUM.join((r"(?:[^\w\n]|\\text\{){0,9}?(", r")(?!\d|[.:]\d|,\s*\d|\s*[-+*/^×÷x]\s*\d)"))  # a leading number
ANSWER_LIKE = r"[^\w\n]{0,9}?(?:\d(?![\d,]*[.)]\s+[A-Za-z])|(?<=\\)[A-Za-z])"  # a number or LaTeX; not '1. Eggs'
HASH = rf"(?<!#)####(?!#)[ \t]*(?={ANSWER_LIKE})([^\n]+)"  # '#### 18', not a heading '#### Step 1: ...'
ANSWER = r"(?=\banswer(?:\s+is|\s*:)\s*:?\s*([^\n]*?)\s*(?:\.(?:\s|$)|$))"  # 'the answer is x.', 'Answer: x'
HEDGE = r"^\W*(?:between|either)\b|\d\s*(?:\\text\{\s*)?(?:or|and|to)\b\s*\}?\s*\$?\s*-?\d"  # '18 or 20' ...
NEW_PROBLEM = r"^[#* \t]*(?:Question|Problem|Q|Human|User)\s*\d*\s*:"  # 'Question: ...' after an answer: a run-on
BOLD = r"(?<![\w)])\*\*|\*\*(?![\w(])"  # markdown bold, not 2**3

def extract_answer(text, task):
    """The final answer of a completion, or None: see the module docstring for the rules."""
    text = re.sub(BOLD, "", text.replace("\u2212", "-").replace("{,}", ","))  # LaTeX's thousands separator too
    m = re.search(HASH, text) if task == "gsm8k" else None
    if m: text = text[:m.end()]  # GSM8K's end mark: what follows its first '#### x' is a run-on
    for m in re.finditer(NEW_PROBLEM, text, flags=re.M):  # a new problem after a stated answer: a run-on
        if _answer(text[:m.start()], task, last_number=False) is not None:
            text = text[:m.start()]
            break
    return _answer(text, task)

def _answer(text, task, last_number=True):
    def lead(s):  # GSM8K: a number followed by a unit, words or punctuation is that number; a hedge is graded whole
        m = re.match(LEAD, s) if task == "gsm8k" and not re.search(HEDGE, s) else None
        return m.group(1) if m else s
    b = last_boxed(text)
    if b is not None: return lead(b)
    m = re.findall(HASH, text)
    if m: return lead(m[-1].strip())
    spans = [s.strip("$ ") for s in re.findall(ANSWER, text, flags=re.I | re.M)]
    spans = [s for s in spans if s and not re.match(r"(?:in)?correct|right|wrong|as follows", s, flags=re.I) and
             (task != "gsm8k" or re.match(ANSWER_LIKE, s) or re.search(HEDGE, s))]  # not 'the answer is right';
    # on GSM8K a number, or a hedge between two numbers (graded whole: wrong)
    if spans: return lead(spans[-1])
    if task == "gsm8k" and last_number:
        m = re.findall(NUM, text)
        if m: return m[-1]
    return None

def normalise(s):
    """Cheap canonical form: spacing, $, \\left/\\right, \\dfrac, degrees, percent, thousands commas, trailing .0."""
    s = s.strip().strip("$").strip()
    for a, b in (("{,}", ","), ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                 ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""),
                 ("\\$", ""), ("$", ""), (" ", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s).rstrip(".")
    if re.fullmatch(r"-?[\d,]*\.?\d+", s):
        s = s.replace(",", "")
        if "." in s: s = s.rstrip("0").rstrip(".")
    return s

_MV_LOG = logging.getLogger("math_verify")

def _math_verify(gold, pred):
    """math-verify; its timeouts use signal.alarm, which only works in the main thread."""
    from math_verify import parse, verify
    to = 5 if threading.current_thread() is threading.main_thread() else None
    _MV_LOG.setLevel(logging.ERROR)  # it warns on every call with the timeout off
    try:
        g, p = parse(f"${gold}$", parsing_timeout=to), parse(f"${pred}$", parsing_timeout=to)
        return bool(verify(g, p, timeout_seconds=to))
    except Exception:
        return False

def is_correct(completion, gold, task):
    """Does the completion's final answer equal gold? task: 'gsm8k' or 'math' (math500 grades as math)."""
    pred = extract_answer(completion, task)
    if pred is None: return False
    p, g = normalise(pred), normalise(gold)
    if p == g: return True
    if task == "gsm8k":
        try: return math.isclose(float(p), float(g), rel_tol=0, abs_tol=1e-9)
        except ValueError: pass
    return _math_verify(gold, pred)

# -----------------------------------------------------------------------------
# data

def gold_of(rec, task, where):
    """(problem, gold answer string) of a record; an answer that is not text or a number is refused."""
    for k in ("answer", "solution"):
        v = rec.get(k)
        if k in rec and not (isinstance(v, str) or type(v) in (int, float)):
            raise trb.UserError(f"{where}: the {k} is {repr(v)[:40]}, not text or a number")
    if task == "gsm8k":
        if "question" not in rec or "answer" not in rec:
            raise trb.UserError(f"{where}: a GSM8K record needs question and answer")
        q, gold = rec["question"], str(rec["answer"]).split("####")[-1].strip()
    else:
        if "problem" not in rec or not ("answer" in rec or "solution" in rec):
            raise trb.UserError(f"{where}: a MATH record needs problem and answer (or solution)")
        a = str(rec.get("answer", "")).strip()  # an answer 0 is an answer
        q, gold = rec["problem"], a or (last_boxed(str(rec.get("solution", ""))) or "").strip()
    if not isinstance(q, str) or not q.strip(): raise trb.UserError(f"{where}: the problem is {repr(q)[:40]}, not text")
    trb.check_text(q, f"{where}: the problem")
    if not gold: raise trb.UserError(f"{where}: empty answer (and no \\boxed{{}} in the solution)")
    return q, gold

def load_problems(task, data_file="", limit=0):
    """[(problem, gold, record)] from a local JSONL file or the hub."""
    if data_file:
        if not os.path.isfile(data_file):
            what = "a folder" if os.path.isdir(data_file) else "no such file"
            raise trb.UserError(f"--data_file {data_file!r}: {what}")
        recs = [(r, f"{data_file}, record {i}") for i, r in enumerate(trb.read_json_records(data_file), 1)]
    else:
        args, split, _ = TASKS[task]
        trb.need_hub(args[0], "data")
        from datasets import load_dataset
        try:
            recs = [(r, f"{args[0]}[{i}]") for i, r in enumerate(load_dataset(*args, split=split))]
        except Exception as e:
            raise trb.UserError(f"cannot read {args[0]!r}: {trb._short(e)}") from None
    recs = recs[:limit] if limit else recs
    if not recs: raise trb.UserError(f"no problems in {data_file or task}")
    return [(*gold_of(r, "gsm8k" if task == "gsm8k" else "math", where), r) for r, where in recs]

# -----------------------------------------------------------------------------
# generation and scoring

def generate(model, tok, prompts, n_samples, temperature, max_new_tokens, batch_size, seed, device):
    """n completions per prompt with trb.rollout at eps = 0; longest prompts first to waste little padding."""
    V, eos = len(tok), trb.eos_ids_of((tok, model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    rows = [(i, trb.format_prompt(tok, p)) for i, p in enumerate(prompts) for _ in range(n_samples)]
    n = max(len(ids) for _, ids in rows) + max_new_tokens  # within the model's positions, or one line
    trb.check_positions(n, SimpleNamespace(max_new_tokens=max_new_tokens), model=model)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    out, n_tok = [[] for _ in prompts], 0
    gen = torch.Generator(device=device).manual_seed(seed)
    from tqdm import tqdm
    bar = tqdm(range(0, len(order), batch_size), desc="generate", dynamic_ncols=True, disable=not sys.stderr.isatty())
    for b in bar:                                           # a bar on a terminal only, none in a log file
        idx = order[b:b + batch_size]
        ids, attn = trb.left_pad([rows[r][1] for r in idx], pad, device)
        r = trb.rollout(model, None, ids, attn, 0.0, V=V, eos_ids=eos, pad_id=pad, max_new_tokens=max_new_tokens,
                        temperature=temperature, gen=gen)
        n_tok += int(r["mask"].sum())
        for k, j in enumerate(idx):
            out[rows[j][0]].append(tok.decode(r["tokens"][k][r["mask"][k]], skip_special_tokens=True))
    return out, n_tok

def score(problems, completions, task):
    """Per-problem verdict lists, and the summary dict."""
    grade_as = "gsm8k" if task == "gsm8k" else "math"
    verdicts = [[is_correct(c, gold, grade_as) for c in comps] for (_, gold, _), comps in zip(problems, completions)]
    acc = [sum(v) / len(v) for v in verdicts]  # pass@1 per problem, averaged over its samples
    n = len(acc)
    mean = sum(acc) / n
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1) / n) if n > 1 else 0.0
    summary = dict(task=task, n=n, accuracy=mean, stderr=se)
    if task != "gsm8k":
        for key, names in (("by_subject", ("subject", "type")), ("by_level", ("level",))):
            groups = {}
            for (_, _, rec), a in zip(problems, acc):
                k = next((str(rec[f]) for f in names if f in rec), None)
                if k is not None: groups.setdefault(k, []).append(a)
            if groups: summary[key] = {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}
    return verdicts, summary

# -----------------------------------------------------------------------------
# figure of trb.py runs (matplotlib is optional)

PANELS = [("eps", "budget eps"), ("beta", "mean beta"), ("kl_mu_s", "realised KL(mu||pi_S)"),
          ("teacher_logp", "teacher log-prob of sampled tokens"), ("eval_kl", "held-out reverse KL (student rollouts)")]

def methods_of(run_dirs):
    """
    Each run's method: its path under the runs' common parent folder, less a -sSEED ending. runs/trb-s0 and
    runs/trb-s1 are two seeds of trb; exp1/opd and exp2/opd are two methods, exp1/opd and exp2/opd.
    """
    ds = [os.path.abspath(d) for d in run_dirs]
    top = os.path.commonpath([os.path.dirname(d) for d in ds])
    return [re.sub(r"-s\d+$", "", os.path.relpath(d, top)) for d in ds]

def warmup_end(runs):
    """K: the last logged step that sampled with eps > 0 (step s logs eps_{s-1}), over runs whose budget decayed."""
    return min((next(r["step"] for r in recs if r.get("eps") == 0) - 1 for rs in runs.values() for recs in rs
                if recs[-1].get("eps") == 0 and any(r.get("eps", 0) > 0 for r in recs)), default=None)

def plot_runs(run_dirs, out_png):
    """
    The curves of trb.py runs: per method (runs named NAME-sSEED are its seeds, see methods_of) the mean over seeds
    and a min-max band, and a last panel with the held-out reverse KL at the end of the warmup (step K, the last step
    that sampled with eps > 0, as trb.py logs it) and at the last eval, per method, with the seeds' spread.
    """
    runs = {}
    for i, (d, name) in enumerate(zip(run_dirs, methods_of(run_dirs))):
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.isfile(path): raise trb.UserError(f"--plot: no metrics.jsonl in {d!r}")
        if any(os.path.samefile(d, e) for e in run_dirs[:i]): raise trb.UserError(f"--plot: {d!r} is given twice")
        recs = [{k: v for k, v in r.items() if type(v) in (int, float) and math.isfinite(v)}  # hand edits: dropped
                for r in trb.read_metrics(path) if type(r["step"]) is int]  # "step": true is no step
        if not recs: raise trb.UserError(f"--plot: {path} holds no records")
        runs.setdefault(name, []).append(recs)
    plt, out_png = pyplot(out_png)
    K = warmup_end(runs)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.6))
    axes = axes.ravel()
    for c, (name, rs) in enumerate(runs.items()):
        color = f"C{c}"
        for ax, (key, title) in zip(axes, PANELS):
            steps = sorted({r["step"] for recs in rs for r in recs if key in r})
            vals = [[next((r[key] for r in recs if r["step"] == s and key in r), None) for recs in rs] for s in steps]
            vals = [[v for v in vs if v is not None] for vs in vals]
            mean = [sum(v) / len(v) for v in vals]
            ax.plot(steps, mean, color=color, marker="o" if key == "eval_kl" else None, ms=3,
                    label=f"{name} ({len(rs)} seed{'s' * (len(rs) > 1)})")
            if len(rs) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        last = max((r["step"] for recs in rs for r in recs if "eval_kl" in r), default=None)  # None: no --eval_data
        ends = [s for s in (K, last) if s is not None]
        for j, s in enumerate(ends):
            v = [r["eval_kl"] for recs in rs for r in recs if r["step"] == s and "eval_kl" in r]
            if not v: continue
            x = j + (c - (len(runs) - 1) / 2) * 0.12
            m = sum(v) / len(v)
            axes[-1].errorbar([x], [m], yerr=[[m - min(v)], [max(v) - m]], color=color, marker="o", ms=4, capsize=3)
    axes[-1].set_xticks(range(2 if K is not None else 1),
                        ([f"end of warmup\n(step {K})"] if K is not None else []) + ["last eval"], fontsize=8)
    axes[-1].set_xlim(-0.5, (K is not None) + 0.5)
    axes[-1].set_title("held-out reverse KL per method: mean, min-max", fontsize=9)
    axes[0].legend(fontsize=7)
    return save_figure(plt, fig, out_png)

def pyplot(out_png):
    """matplotlib's pyplot (Agg) and the figure's path (.png if it has no extension), checked before any figure is
    made: one line each for no matplotlib, a type it cannot write and a missing folder."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise trb.UserError("--plot needs matplotlib (pip install matplotlib)") from None
    out_png = out_png if os.path.splitext(out_png)[1] else out_png + ".png"
    if os.path.exists(out_png) and not os.path.isfile(out_png):
        raise trb.UserError(f"--plot_out {out_png!r} is not a regular file (a folder?): name the figure's file")
    ext, folder = os.path.splitext(out_png)[1][1:].lower(), os.path.dirname(os.path.abspath(out_png))
    if ext not in FigureCanvasAgg.get_supported_filetypes():  # no figure made for the question
        raise trb.UserError(f"--plot_out {out_png!r}: matplotlib cannot write .{ext} files")
    if not os.path.isdir(folder): raise trb.UserError(f"--plot_out {out_png!r}: no folder {folder}")
    return plt, out_png

def save_figure(plt, fig, out_png):
    fig.tight_layout()
    try:
        fig.savefig(out_png, dpi=120)
    except OSError as e:
        raise trb.UserError(f"--plot_out {out_png!r}: writing it failed ({e.strerror})") from None
    finally:
        plt.close(fig)
    return out_png

def plot_accuracy(rows, task, out_png):
    """--checkpoints all --plot: accuracy (± its standard error) against step, the best checkpoint marked."""
    plt, out_png = pyplot(out_png)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps, acc = [r["step"] for r in rows], [r["accuracy"] for r in rows]
    ax.errorbar(steps, acc, yerr=[r["stderr"] for r in rows], marker="o", ms=4, capsize=3)
    b = best_of(rows)
    ax.plot([b["step"]], [b["accuracy"]], "*", ms=14, color="C3", label=f"best: step {b['step']}, {b['accuracy']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{task} accuracy")
    ax.legend(fontsize=8)
    return save_figure(plt, fig, out_png)

# -----------------------------------------------------------------------------
# command line

@dataclass
class EvalConfig:
    # what to evaluate
    model: str = ""                        # a model directory (a trb.py checkpoint or any HF causal LM), a hub
                                           # name, or a trb.py run directory
    checkpoints: str = "latest"            # of a run directory: latest (its newest checkpoint) | all (each one:
                                           # the paper's best-checkpoint protocol, a table of step and accuracy)
    task: str = "gsm8k"                    # gsm8k | math500 | math
    data_file: str = ""                    # local JSONL with the hub's field names; "" = the hub's test split
    limit: int = 0                         # the first N problems; 0 = all
    # generation (trb.rollout at eps = 0)
    n_samples: int = 1                     # samples per problem; pass@1 is averaged over them
    temperature: float = 0.0               # 0 = greedy
    max_new_tokens: int = 1024             # completion length limit
    batch_size: int = 16                   # rows decoded together
    seed: int = 0                          # sampling seed
    # system
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                    # auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32
    trust_remote_code: bool = False        # run a model's own code from the hub; off unless asked
    out: str = ""                          # one JSON line per problem here; with --checkpoints all, one per
                                           # checkpoint (default RUN/eval-TASK.jsonl), read back for a checkpoint
                                           # already scored with the same settings
    # figures (matplotlib)
    plot: list = field(default_factory=list)  # run dirs whose metrics.jsonl to draw instead of an evaluation; no
                                           # dirs with --checkpoints all: its accuracy against step
    plot_out: str = "trb_compare.png"      # the figure's path

def write_out(a, problems, comps, verdicts):
    """--out: one JSON line per problem, written atomically (a symlink's target is replaced); a failed write is one
    line (the summary is already printed) and leaves a file that was there as it was."""
    grade_as = "gsm8k" if a.task == "gsm8k" else "math"
    path = os.path.realpath(a.out)
    tmp = f"{path}.{os.getpid()}.part"
    try:
        with open(tmp, "w") as f:
            for (p, gold, _), c, v in zip(problems, comps, verdicts):
                f.write(json.dumps(dict(prompt=p, completions=c, extracted=[extract_answer(x, grade_as) for x in c],
                                        gold=gold, correct=v)) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        trb._remove(tmp)
        raise trb.UserError(f"--out {a.out!r}: writing it failed ({e.strerror}); the summary above stands") from None

def same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:  # b is missing
        return False

def check_args(a):
    if not a.model: raise trb.UserError("--model is required")
    if a.task not in TASKS: raise trb.UserError(f"--task must be one of {', '.join(TASKS)}, got {a.task!r}")
    if a.checkpoints not in ("latest", "all"):
        raise trb.UserError(f"--checkpoints must be latest or all, got {a.checkpoints!r}")
    for name in ("n_samples", "max_new_tokens", "batch_size"):
        if getattr(a, name) < 1: raise trb.UserError(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.limit < 0: raise trb.UserError(f"--limit must be >= 0, got {a.limit}")
    if not 0 <= a.temperature < math.inf:
        raise trb.UserError(f"--temperature must be finite and >= 0, got {a.temperature}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device):
        raise trb.UserError(f"--device must be auto, cpu, cuda or cuda:N, got {a.device!r}")
    if a.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise trb.UserError(f"--dtype must be auto, bfloat16, float16 or float32, got {a.dtype!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise trb.UserError(f"--device {a.device}: no CUDA here")
    folder = os.path.dirname(os.path.abspath(a.out))
    if a.out and (os.path.isdir(a.out) or not (os.path.isdir(folder) and os.access(folder, os.W_OK))):
        why = "is a directory" if os.path.isdir(a.out) else "cannot be written: its folder is missing or read-only"
        raise trb.UserError(f"--out {a.out!r} {why}")
    models = [p for _, p in run_checkpoints(a.model) or []] or [a.model]  # a run's checkpoints, or the model
    dirs = [d for m in models for d in (m, trb._adapter_base(m)) if d and os.path.isdir(d) and os.access(d, os.R_OK)]
    ins = [a.data_file] + [os.path.join(d, f) for d in dirs for f in os.listdir(d)]
    same = next((p for p in ins if a.out and p and same_file(a.out, p)), None)
    if same: raise trb.UserError(f"--out {a.out!r} is the input {same!r}: writing the results would replace it")
    if not 0 <= a.seed < 2**32: raise trb.UserError(f"--seed must be in [0, 2^32), got {a.seed}")
    if 0 < a.temperature < trb.MIN_TAU:
        raise trb.UserError(f"--temperature must be 0 or >= {trb.MIN_TAU}, got {a.temperature}")
    if a.temperature == 0 and a.n_samples > 1:
        print("eval: warning: --temperature 0 with --n_samples > 1 gives identical samples", file=sys.stderr)

def run_checkpoints(model):
    """The checkpoints [(step, path)] of a trb.py run directory, or None where model is a model (or not a run)."""
    if not os.path.isdir(model) or any(os.path.isfile(os.path.join(model, f)) for f in ("config.json",
                                                                                       "adapter_config.json")):
        return None
    cks = trb.checkpoints(model)
    if not cks and any(f in ("metrics.jsonl", trb.LOCK) or f.startswith("checkpoint-") for f in os.listdir(model)):
        raise trb.UserError(f"{model} holds no complete checkpoint (a folder with trainer_state.pt) to evaluate")
    return cks or None

def evaluate_model(a, path, problems, device, dtype):
    """Generates and grades the problems with the model at path; prints the summary line. Returns (summary,
    completions, verdicts)."""
    tok = trb.load_tokenizer(path, a.trust_remote_code)
    model = trb.load_model(path, dtype, device, a.trust_remote_code).eval()
    t0 = time.time()
    comps, n_tok = generate(model, tok, [p for p, _, _ in problems], a.n_samples, a.temperature, a.max_new_tokens,
                            a.batch_size, a.seed, device)
    dt = time.time() - t0
    verdicts, summary = score(problems, comps, a.task)
    summary.update(model=path, n_samples=a.n_samples, temperature=a.temperature, tok_per_s=round(n_tok / dt, 1))
    print(f"{a.task} | accuracy {summary['accuracy']:.4f} ± {summary['stderr']:.4f} | n {summary['n']} | "
          f"samples {a.n_samples} | tok/s {summary['tok_per_s']} | {path}", flush=True)
    return summary, comps, verdicts

def best_of(rows):
    return max(rows, key=lambda r: r["accuracy"])  # the earliest of the best

def evaluate_run(a, cks, problems, device, dtype, out):
    """
    --checkpoints all: every checkpoint of the run, with the same settings. Each row (step, run, accuracy, stderr,
    n, settings) goes to out (rows_file's) as soon as it is scored, and a row of the same checkpoint and settings
    there is read back, not run again. Prints the table with the best marked. Returns the rows, oldest first.
    """
    settings = {k: getattr(a, k) for k in ("task", "limit", "n_samples", "temperature", "max_new_tokens", "batch_size",
                                           "seed")}
    settings.update(data_file=os.path.abspath(a.data_file) if a.data_file else "", dtype=str(dtype), device=device.type)
    kept, rows = trb.read_metrics(out), []
    for step, path in cks:
        try:
            run = str(trb.load_state(path).get("run"))  # JSON, whatever the state holds
            r = next((r for r in kept if (r.get("run"), r["step"], r.get("settings")) == (run, step, settings)), None)
            summary = evaluate_model(a, path, problems, device, dtype)[0] if r is None else None
        except trb.UserError:
            if trb._complete(path): raise
            print(f"{a.task} | {path}: removed while evaluating (the run rotates its checkpoints); skipped")
            continue
        if r is None:
            r = dict(step=step, run=run, checkpoint=path, settings=settings,
                     **{k: summary[k] for k in ("accuracy", "stderr", "n")})
            kept = [x for x in kept if (x.get("run"), x["step"], x.get("settings")) != (run, step, settings)] + [r]
            trb.write_lines(out, [json.dumps(x) + "\n" for x in kept])
        else: print(f"{a.task} | accuracy {r['accuracy']:.4f} ± {r['stderr']:.4f} | read back from {out} | {path}")
        rows.append(r)
    if not rows: raise trb.UserError(f"{a.model}: every checkpoint was removed while it was evaluated")
    b = best_of(rows)
    print(f"\n| step | {a.task} accuracy | stderr | |\n|---:|---:|---:|---|")
    for r in rows: print(f"| {r['step']} | {r['accuracy']:.4f} | {r['stderr']:.4f} | {'best' * (r is b)} |")
    print(f"\nbest: step {b['step']}, accuracy {b['accuracy']:.4f} ({b['checkpoint']}); rows in {out}", flush=True)
    return rows

def rows_file(a):
    """The file eval.py writes to: --out, or with --checkpoints all RUN/eval-TASK.jsonl. One that holds anything but
    eval.py's lines of that kind (a run's metrics.jsonl, a file of the user's), or that cannot be written, is refused
    before anything runs."""
    every = a.checkpoints == "all"
    out, keys = (a.out or os.path.join(a.model, f"eval-{a.task}.jsonl"), {"step", "run", "settings"}) if every else (
        a.out, {"prompt", "completions", "gold", "correct"})
    flag = "--out" if a.out else "the rows' file (--out)"
    if os.path.exists(out) and not os.path.isfile(out):  # a folder, a device, a FIFO: never replaced
        raise trb.UserError(f"{flag} {out!r} is not a regular file: choose a file")
    try:
        with open(out) if os.path.isfile(out) else contextlib.nullcontext([]) as f:
            ours = all(isinstance(r := json.loads(l), dict) and keys <= set(r) for l in f if l.strip())
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(out))).close()  # can it be written?
    except (ValueError, UnicodeDecodeError):
        ours = False
    except OSError as e:
        raise trb.UserError(f"{flag} {out!r} cannot be written ({e.strerror})") from None
    if not ours:
        what = "rows of checkpoints" if every else "lines of problems"
        raise trb.UserError(f"{flag} {out!r} holds other lines than eval.py's {what}: choose another file")
    return out

def main(argv=None):
    trb.keep_freed_memory()
    trb.quiet_progress_bars()
    a, given = trb.parse_config(EvalConfig, argv, "GSM8K / MATH exact match of a trb.py checkpoint, of each checkpoint "
                                                  "of a run, or of any HF causal LM, pass@1 over n samples; or --plot "
                                                  "the curves of trb.py runs")
    try:
        every = a.checkpoints == "all"
        if "plot" in given and not a.plot and not every:
            raise trb.UserError("--plot needs the run folders to draw: --plot DIR ... (or --checkpoints all)")
        if a.plot and not every: return print(plot_runs(a.plot, a.plot_out))
        check_args(a)
        if every and a.plot: raise trb.UserError("--checkpoints all --plot draws its own figure: give no folders")
        if every and "plot" in given: pyplot(a.plot_out)     # checked before anything runs
        cks = run_checkpoints(a.model)
        if every and not cks: raise trb.UserError(f"--checkpoints all needs a trb.py run directory as --model, not "
                                                  f"{a.model!r}")
        out = rows_file(a) if every or a.out else ""
        device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        auto = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = getattr(torch, a.dtype) if a.dtype != "auto" else auto
        problems = load_problems(a.task, a.data_file, a.limit)
        if every:
            rows = evaluate_run(a, cks, problems, device, dtype, out)
            if "plot" in given: print(plot_accuracy(rows, a.task, a.plot_out))
            return rows
        summary, comps, verdicts = evaluate_model(a, cks[-1][1] if cks else a.model, problems, device, dtype)
        for key in ("by_subject", "by_level"):
            if key in summary: print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[key].items()))
        print(json.dumps(summary), flush=True)
        if a.out: write_out(a, problems, comps, verdicts)  # after the summary: a failed write loses nothing else
        return summary
    except trb.UserError as e:
        raise SystemExit(f"eval: error: {e}")

if __name__ == "__main__":
    main()
