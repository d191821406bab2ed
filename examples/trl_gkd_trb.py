"""
TRB rollouts inside TRL's GKDTrainer (lmbda=1, beta=1: on-policy reverse KL; no vLLM). While the budget of eq. 3,
eps_k = eps0 * max(0, 1 - k/K), is above 0, the student's samples come from mu (eq. 1-2) through
trb.TRBLogitsProcessor; after K steps this is plain GKDTrainer.

  python examples/trl_gkd_trb.py --student DIR --teacher DIR --data prompts.jsonl --out_dir out-gkd-trb \
    [--eps0 0.02 --warmup_steps 50 --max_steps 200 --max_new_tokens 256]

Needs trl (pip install trl==1.16.0). Prompts come from the `question`, `problem` or `prompt` field, as in trb.py.
"""
import argparse
import copy
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import trb  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

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

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("student", ""), ("teacher", ""), ("data", ""), ("out_dir", "out-gkd-trb"), ("eps0", 0.02),
                          ("warmup_steps", 50), ("max_steps", 200), ("max_new_tokens", 256), ("lr", 1e-5),
                          ("batch_size", 8)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.student)
    student, teacher = (AutoModelForCausalLM.from_pretrained(m) for m in (a.student, a.teacher))
    make_trainer(student, teacher, tok, trb.load_prompts(a.data), a.out_dir, a.eps0, a.warmup_steps,
                 max_steps=a.max_steps, max_new_tokens=a.max_new_tokens, learning_rate=a.lr,
                 per_device_train_batch_size=a.batch_size).train()

if __name__ == "__main__":
    main()
