"""A causal transformer language model on the bundled text, with every probe family attached.

1. The text pieces (landscape/text.py): the bundled text, the character vocabulary, seeded
   splits and batches (y is x shifted by one, the global RNG untouched), the token-mean loss.
2. The model (CharTransformer): shapes, causality (logits at t do not depend on tokens after t),
   the initial loss ln V, and training that lowers the validation loss.
3. Ground truth on the LM (float64): Hessian-vector products on both routes against a dense
   reverse-over-reverse Hessian of an independently written loss (itself checked against finite
   differences), lambda_max of HessianSpectrum against numpy's eigvalsh, per-example gradients
   against a loop over single examples, GradientNoise against numpy on that matrix.
4. The fused attention kernel: on this build its backward has no derivative (no double backward,
   no forward-mode AD), and landscape's HVPs work anyway with no action from the user, while the
   user's own forward keeps the fused kernel.
5. The recipe researchers train with: AdamW with weight decay, gradient clipping, linear warm-up
   then cosine (LambdaLR), dropout, every probe family attached: no probe fails, every value is finite
   where its probe ran, the recorded lr and loss are the loop's, and the final weights are
   bitwise those of the same run without landscape.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import landscape
from landscape.functional import FunctionalModel, probe_guard
from landscape.models import CharTransformer
from landscape.text import CharVocab, char_batches, lm_loss, load_text, split_text
from probes import (GradientNoise, GradientOverlap, HessianSpectrum, HessianTrace, Interpolation, LossProfile,
                    PreconditionedSharpness, RestrictedSecant, RiverHill, Sharpness, SpectralDensity, StepCurvature,
                    TrajectoryPCA, ValleyWidth)
from probes.base import Context
from tests._helpers import assert_same_weights, own_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = load_text()
VOCAB = CharVocab(TEXT)
IDS = VOCAB.encode(TEXT)
TRAIN, VAL = split_text(IDS, 0.1, seed=0)


# -- 1. the text ---------------------------------------------------------------------------------


def test_bundled_text_vocabulary_and_round_trip():
    assert 20_000 <= len(TEXT.encode("ascii")) <= 40_000  # plain ASCII (encode raises otherwise)
    assert TEXT.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert VOCAB.chars == tuple(sorted(set(TEXT))) and len(VOCAB) == VOCAB.size == len(set(TEXT))
    assert CharVocab(TEXT[::-1]).chars == VOCAB.chars  # order by code point, not by first appearance
    assert IDS.dtype == torch.long and IDS.shape == (len(TEXT),)
    assert VOCAB.decode(IDS) == TEXT
    assert [VOCAB.chars[i] for i in IDS[:5].tolist()] == list("First")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        VOCAB.encode("caf\u00e9")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        VOCAB.decode([0, len(VOCAB)])
    with pytest.raises(ValueError, match="1-D"):
        VOCAB.decode(IDS[:4].reshape(2, 2))
    with pytest.raises(FileNotFoundError, match="tinytext"):
        load_text("nosuchtext")
    with pytest.raises(ValueError, match="stem of a bundled text"):
        load_text("../data/tinytext")


def test_split_is_seeded_contiguous_and_complete():
    n = IDS.numel()
    assert TRAIN.numel() + VAL.numel() == n and VAL.numel() == round(0.1 * n)
    start = TEXT.find(VOCAB.decode(VAL))
    assert start >= 0  # one contiguous span of the text
    assert torch.equal(torch.cat([IDS[:start], IDS[start + VAL.numel():]]), TRAIN)  # the rest, in order
    again = split_text(IDS, 0.1, seed=0)
    assert torch.equal(again[1], VAL) and torch.equal(again[0], TRAIN)
    assert not torch.equal(split_text(IDS, 0.1, seed=1)[1], VAL)
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="val_fraction"):
            split_text(IDS, bad)
    with pytest.raises(ValueError, match="1-D int64"):
        split_text(IDS.float())


def test_char_batches_shift_by_one_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    batches = char_batches(TRAIN, block=12, batch_size=5, count=3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(batches) == 3
    train_text = VOCAB.decode(TRAIN)
    for x, y in batches:
        assert x.shape == y.shape == (5, 12) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for xi, yi in zip(x, y):  # x then y's last id is one window of the text: y is the next character
            assert VOCAB.decode(torch.cat([xi, yi[-1:]])) in train_text
    again = char_batches(TRAIN, block=12, batch_size=5, count=3, seed=4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not torch.equal(char_batches(TRAIN, block=12, batch_size=5, count=1, seed=5)[0][0], batches[0][0])
    short = IDS[:10]
    assert char_batches(short, block=9, batch_size=4, count=1, seed=0)[0][0].shape == (4, 9)  # the longest block
    with pytest.raises(ValueError, match="too few"):
        char_batches(short, block=10, batch_size=1, count=1, seed=0)
    for kw in ({"block": 0}, {"batch_size": 0}, {"count": 1.5}):
        with pytest.raises(ValueError, match="positive int"):
            char_batches(TRAIN, **{"block": 4, "batch_size": 2, "count": 1, "seed": 0, **kw})


def test_lm_loss_is_the_token_mean_and_the_mean_of_example_means():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 7), generator=gen)
    logp = logits - logits.exp().sum(-1, keepdim=True).log()
    nll = -logp.gather(-1, targets[..., None])[..., 0]  # (3, 7), written out
    torch.testing.assert_close(lm_loss(logits, targets), nll.mean(), rtol=1e-14, atol=0)
    per_example = torch.stack([lm_loss(logits[i:i + 1], targets[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(per_example.mean(), lm_loss(logits, targets), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"logits \(B, T, V\)"):
        lm_loss(logits[0], targets[0])
    with pytest.raises(ValueError, match="matching"):
        lm_loss(logits, targets[:, :5])


# -- 2. the model --------------------------------------------------------------------------------


def test_model_shapes_causality_and_errors():
    torch.manual_seed(0)
    model = CharTransformer(VOCAB).double()
    assert 25_000 <= sum(p.numel() for p in model.parameters()) <= 35_000  # the defaults: about 30k
    x = char_batches(TRAIN, block=32, batch_size=2, count=1, seed=0)[0][0]
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 32, len(VOCAB))
        changed = x.clone()
        changed[:, 20] = (changed[:, 20] + 1) % len(VOCAB)
        diff = (model(changed) - out).abs().amax(dim=(0, 2))
        assert float(diff[:20].max()) == 0.0  # nothing before position 20 sees token 20
        assert float(diff[20:].min()) > 0  # everything from 20 on does
        torch.testing.assert_close(model(x[:, :10]), out[:, :10], rtol=1e-12, atol=1e-12)  # shorter contexts
    tied = CharTransformer(VOCAB, width=16, block=16, tie_weights=True)
    assert tied.head.weight is tied.tok.weight
    untied = sum(p.numel() for p in CharTransformer(VOCAB, width=16, block=16).parameters())
    assert sum(p.numel() for p in tied.parameters()) == untied - 16 * len(VOCAB)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="multiple of heads"):
        CharTransformer(VOCAB, width=10, heads=3)
    with pytest.raises(ValueError, match="dropout"):
        CharTransformer(VOCAB, dropout=1.0)
    with pytest.raises(TypeError, match="CharVocab"):
        CharTransformer(TEXT)  # the text, not its vocabulary


def test_initial_loss_is_ln_vocab_and_training_lowers_the_validation_loss():
    torch.manual_seed(0)
    model = CharTransformer(VOCAB, width=16, block=16)
    val = char_batches(VAL, block=16, batch_size=32, count=2, seed=9)

    def val_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(lm_loss(model(x), y)) for x, y in val]))

    before = val_loss()
    assert abs(before - math.log(len(VOCAB))) < 0.02  # small initial logits: uniform predictions
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for x, y in char_batches(TRAIN, block=16, batch_size=16, count=80, seed=0):
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        opt.step()
    after = val_loss()
    assert after < before - 1.0, (before, after)  # past the unigram rate (~3.3 nats) towards words


# -- 3. ground truth on the LM (float64) ------------------------------------------------------------


def _tiny() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A tiny float64 LM (width 4, one layer, tied head: d = 502) at a point away from its
    initialisation, so attention and LayerNorm are far from trivial, and a batch of 4 blocks."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CharTransformer(VOCAB, width=4, heads=2, layers=1, block=8, mlp=2, tie_weights=True).double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.4 * torch.randn_like(p))
    batch = char_batches(TRAIN, block=8, batch_size=4, count=1, seed=3)[0]
    fm = FunctionalModel(model, lm_loss)
    return model, batch, fm.flat_params()


def _own_loss(model: nn.Module, batch):
    """The mean token loss as a function of a flat vector, written without the library (own split
    of the vector in named_parameters order, own cross-entropy)."""
    return own_loss(model, lambda logits, y: -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean(), batch)


def _reference_hessian(f, w: torch.Tensor) -> torch.Tensor:
    """Dense reverse-over-reverse Hessian, math attention kernel chosen explicitly here (the
    reference does what landscape must do by itself)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, w.detach(), vectorize=True)


def _grad(f, w: torch.Tensor) -> torch.Tensor:
    leaf = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(f(leaf), leaf)[0]


@pytest.fixture(scope="module")
def tiny():
    model, batch, w = _tiny()
    f = _own_loss(model, batch)
    H = _reference_hessian(f, w)
    return model, batch, w, f, H


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_reference_hessian_is_sound(tiny):
    """The reference equals central finite differences of first-order gradients (no
    second-order AD involved) and is symmetric; the independent loss equals the library's."""
    model, batch, w, f, H = tiny
    d = w.numel()
    assert 300 < d < 600 and H.shape == (d, d)
    fm = FunctionalModel(model, lm_loss)
    assert abs(float(f(w)) - float(fm.loss(w, batch))) < 1e-13
    eps = 1e-5
    cols = [0, d // 3, d // 2, d - 1]
    fd = torch.stack([(_grad(f, w + eps * e) - _grad(f, w - eps * e)) / (2 * eps)
                      for e in torch.eye(d, dtype=torch.float64)[cols]], 1)
    assert _rel(H[:, cols], fd) < 1e-7
    assert _rel(H, H.T) < 1e-13


@pytest.mark.parametrize("route", ["double_backward", "fwd_rev"])
def test_hvp_on_the_lm_against_the_dense_float64_hessian(tiny, route):
    """No kernel choice by the caller: landscape picks the math attention kernel itself."""
    model, batch, w, _, H = tiny
    d = w.numel()
    fm = FunctionalModel(model, lm_loss)
    V = torch.randn(d, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with probe_guard(model, "eval"):
        op = fm.hessian_operator(w, batch, route=route)
        HV = op.matmat(V)
        Hv = torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], 1)
    assert _rel(HV, H @ V) < 1e-8
    assert _rel(Hv, H @ V) < 1e-8
    if route == "double_backward":  # the whole matrix, from identity blocks
        with probe_guard(model, "eval"):
            dense = torch.cat([op.matmat(torch.eye(d, dtype=torch.float64)[:, j:j + 128]) for j in range(0, d, 128)], 1)
        assert _rel(dense, H) < 1e-8


@contextlib.contextmanager
def _numpy_one_thread():
    """numpy's bundled OpenBLAS on one thread (as tests/test_hessian.py does): a threaded eigvalsh
    of a 500 x 500 matrix took 4-5 s on the busy 2-core machine, one thread 0.1 s."""
    pair = None
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for path in {line.split()[-1] for line in maps if "openblas" in line.lower() and "numpy" in line}:
            lib = ctypes.CDLL(path)
            for suffix in ("64_", ""):
                setter = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
                getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    pair = setter, getter
    before = pair[1]() if pair else None
    if pair:
        pair[0](1)
    try:
        yield
    finally:
        if pair:
            pair[0](before)


def test_hessian_spectrum_lambda_max_against_numpy_eigvalsh(tiny):
    model, batch, w, _, H = tiny
    with _numpy_one_thread():
        true = np.linalg.eigvalsh(H.numpy())[::-1]
    assert true[0] > 0 and true[-1] < 0  # indefinite away from a minimum
    fm = FunctionalModel(model, lm_loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = HessianSpectrum(k=3, tol=1e-10)
    probe.setup(fm, opt)
    ctx = Context(step=0, functional=fm, model=model, optimizer=opt, probe_batches=[batch], params=w)
    with probe_guard(model, probe.bn_mode):
        out = {k: np.asarray(v.data) for k, v in probe.measure(ctx).values.items()}
    np.testing.assert_allclose(out["lambda_max"][0], true[0], rtol=1e-8)
    np.testing.assert_allclose(out["eigenvalues"][0], true[:3], rtol=1e-6)
    assert out["eigenvalues_converged"].all()


def _loop_grads(model: nn.Module, batch) -> torch.Tensor:
    """(n, d) per-example gradients by plain autograd on the live module (first order: the default,
    fused attention kernel)."""
    x, y = batch
    params = list(model.parameters())
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(lm_loss(model(x[i:i + 1]), y[i:i + 1]), params)])
                        for i in range(x.shape[0])])


def test_per_example_gradients_and_gradient_noise_against_a_loop(tiny):
    model, _, _, _, _ = tiny
    batch = char_batches(TRAIN, block=8, batch_size=7, count=1, seed=5)[0]
    fm = FunctionalModel(model, lm_loss)
    w = fm.flat_params()
    G = _loop_grads(model, batch)
    rows = torch.cat(list(fm.per_sample_grads(w, batch, chunk=3)))
    assert rows.shape == (7, w.numel())
    torch.testing.assert_close(rows, G, rtol=0, atol=1e-12)
    # equal-length blocks: the example-weighted mean of per-example gradients is the batch gradient
    torch.testing.assert_close(rows.mean(0), fm.grad(w, batch), rtol=0, atol=1e-13)
    probe = GradientNoise()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.setup(fm, opt)
    ctx = Context(step=0, functional=fm, model=model, optimizer=opt, probe_batches=[batch], params=w)
    with probe_guard(model, probe.bn_mode):
        out = {k: float(np.asarray(v.data)[0]) for k, v in probe.measure(ctx).values.items()}
    Gn = G.numpy()
    tr = Gn.var(0, ddof=1).sum()
    sq = (Gn.mean(0) ** 2).sum() - tr / 7
    np.testing.assert_allclose([out["grad_variance"], out["grad_sqnorm"], out["noise_scale"]], [tr, sq, tr / sq],
                               rtol=1e-9)


# -- 4. attention kernels without double backward ----------------------------------------------------


def _attention_nodes(out: torch.Tensor) -> set[str]:
    """Names of the attention nodes in the autograd graph of ``out``."""
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Attention" in type(node).__name__ or "ScaledDotProduct" in type(node).__name__:
            names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_fused_attention_has_no_double_backward_and_landscape_handles_it_unasked(tiny):
    model, batch, w, f, H = tiny
    d = w.numel()
    v = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    nodes = _attention_nodes(model(batch[0]))  # the user's forward: the default kernel choice
    assert nodes, "no attention node found in the graph"
    fused = any("Flash" in n or "Efficient" in n or "Cudnn" in n for n in nodes)
    leaf = w.clone().requires_grad_(True)
    try:
        (g,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)  # no kernel chosen: the fused one
        (hv,) = torch.autograd.grad(g, leaf, v)
    except RuntimeError as err:  # this build (torch CPU): the fused backward has no derivative
        assert fused and "not implemented" in str(err), (nodes, err)
    else:  # a build whose default kernel has a double backward: it must agree with the math kernel
        assert _rel(hv, H @ v) < 1e-8
    if fused:  # nor forward-mode AD: forward-over-reverse fails too
        with pytest.raises((NotImplementedError, RuntimeError), match="not implemented|not support"):
            torch.func.jvp(torch.func.grad(f), (w,), (v,))
    # landscape: no context manager, no option; both routes exact
    fm = FunctionalModel(model, lm_loss)
    for route in ("double_backward", "fwd_rev"):
        assert _rel(fm.hvp(w, batch, v, route=route), H @ v) < 1e-8, route
    # and the user's own forward is back on the kernel it had (the switch is scoped to landscape's call)
    assert _attention_nodes(model(batch[0])) == nodes


# -- 5. the recipe researchers train with, every probe attached ---------------------------------------

STEPS, WARMUP, BLOCK, BASE_LR = 24, 4, 16, 3e-3


def _lr_factor(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to 0 at STEPS."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1.0 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def _all_probes() -> list:
    """One probe of every family, small settings, staggered cadences (HessianSpectrum first, so
    GradientOverlap reuses its eigenvectors)."""
    return [HessianSpectrum(every=8, k=2, max_matvecs=20), HessianTrace(every=8, matvecs=6),
            SpectralDensity(every=8, steps=6), PreconditionedSharpness(every=8, max_matvecs=20),
            RestrictedSecant(every=3, samples=2), GradientOverlap(every=8, k=2),
            Sharpness(every=12, radius=0.05, noise_samples=2, apgd_steps=3), StepCurvature(every=4),
            RiverHill(every=2, beta=0.9), ValleyWidth(every=12), Interpolation(every=6, alphas=np.linspace(0, 1, 5)),
            LossProfile(every=12, alphas=np.linspace(-1, 1, 5)), TrajectoryPCA(every=3, grid=5), GradientNoise(every=8)]


def _train(store=None, probes=None):
    """The loop as researchers write it; returns the model, the optimizer, the losses it computed and
    the lr of each step; with ``probes``, landscape is attached (and closed at the end)."""
    torch.manual_seed(0)
    # dropout draws from the global RNG at every step: the probes must leave it exactly as found
    model = CharTransformer(VOCAB, width=16, block=BLOCK, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
    rec = None
    if probes is not None:
        probe_data = char_batches(VAL, block=BLOCK, batch_size=8, count=2, seed=1)
        rec = landscape.attach(model, opt, loss_fn=lm_loss, probe_data=probe_data, probes=probes, store=store,
                               run={"optimizer": "adamw", "seed": 0})
    losses, lrs = [], []
    for x, y in char_batches(TRAIN, block=BLOCK, batch_size=16, count=STEPS, seed=0):
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(loss.item())
    if rec is not None:
        rec.close()
    return model, opt, losses, lrs


# Values that are NaN by definition at some steps where their probe ran (all documented in the schema).
_FIRST_NAN = {"interpolation_loss", "interpolation_barrier", "interpolation_max_rise",  # no previous checkpoint
              "floor_progress"}  # the EMA is not yet `lag` old


def test_transformer_lm_with_every_probe_family(tmp_path):
    probes = _all_probes()
    with warnings.catch_warnings():
        # vmap over the fused attention kernel has no batching rule (torch would loop, and warn):
        # landscape's batched evaluations run on the math kernel, so no such warning may appear
        warnings.filterwarnings("error", message=".*batching rule.*", category=UserWarning)
        model, opt, losses, lrs = _train(tmp_path / "lm.zarr", probes)
    plain, plain_opt, plain_losses, _ = _train()
    assert_same_weights(model, plain)  # bitwise: attaching changed nothing
    assert plain_losses == losses
    for a, b in zip(opt.state.values(), plain_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    ds = landscape.open_run(tmp_path / "lm.zarr")
    assert ds.attrs["probe_errors"] == {}
    assert (ds["probe_failed"].values == 0).all() and (ds["nonfinite"].values == 0).all()
    assert ds.attrs["model"]["class"] == "CharTransformer"
    assert ds.attrs["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert sorted(p["probe"] for p in ds.attrs["probes"]) == sorted(p.name for p in probes)
    steps = ds["step"].values
    assert list(steps) == list(range(STEPS))
    # the loss and lr of every step are the loop's, and the lr is the warm-up/cosine schedule's
    assert ds["loss"].values.tolist() == losses
    assert ds["lr"].values.tolist() == lrs
    np.testing.assert_allclose(ds["lr"].values, [BASE_LR * _lr_factor(t) for t in range(STEPS)], rtol=1e-15, atol=0)
    assert ds["lr"].values[WARMUP - 1] == BASE_LR and ds["lr"].values[-1] < 0.02 * BASE_LR

    # every per-step value is finite exactly at the steps its probe ran (along its own labels)
    by_name = {p.name: p for p in probes}
    checked = set()
    for name, var in ds.data_vars.items():
        probe = by_name.get(var.attrs.get("probe"))
        if probe is None or "step" not in var.dims:
            continue
        checked.add(probe.name)
        if var.dtype.kind != "f":  # counts and flags: filled with 0 / -1 where not measured
            continue
        own = probe.coords()
        sel = {dim: own[dim] for dim in var.dims if dim in own and dim != "block"}
        values = var.sel(sel) if sel else var
        due = np.array([probe.due(int(s)) for s in steps])
        data = values.values.astype(float).reshape(len(steps), -1)
        if name == "sharpness_stderr":  # Monte-Carlo stderr for the average kinds; NaN for one batch otherwise
            kinds = list(ds["kind"].values)
            data = data[:, [kinds.index("average"), kinds.index("average_adaptive")]]
        ran = due.copy()
        if name in _FIRST_NAN:
            first = np.flatnonzero(due)[0]
            assert np.isnan(data[first]).all(), name
            ran[first] = False
        assert np.isfinite(data[ran]).all(), name
        assert np.isnan(data[~due]).all(), name  # and nothing where it did not run
    assert checked == set(by_name)  # every probe family wrote per-step values
    # end-of-run results: RSI/EB bounds against w_T, monotonic interpolation, the PCA plane
    for name in ("mu_hat", "L_hat", "mli_barrier", "pca_explained_variance", "surface_loss"):
        assert np.isfinite(ds[name].values).all(), name
    assert np.isfinite(ds["mli_loss"].sel(alpha=by_name["Interpolation"].coords()["alpha"]).values).all()
    assert float(ds["lambda_max"].max()) > 0 and float(ds["trace"].min()) != 0
