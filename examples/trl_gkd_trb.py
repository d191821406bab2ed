"""
TRB rollouts inside TRL's GKDTrainer (lmbda=1, beta=1: on-policy reverse KL; no vLLM). While the budget of eq. 3,
eps_k = eps0 * max(0, 1 - k/K), is above 0, the student's samples come from mu (eq. 1-2) through
trb.TRBLogitsProcessor; after K steps this is plain GKDTrainer.

  python examples/trl_gkd_trb.py --student DIR --teacher DIR --data prompts.jsonl --out_dir out-gkd-trb \
    [--eps0 0.02 --warmup_steps 50 --max_steps 200 --max_new_tokens 256]

Needs trl (pip install trl==1.16.0). Prompts come from the `question`, `problem` or `prompt` field, as in trb.py.
Both models load in float32; on a GPU with bf16 the step runs under bf16 autocast, elsewhere in float32 on the CPU.
"""
import argparse
import copy
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

import trb  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # experimental, as said above: not on every run
try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as e:  # no trl, or a version without the experimental GKDTrainer
    raise SystemExit(f"trl_gkd_trb: error: needs trl with trl.experimental.gkd ({trb._short(e)}): "
                     f"pip install trl==1.16.0") from None

class TRBGKDTrainer(GKDTrainer):
    """GKDTrainer whose on-policy samples come from TRB's behavior policy mu while eps_k > 0."""

    def __init__(self, *args, eps0=0.02, warmup_steps=50, **kw):
        super().__init__(*args, **kw)
        tok = self.processing_class
        self.eps0, self.K, self.V = eps0, warmup_steps, len(tok)
        self.eos_ids = trb.eos_ids_of((tok, self.model), (tok, self.teacher_model))  # folded into the student's
        self.proc = None

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        eps = trb.kl_budget(self.state.global_step, self.eps0, self.K)  # eq. 3
        self.proc = trb.TRBLogitsProcessor(self.teacher_model, eps, inputs["prompt_attention_mask"],
                                           eos_ids=self.eos_ids, V=self.V)  # one per generate() call
        exact = copy.deepcopy(generation_config)
        exact.update(**trb.TRBLogitsProcessor.EXACT)        # no warper after the processor: tokens ~ mu exactly
        model.generate = functools.partial(type(model).generate, model, logits_processor=[self.proc])
        try:
            return GKDTrainer.generate_on_policy_outputs(model, inputs, exact)
        finally:
            del model.generate

def make_trainer(student, teacher, tok, prompts, out_dir, eps0=0.02, warmup_steps=50, **config):
    """A TRBGKDTrainer on chat prompts (the system prompt of trb.py), lmbda=1 and beta=1, temperature 1."""
    from datasets import Dataset
    sys_msg = {"role": "system", "content": trb.SYSTEM_PROMPT}
    ds = Dataset.from_list([{"messages": [sys_msg, {"role": "user", "content": q},
                                          {"role": "assistant", "content": ""}]} for q in prompts])
    args = GKDConfig(output_dir=out_dir, lmbda=1.0, beta=1.0, temperature=1.0, report_to="none", **config)
    return TRBGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                         eps0=eps0, warmup_steps=warmup_steps)

def check(a):
    """The flags, before any model loads, with trb.py's checks and words; out_dir free of earlier runs."""
    for k in ("student", "teacher", "data"):
        if not getattr(a, k): raise trb.UserError(f"--{k} is required (see --help)")
    trb.check_config(trb.Config(eps0=a.eps0, warmup_steps=a.warmup_steps, max_steps=a.max_steps, lr=a.lr,
                                max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, out_dir=a.out_dir))
    d = os.path.abspath(a.out_dir)
    if os.path.exists(d) and not os.path.isdir(d): raise trb.UserError(f"--out_dir {a.out_dir!r} is a file")
    old = sorted(n for n in os.listdir(d) if n.startswith("checkpoint-")) if os.path.isdir(d) else []
    if old: raise trb.UserError(f"--out_dir {a.out_dir!r} holds an earlier run ({old[-1]}): pick another --out_dir")
    try:  # a probe file, where the Trainer's first checkpoint goes (os.access says yes to root on a read-only mount)
        tempfile.TemporaryFile(dir=d if os.path.isdir(d) else os.path.dirname(d)).close()
    except OSError as e:
        raise trb.UserError(f"--out_dir {a.out_dir!r} cannot be written ({e.strerror}): its folder must exist and "
                            f"be writable") from None

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("student", ""), ("teacher", ""), ("data", ""), ("out_dir", "out-gkd-trb"), ("eps0", 0.02),
                          ("warmup_steps", 50), ("max_steps", 200), ("max_new_tokens", 256), ("lr", 1e-5),
                          ("batch_size", 8)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    a = p.parse_args(argv)
    trb.quiet_progress_bars()
    try:
        check(a)
        prompts = trb.load_prompts(a.data)
        tok = trb.load_tokenizer(a.student, what="--student")
        trb.shared_vocab(tok, trb.load_tokenizer(a.teacher, what="--teacher"))  # one tokenizer serves both
        if not getattr(tok, "chat_template", None):
            raise trb.UserError(f"--student {a.student!r}: its tokenizer has no chat template, which GKDTrainer's chat "
                                f"prompts need (trb.py takes plain text too)")
        cpu = torch.device("cpu")  # the Trainer moves them
        student, teacher = (trb.load_model(m, torch.float32, cpu, what=f"--{k}")
                            for k, m in (("student", a.student), ("teacher", a.teacher)))
        Vs, Vt = (m.get_output_embeddings().weight.shape[0] for m in (student, teacher))
        if Vs != Vt: raise trb.UserError(f"GKDTrainer needs as many logits in both models, but the student has {Vs} "
                                         f"and the teacher {Vt} (trb.py slices both to the shared vocabulary)")
        gpu = torch.cuda.is_available()
        make_trainer(student, teacher, tok, prompts, a.out_dir, a.eps0, a.warmup_steps, max_steps=a.max_steps,
                     max_new_tokens=a.max_new_tokens, learning_rate=a.lr, per_device_train_batch_size=a.batch_size,
                     use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported()).train()
    except trb.UserError as e:
        raise SystemExit(f"trl_gkd_trb: error: {e}")

if __name__ == "__main__":
    main()
