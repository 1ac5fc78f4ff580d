"""torch.compile: the three models trace to one graph (fullgraph=True) with every mask kind they build,
forward and a training step, and compute what eager computes."""

import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

from maskattn import attention, masks
from maskattn.backends import blocked_op
from maskattn.models import DecoderLM, EncoderModel, Transformer
from maskattn.models.config import DecoderLMConfig, EncoderConfig, TransformerConfig
from maskattn.training import TrainConfig, Trainer

SMALL = {"vocab_size": 40, "d_model": 32, "num_heads": 4, "d_ff": 64, "dropout": 0.0, "attention_dropout": 0.0,
         "max_len": 64}
IDS = torch.tensor([[5, 9, 3, 7, 11, 2, 8, 4, 6, 10, 12, 13], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0]])
DOCS = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])


def _lm(backend, **kw):
    return DecoderLM(DecoderLMConfig(num_layers=2, backend=backend, **SMALL, **kw))


def _transformer(backend):
    return Transformer(TransformerConfig(num_encoder_layers=1, num_decoder_layers=2, backend=backend, **SMALL))


def _encoder(backend):
    return EncoderModel(EncoderConfig(num_layers=2, backend=backend, **SMALL))


# (model, inputs -> output): causal; causal & padding (from lengths and from pad ids); causal & document;
# encoder padding; decoder causal & padding with cross-attention padding.
CASES = {
    "lm-causal": (_lm, lambda m: m(IDS[:, :10])),
    "lm-lengths-rope": (lambda b: _lm(b, positions="rope"), lambda m: m(IDS, lengths=torch.tensor([12, 7]))),
    "lm-pad-ids": (_lm, lambda m: m(IDS)),
    "lm-documents": (_lm, lambda m: m(IDS, doc_ids=DOCS)),
    "lm-window-documents": (lambda b: _lm(b, sliding_window=4), lambda m: m(IDS, doc_ids=DOCS)),
    "encoder-padding": (_encoder, lambda m: m(IDS, lengths=torch.tensor([12, 5]))),
    "transformer-padding": (_transformer, lambda m: m(IDS, IDS[:, :9], src_lengths=torch.tensor([12, 9]),
                                                      tgt_lengths=torch.tensor([9, 4]))),
}


# Equality is checked through AOT autograd without Inductor's code generation (minutes of C++ compiling on a
# small CPU); test_inductor_training_step runs one model through the default compiler end to end.
COMPILER = "aot_eager"


def _explain(fn, *args):
    dynamo.reset()
    return dynamo.explain(fn)(*args)


# auto runs SDPA on these small problems; blocked runs the custom operator (blocked_op).
FORWARD = [(case, "auto") for case in sorted(CASES)] + [(case, "blocked") for case in ("lm-lengths-rope",
                                                                                       "transformer-padding")]
TRAINING = [("lm-documents", "blocked"), ("lm-lengths-rope", "auto"), ("transformer-padding", "auto"),
            ("encoder-padding", "blocked")]


@pytest.mark.parametrize(("case", "backend"), FORWARD)
def test_forward_is_one_graph_and_equals_eager(case, backend):
    build, run = CASES[case]
    model = build(backend).eval()
    explained = _explain(lambda: run(model))
    assert (explained.graph_count, explained.break_reasons) == (1, [])
    compiled = copy.deepcopy(model)
    compiled.compile(fullgraph=True, backend=COMPILER)
    torch.testing.assert_close(run(compiled), run(model), atol=1e-5, rtol=1e-5)


def _loss(model, run):
    logits = run(model)
    return F.cross_entropy(logits.flatten(0, 1), torch.arange(logits.shape[0] * logits.shape[1]) % 7)


def _check_training_step(case, backend, compiler):
    build, run = CASES[case]
    eager = build(backend).train()
    explained = _explain(lambda: _loss(eager, run))
    assert (explained.graph_count, explained.break_reasons) == (1, [])
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True, backend=compiler)
    # SGD: Adam would divide gradients that are 0 in exact arithmetic (a key bias's) by their own rounding noise
    for model in (eager, compiled):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            _loss(model, run).backward()
            opt.step()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("case", "backend"), TRAINING)
def test_training_step_is_one_graph_and_equals_eager(case, backend):
    """Forward and loss in one graph; two SGD steps (backward through the compiled graph) equal eager."""
    _check_training_step(case, backend, COMPILER)


def test_blocked_training_under_dynamic_shapes_equals_eager_at_two_sizes():
    """dynamic=True: the document mask's batch size is symbolic. The mask's spec held it as a constant (its
    repr failed while tracing); its integers now travel as operator arguments, and one graph serves both sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dynamo.reset()
    eager = DecoderLM(DecoderLMConfig(num_layers=1, backend="blocked", **SMALL)).train()
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(COMPILER)
    compiled.compile(fullgraph=True, dynamic=True, backend=counter)
    docs = torch.tensor([[0] * 6 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 8, [0] * 17])
    ids = torch.randint(3, 40, (3, 17))
    frames = []
    for run in (lambda m: m(IDS, doc_ids=DOCS), lambda m: m(ids, doc_ids=docs)):
        for model in (eager, compiled):
            model.zero_grad()
            _loss(model, run).backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
        frames.append(counter.frame_count)
    assert frames[1] == frames[0]  # the second size ran the first size's graphs: nothing recompiled


@pytest.mark.parametrize(("kw", "length"), [({"sliding_window": 4}, 600), ({}, 600)], ids=["window", "padding"])
def test_auto_dispatch_traces_large_combined_masks_and_keeps_sizes_symbolic(kw, length):
    """The auto rules wrote their reasons while tracing: at Lq x Lk above SMALL_SCORES the last rule's repr of
    causal & padding joined strings (fullgraph failed), and the small-problem rule formatted Lq and Lk, fixing a
    dynamic=True graph to one length (a graph per length)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig(num_layers=1, **{**SMALL, "max_len": 1024}, **kw)).eval()
    dynamo.reset()
    counter = CompileCounterWithBackend(COMPILER)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for n in (12, 14, 20, length):
        ids = torch.randint(1, SMALL["vocab_size"], (2, n))
        lengths = torch.tensor([n, n // 2])
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, lengths=lengths), model(ids, lengths=lengths),
                                       atol=1e-5, rtol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] == frames[2]  # the small lengths share one graph


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["grouped", "equal"])
def test_sdpa_under_dynamic_shapes_equals_the_reference_at_two_sizes(kv_heads):
    """Head counts are symbolic under dynamic=True: `Hq != Hkv` was a SymBool, which SDPA's enable_gqa refuses.
    The mask is built inside the graph: padding() and prefix_lm() read no lengths on the host while compiling."""
    def run(q, k, v, lengths):
        mask = masks.causal() & masks.sliding_window(4) & masks.padding(lengths) | masks.prefix_lm(lengths // 4)
        return attention(q, k, v, mask, backend="sdpa")

    dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend=COMPILER)
    for batch, length in ((2, 11), (3, 19)):
        q = torch.randn(batch, 4, length, 8)
        k, v = torch.randn(batch, kv_heads, length, 8), torch.randn(batch, kv_heads, length, 8)
        lengths = torch.tensor([length - 2 * i for i in range(batch)])
        mask = masks.causal() & masks.sliding_window(4) & masks.padding(lengths) | masks.prefix_lm(lengths // 4)
        torch.testing.assert_close(compiled(q, k, v, lengths), attention(q, k, v, mask, backend="reference"),
                                   atol=1e-5, rtol=1e-5)


def _graph_ops(explained) -> set:
    return {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}


def test_vocabulary_loss_is_one_graph_and_equals_eager(monkeypatch):
    """DecoderLM(ids, targets=...) on packed rows in chunks of 4 rows: compiled, the float32 chunks are one
    opaque operator (faster than Inductor's fused plain loss at a large vocabulary); under bfloat16 autocast
    the plain projection and loss, which Inductor fuses faster than the chunks."""
    from maskattn.layers import vocab_loss

    monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", 4 * SMALL["vocab_size"])
    targets = torch.cat([IDS[:, 1:], torch.full((2, 1), -100)], dim=1)
    eager = _lm("auto").train()
    for bf16, op_in_graph in ((False, True), (True, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            explained = _explain(lambda: eager(IDS, doc_ids=DOCS, targets=targets))
        assert (explained.graph_count, explained.break_reasons) == (1, [])
        assert ("maskattn.linear_cross_entropy_chunks.default" in _graph_ops(explained)) == op_in_graph
        compiled = copy.deepcopy(eager)
        compiled.compile(fullgraph=True, backend=COMPILER)
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(IDS, doc_ids=DOCS, targets=targets)
            loss.backward()
            losses.append(loss)
        tol = 3e-2 if bf16 else 1e-5  # bfloat16: the same products, rounded in another order
        torch.testing.assert_close(losses[1], losses[0], atol=tol, rtol=tol)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=tol * max(1.0, p.grad.abs().max().item()), rtol=tol,
                                       msg=name)


def test_compiled_chunked_loss_equals_pytorch_for_each_reduction_and_gradient():
    from maskattn.layers import vocab_loss

    hidden, weight = torch.randn(24, 8), torch.randn(40, 8)
    fused = torch.compile(vocab_loss.linear_cross_entropy, fullgraph=True, backend=COMPILER)
    some, none = torch.randint(0, 40, (24,)), torch.full((24,), -100)
    some[3] = -100
    # (targets, reduction, hidden needs a gradient, weight needs one); nothing to predict: NaN, zero gradients
    cases = [(some, "sum", True, True), (some, "mean", True, False), (some, "sum", False, True),
             (none, "mean", True, True)]
    for targets, reduction, grad_h, grad_w in cases:
        results = []
        for loss_of in (lambda h, w, t=targets, r=reduction: fused(h, w, t, reduction=r, chunk_rows=5),
                        lambda h, w, t=targets, r=reduction: F.cross_entropy(h @ w.T, t, reduction=r)):
            h, w = hidden.clone().requires_grad_(grad_h), weight.clone().requires_grad_(grad_w)
            loss = loss_of(h, w)
            (3 * loss).backward()  # the incoming gradient scales both
            results.append((loss.detach(), h.grad, w.grad))
        torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5, equal_nan=True,
                                   msg=lambda m, c=(reduction, grad_h, grad_w): f"{c}: {m}")
    explained = _explain(lambda: vocab_loss.linear_cross_entropy(hidden.requires_grad_(), weight, some, chunk_rows=5))
    assert "maskattn.linear_cross_entropy_chunks.default" in _graph_ops(explained)


def test_head_dropout_keeps_a_training_step_one_graph():
    model = _lm("auto", head_dropout=0.2).train()
    explained = _explain(lambda: _loss(model, lambda m: m(IDS[:, :10])))
    assert (explained.graph_count, explained.break_reasons) == (1, [])


@pytest.mark.slow
def test_inductor_training_step_equals_eager():
    """The default compiler (Inductor) end to end, through the blocked operator and its backward."""
    from torch._inductor import config

    # Inductor's on-disk cache keys graphs, not the operator's fake implementation: never reuse a stale entry
    with config.patch(force_disable_caches=True):
        _check_training_step("lm-documents", "blocked", "inductor")


def test_auto_rules_decide_from_structure_while_compiling():
    """Packed documents above the small-problem size: eager splits them per document (it reads the ids),
    a compiled graph cannot, and runs the blocked operator instead; both equal the reference."""
    q, k, v = (torch.randn(1, 2, 640, 8) for _ in range(3))
    mask = masks.causal() & masks.document(torch.arange(640)[None] // 200)
    explained = _explain(lambda: attention(q, k, v, mask))
    assert (explained.graph_count, explained.break_reasons) == (1, [])
    expected = attention(q, k, v, mask, backend="reference")
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, mask), fullgraph=True, backend=COMPILER)
    torch.testing.assert_close(compiled(q, k, v), expected, atol=1e-5, rtol=1e-5)


MASKS = {
    "none": None,
    "causal-document": masks.causal() & masks.document(torch.tensor([[0] * 9 + [1] * 14, [0] * 23])),
    "window-padding": masks.causal() & masks.sliding_window(5) & masks.padding(torch.tensor([23, 11])),
    "prefix": masks.prefix_lm(4),
    "rows-that-see-nothing": ~masks.causal(),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_blocked_operator_equals_blocked_eager_with_gradients(name):
    mask = MASKS[name]
    q = torch.randn(2, 4, 23, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 23, 8, requires_grad=True) for _ in range(2))
    spec, tensors, ints = blocked_op.flatten_mask(mask)
    assert repr(blocked_op.unflatten_mask(spec, tensors, ints)) == repr(mask)
    seed = torch.zeros(1, dtype=torch.long)
    out, lse, _ = torch.ops.maskattn.blocked_attention(q, k, v, tensors, spec, ints, seed, 0.3, 0.0, 0, 8, 8, "fused",
                                                       True)
    ref_out, ref_lse = blocked_op.blocked.attention(q, k, v, mask, scale=0.3, return_lse=True, block_q=8, block_k=8)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_blocked_operator_passes_opcheck():
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))
    spec, tensors, ints = blocked_op.flatten_mask(MASKS["window-padding"].parts[1] & masks.causal())
    args = (q, k, v, tensors, spec, ints, torch.zeros(1, dtype=torch.long), 0.3, 0.0, 0, 8, 8, "math", True)
    torch.library.opcheck(torch.ops.maskattn.blocked_attention.default, args)


def test_a_mask_class_must_name_its_state():
    class Forgetful(masks.Mask):  # its __init__ sets an attribute that its _state does not name
        def __init__(self):
            self.step = 2

    with pytest.raises(TypeError, match=r"Forgetful holds the attributes \['step'\] but its _state names \[\]"):
        blocked_op.flatten_mask(masks.causal() & Forgetful())


def test_a_mask_spec_names_only_maskattn_masks():
    with pytest.raises(ValueError, match="not a maskattn mask class"):
        blocked_op.unflatten_mask("('mask', 'os', 'system', ())", [])


# Module-level masks: dynamo gives the tensors of a global mask sizes of their own under dynamic=True
BATCH_MASK = masks.padding(torch.arange(9)[None] < torch.tensor([[6], [9]]))  # (B=2, Lk): a valid-key tensor
HEADS_MASK = masks.from_tensor(torch.ones(1, 4, 9, 9, dtype=torch.bool).tril())


def _check_batch(q):
    BATCH_MASK.check(q.shape[2], q.shape[2], batch=q.shape[0], heads=q.shape[1])  # the global, not a closure
    return q * 2


def _check_heads(q):
    HEADS_MASK.check(q.shape[2], q.shape[2], batch=q.shape[0], heads=q.shape[1])
    return q * 2


@pytest.mark.parametrize("check", [_check_batch, _check_heads], ids=["batch", "heads"])
def test_a_global_masks_sizes_check_under_dynamic_shapes(check):
    """The batch and head checks compare two symbolic sizes: `in (1, batch)` traced as unequal and raised
    "batch size 2 ... does not match the batch size B=2"; a mismatch must still raise the same error."""
    dynamo.reset()
    q = torch.randn(2, 4, 9, 8)
    compiled = torch.compile(check, fullgraph=True, dynamic=True, backend=COMPILER)
    torch.testing.assert_close(compiled(q), q * 2)
    with pytest.raises(ValueError, match="does not match"):
        check(torch.randn(3, 5, 9, 8))
    with pytest.raises(RuntimeError, match="does not match"):  # in the graph: torch._check's constant message
        compiled(torch.randn(3, 5, 9, 8))


def test_eager_keeps_its_host_checks():
    model = _lm("auto")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 40\)"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="input_ids_lengths must be in"):
        model(IDS, lengths=torch.tensor([13, 2]))


def test_trainer_compiles_the_model_in_place(tmp_path):
    model = _lm("auto")
    cfg = TrainConfig(steps=1, compile=True, progress=False, checkpoint_every=0)

    def loss(m, batch):
        return _loss(m, lambda m: m(batch["ids"])) * batch["num_targets"]

    trainer = Trainer(model, cfg, plan=lambda epoch: [[0]], collate=lambda idx: {"ids": IDS, "num_targets": 24},
                      loss=loss, out_dir=tmp_path, device="cpu")
    assert trainer.model is model and model._compiled_call_impl is not None
    assert sorted(trainer.state()["model"]) == sorted(_lm("auto").state_dict())
    trainer.fit()


# Greedy decoding on a static KV cache: one-token steps with fixed shapes, one graph for the whole generation.
PROMPTS = {"one-row": (torch.tensor([[5, 9, 3, 7]]), torch.tensor([4])),
           "padded-rows": (torch.tensor([[5, 9, 3, 7, 11, 2], [3, 4, 0, 0, 0, 0], [8, 6, 1, 9, 0, 0]]),
                           torch.tensor([6, 2, 4]))}


def _static_greedy(model, prompt, lengths, new, step):
    with torch.no_grad():
        state, logits = model.begin_decoding(prompt, lengths, max_new_tokens=new, static=True)
        tokens = [logits.argmax(-1)]
        for _ in range(new - 1):
            tokens.append(step(model, state, tokens[-1][:, None]).argmax(-1))
    return torch.stack(tokens, dim=1)  # (B, new)


@pytest.mark.parametrize("case", sorted(PROMPTS))
@pytest.mark.parametrize("kw", [{}, {"positions": "rope", "sliding_window": 3}], ids=["learned", "rope-window"])
def test_static_decoding_step_is_one_graph_and_equals_eager(case, kw):
    from maskattn import decoding

    model = _lm("auto", **kw).eval()
    prompt, lengths = PROMPTS[case]
    with torch.no_grad():
        state, logits = model.begin_decoding(prompt, lengths, max_new_tokens=4, static=True)
        explained = _explain(decoding._last_logits, model, state, logits.argmax(-1)[:, None])
    assert (explained.graph_count, explained.break_reasons) == (1, [])
    dynamo.reset()
    compiled = torch.compile(decoding._last_logits, fullgraph=True, backend=COMPILER)
    eager = decoding.greedy(model, prompt, lengths, max_new_tokens=10)
    assert torch.equal(_static_greedy(model, prompt, lengths, 10, compiled), eager)
    assert torch.equal(_static_greedy(model, prompt, lengths, 7, compiled), eager[:, :7])  # the same graph


@pytest.mark.slow
def test_inductor_greedy_and_sample_equal_eager():
    """``greedy``/``sample(compile=True)``: the default compiler end to end, batch 1 and padded rows."""
    from maskattn import decoding

    model = _lm("auto").eval()
    for prompt, lengths in PROMPTS.values():
        # 20 steps: batch 1 then projects through the head's (E, V) copy (models.common.MIN_STEPS_FOR_COPY)
        assert torch.equal(decoding.greedy(model, prompt, lengths, max_new_tokens=20, compile=True),
                           decoding.greedy(model, prompt, lengths, max_new_tokens=20))
        draws = [decoding.sample(model, prompt, lengths, max_new_tokens=8, top_k=5, compile=compile,
                                 generator=torch.Generator().manual_seed(1)) for compile in (True, False)]
        assert torch.equal(*draws)


def test_compiled_decoding_reuses_its_graph_across_batch_sizes_and_limits(monkeypatch):
    """``greedy(compile=True)`` keeps the static caches in module buffers, which dynamo held at fixed shapes:
    every new (batch, prompt + limit) compiled a graph anew and the ninth raised FailOnRecompileLimitHit."""
    import functools

    from torch._dynamo.utils import counters

    from maskattn import decoding

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=COMPILER))
    decoding._COMPILED.clear()
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _lm("auto").eval()
    try:
        for batch in (1, 2, 3, 5):
            for new in (4, 9, 13):
                prompt = torch.randint(1, SMALL["vocab_size"], (batch, 6))
                lengths = torch.tensor([6] + [max(1, 6 - i) for i in range(1, batch)])
                kw = {"max_new_tokens": new, "eos_id": decoding.NO_EOS}
                assert torch.equal(decoding.greedy(model, prompt, lengths, compile=True, **kw),
                                   decoding.greedy(model, prompt, lengths, **kw)), (batch, new)
        assert counters["stats"]["unique_graphs"] <= 3  # static, then the capacity and the batch made dynamic
    finally:
        decoding._COMPILED.clear()


def test_compiled_decoding_takes_more_kinds_of_model_than_the_recompile_limit(monkeypatch):
    """``greedy(compile=True)`` kept one compiled step for every model: a process that decoded models of nine
    depths failed with FailOnRecompileLimitHit (here the limit is 2 and three depths), and every graph stayed.
    Each kind of model (class and config) now has its own step, the oldest dropped past ``COMPILED_KINDS``."""
    import functools
    import gc
    import weakref

    from maskattn import decoding

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(decoding, "COMPILED_KINDS", 2)
    decoding._COMPILED.clear()
    dynamo.reset()
    prompt, lengths = torch.randint(1, SMALL["vocab_size"], (2, 5)), torch.tensor([5, 3])
    kw = {"max_new_tokens": 4, "eos_id": decoding.NO_EOS}
    steps = []
    try:
        # dynamo's own patch, not monkeypatch: its undo (pytest 9.2) deletes the setting, and every later compile in
        # the process failed ("torch._dynamo.config.recompile_limit does not exist")
        with dynamo.config.patch(recompile_limit=2):
            for depth in (1, 2, 3):
                torch.manual_seed(depth)
                model = DecoderLM(DecoderLMConfig(num_layers=depth, backend="auto", **SMALL)).eval()
                for batch in (2, 1):  # a second shape: the graph made dynamic counts against the limit too
                    assert torch.equal(decoding.greedy(model, prompt[:batch], lengths[:batch], compile=True, **kw),
                                       decoding.greedy(model, prompt[:batch], lengths[:batch], **kw)), (depth, batch)
                steps.append(weakref.ref(decoding._compiled_step(model)))
        gc.collect()
        assert len(decoding._COMPILED) == 2
        assert [step() is None for step in steps] == [True, False, False]  # the oldest kind's graphs are gone
    finally:
        decoding._COMPILED.clear()
