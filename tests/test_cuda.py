"""The same guarantees on a GPU: every backend that runs there equals the CPU reference (forward and
gradients, float32 and half precision), masks built from GPU tensors work, the models decode with the KV
cache exactly as their full forward, a training step on the GPU equals the CPU's, and the compiled model
is one graph.

Skipped without CUDA (CI has none). ``MASKATTN_TEST_DEVICE=cpu`` runs the file on the CPU, which checks
the tests themselves.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskattn
from maskattn import decoding, masks
from maskattn.backends import REGISTRY, reference
from maskattn.dispatch import can_run, choose_backend
from maskattn.models import DecoderLM, Transformer
from maskattn.models.config import DecoderLMConfig, TransformerConfig
from strategies import HEADS, attention_inputs, mask_cases

DEVICE = torch.device(os.environ.get("MASKATTN_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (MASKATTN_TEST_DEVICE=cpu runs these tests on the CPU)")


def _trainable(dtype, *, compiled=False):
    """The backends other than the reference that train here; FlexAttention (compiled for every new shape
    and mask on a GPU, seconds each) only when ``compiled``."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        return []
    probe = torch.zeros(1, 1, 1, 8, device=DEVICE, dtype=dtype)
    return [name for name in REGISTRY if name != "reference" and (compiled or name != "flex")
            and can_run(name, probe, dropout_p=0.0, return_weights=False, needs_grad=True)]


def _check_against_cpu_reference(name, q, k, v, mask, q_offset, tol):
    """Backend ``name`` on DEVICE against the float32 reference on the CPU: output and the q, k, v gradients."""
    dev = [x.detach().to(DEVICE).requires_grad_() for x in (q, k, v)]
    cpu = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ours = maskattn.attention(*dev, mask, backend=name, q_offset=q_offset)
    theirs, _ = reference.attention(*cpu, mask, scale=q.shape[-1] ** -0.5, q_offset=q_offset)
    assert ours.device.type == DEVICE.type

    def close(a, b, what):
        a = a.float().cpu()
        assert torch.isfinite(a).all(), f"{name} {what}: not finite"
        atol = tol * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol, rtol=tol, msg=lambda m: f"{name} {what}: {m}")

    close(ours, theirs, "output")
    grad = torch.randn_like(theirs)
    for what, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(ours, dev, grad.to(DEVICE, ours.dtype)),
                          torch.autograd.grad(theirs, cpu, grad), strict=True):
        close(a, b, what)


@pytest.mark.parametrize("name", _trainable(torch.float32))
@settings(max_examples=25)
@given(case=mask_cases(max_len=20), heads=st.sampled_from(HEADS), data=st.data())
def test_backend_on_the_device_equals_the_cpu_reference(name, case, heads, data):
    q, k, v = attention_inputs(case, heads, data, grad=False)  # masks built from CPU tensors, as users often do
    _check_against_cpu_reference(name, q, k, v, case.mask, case.q_offset, 1e-4)


def _device_masks(n):
    """Masks built from tensors on the device, as a GPU training loop builds them."""
    lengths = torch.tensor([n, n - 5], device=DEVICE)
    ids = torch.tensor([[0] * 10 + [1] * (n - 10), [0] * 3 + [1] * 20 + [2] * (n - 23)], device=DEVICE)
    prefix = torch.tensor([4, 9], device=DEVICE)
    return {
        "causal": masks.causal(),
        "causal&padding": masks.causal() & masks.padding(lengths),
        "window": masks.causal() & masks.sliding_window(16),
        "document": masks.causal() & masks.document(ids),
        "prefix": masks.prefix_lm(prefix),
        "tensor": masks.from_tensor(torch.rand(2, 1, n, n, device=DEVICE) > 0.3),
        "empty rows": masks.padding(torch.tensor([0, n], device=DEVICE)),  # row 0 may attend nothing: zeros
        "cu_seqlens": masks.causal() & masks.from_cu_seqlens(torch.tensor([0, 10, 30, n], device=DEVICE)),
    }


# the keys of _device_masks
DEVICE_MASKS = ["causal", "causal&padding", "window", "document", "prefix", "tensor", "empty rows", "cu_seqlens"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", DEVICE_MASKS)
def test_masks_from_device_tensors_on_every_backend_and_dtype(kind, dtype):
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.skip("float16 attention is a GPU dtype")
    n = 64
    mask = _device_masks(n)[kind]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, n, 32, generator=gen).to(dtype) for _ in range(3))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name in ["auto", *_trainable(dtype)]:
        _check_against_cpu_reference(name, q, k, v, mask, 0, tol)


CPU_BUILT = {"cpu document": lambda: masks.causal() & masks.document(torch.tensor([[0] * 20 + [1] * 44] * 2)),
             "cpu prefix": lambda: masks.prefix_lm(torch.tensor([5, 30]))}


@pytest.mark.parametrize("kind", ["causal&padding", "window", "document", *CPU_BUILT])
def test_flex_on_the_device_equals_the_cpu_reference(kind):
    if "flex" not in _trainable(torch.float32, compiled=True):
        pytest.skip("FlexAttention does not train on this device")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=gen) for _ in range(3))
    mask = CPU_BUILT[kind]() if kind in CPU_BUILT else _device_masks(64)[kind]  # CPU tensors: moved by the backend
    _check_against_cpu_reference("flex", q, k, v, mask, 0, 1e-4)


@pytest.mark.parametrize("kind", ["window", "prefix", "tensor", "causal&padding"])
def test_auto_on_a_gpu_runs_fused_kernels_not_the_tile_loop(kind):
    if DEVICE.type == "cpu":
        pytest.skip("on the CPU these masks go to blocked (tests/test_dispatch.py)")
    n = 1024
    q = torch.randn(2, 4, n, 32, device=DEVICE)
    mask = {**_device_masks(n), "tensor": masks.from_tensor(torch.rand(n, n, device=DEVICE) > 0.5)}[kind]
    assert choose_backend(q, q, mask, dropout_p=0.0, return_weights=False) == "sdpa"


@pytest.mark.parametrize("kind", ["window", "prefix", "causal&padding"])
def test_what_auto_runs_on_long_rows_equals_the_reference(kind):
    # n = 1024 is past the small-problem rule: the band calls (window, with grouped-query heads), the dense mask
    n = 1024
    mask = {"window": masks.causal() & masks.sliding_window(64), "prefix": masks.prefix_lm(torch.tensor([100, 7])),
            "causal&padding": masks.causal() & masks.padding(torch.tensor([n, 300]))}[kind]
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, n, 32, generator=gen)
    k, v = (torch.randn(2, 2, n, 32, generator=gen) for _ in range(2))
    _check_against_cpu_reference("auto", q, k, v, mask, 0, 1e-4)


def test_auto_picks_a_fused_kernel_on_the_device_where_one_applies():
    q = torch.randn(2, 4, 256, 64, device=DEVICE)
    assert choose_backend(q, q, masks.causal(), dropout_p=0.0, return_weights=False) == "sdpa"


def _lm(**kw):
    torch.manual_seed(0)
    cfg = DecoderLMConfig(vocab_size=50, d_model=32, num_heads=4, d_ff=64, num_layers=2, dropout=0.0, max_len=128, **kw)
    return DecoderLM(cfg).to(DEVICE).eval()


LM_KINDS = [{}, {"positions": "rope", "num_kv_heads": 2}, {"positions": "rope", "sliding_window": 8}]


@pytest.mark.parametrize("kw", LM_KINDS, ids=["learned", "rope-gqa", "window"])
def test_cached_generation_on_the_device_equals_the_full_forward(kw):
    model = _lm(**kw)
    prompt = torch.randint(1, 50, (3, 12), device=DEVICE)
    with torch.no_grad():
        tokens = decoding.greedy(model, prompt, max_new_tokens=30)
        assert tokens.device.type == DEVICE.type
        full = model(torch.cat([prompt, tokens], dim=1))[:, prompt.shape[1] - 1 : -1]  # (B, new, V)
    assert torch.equal(full.argmax(-1), tokens)


def test_sampling_on_the_device_with_a_cpu_generator_draws_what_the_cpu_draws():
    model = _lm()
    cpu = _lm().cpu()
    prompt = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        got = decoding.sample(model, prompt.to(DEVICE), max_new_tokens=12, generator=torch.Generator().manual_seed(5))
        want = decoding.sample(cpu, prompt, max_new_tokens=12, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got.cpu(), want)


def test_transformer_beam_search_on_the_device_equals_the_cpu():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=40, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2,
                            num_decoder_layers=2, dropout=0.0, max_len=64)
    cpu = Transformer(cfg).eval()
    dev = Transformer(cfg).to(DEVICE).eval()
    dev.load_state_dict(cpu.state_dict())
    src = torch.randint(3, 40, (3, 10))
    lengths = torch.tensor([10, 7, 4])
    with torch.no_grad():
        want, want_scores = decoding.beam_search(cpu, src, lengths, beam_size=3, max_new_tokens=12, eos_id=2)
        got, got_scores = decoding.beam_search(dev, src.to(DEVICE), lengths.to(DEVICE), beam_size=3,
                                               max_new_tokens=12, eos_id=2)
    assert torch.equal(got.cpu(), want)
    torch.testing.assert_close(got_scores.cpu(), want_scores, atol=1e-4, rtol=1e-4)


def test_a_training_step_on_the_device_equals_the_cpu():
    cpu = _lm(positions="rope").cpu().train()
    dev = _lm(positions="rope").train()
    dev.load_state_dict(cpu.state_dict())
    ids = torch.randint(1, 50, (2, 40))
    docs = torch.tensor([[0] * 15 + [1] * 25, [0] * 30 + [1] * 10])
    losses, grads = [], []
    for model, device in ((cpu, "cpu"), (dev, DEVICE)):
        logits = model(ids[:, :-1].to(device), doc_ids=docs[:, :-1].to(device))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten().to(device))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16-autocast", "fp16-autocast"])
def test_the_chunked_vocabulary_loss_on_the_device_equals_the_cpu(dtype, monkeypatch):
    """DecoderLM(ids, targets=...) in chunks of 8 rows: on the device (under autocast to ``dtype``) against
    float32 on the CPU, loss and every gradient."""
    from maskattn.layers import vocab_loss

    monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", 8 * 50)  # 8 rows per chunk at the 50-token vocabulary
    cpu = _lm().cpu().train()
    dev = _lm().train()
    dev.load_state_dict(cpu.state_dict())
    ids = torch.randint(1, 50, (2, 40))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    losses, grads = [], []
    for model, device, half in ((cpu, torch.device("cpu"), None), (dev, DEVICE, dtype)):
        with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
            loss = model(ids.to(device), targets=targets.to(device)) / 78  # per target
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float().cpu() for p in model.parameters()]))
    tol = 1e-4 if dtype is None else 5e-2
    assert losses[1] == pytest.approx(losses[0], rel=tol)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], atol=tol * grads[0].abs().max().item(), rtol=tol)


def test_the_compiled_model_on_the_device_is_one_graph_and_equals_eager():
    import torch._dynamo as dynamo

    model = _lm(positions="rope")
    ids = torch.randint(1, 50, (2, 24), device=DEVICE)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24], device=DEVICE)
    dynamo.reset()
    explained = dynamo.explain(model)(ids, doc_ids=docs)
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, doc_ids=docs), model(ids, doc_ids=docs), atol=1e-4, rtol=1e-4)


def test_bf16_autocast_on_the_device_stays_close_to_float32():
    model = _lm()
    ids = torch.randint(1, 50, (2, 32), device=DEVICE)
    with torch.no_grad():
        full = model(ids)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            half = model(ids)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=5e-2 * full.abs().max().item(), rtol=5e-2)


def test_the_cli_trains_and_evaluates_on_the_device(tmp_path, capsys, monkeypatch):
    # the trainer picks CUDA where it is: the collated batches, word dropout, the validation and the export
    # must all follow the model there (before the first GPU session every CLI training failed on one)
    from maskattn import distributed, training
    from maskattn.cli import main

    lines = ["sentence\tlabel"] + [f"a {w} film\t{int(w == 'good')}" for w in ("good", "bad") * 20]
    for name in ("train", "valid"):
        (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    settings = ['data.tokenizer="chars"', "model.d_model=16", "model.d_ff=32", "model.num_heads=2",
                "model.num_layers=1", "train.steps=4", "train.eval_every=2", "train.progress=false",
                "data.word_dropout=0.1"]
    ran = []
    original = training.Trainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        ran.append(self.device.type)

    monkeypatch.setattr(training.Trainer, "__init__", spy)
    assert main(["train", "classification", "--train", str(tmp_path / "train.tsv"), "--valid",
                 str(tmp_path / "valid.tsv"), "--out", str(tmp_path / "run"),
                 *[a for s in settings for a in ("--set", s)]]) == 0
    assert ran == [distributed.local_device().type]  # the GPU wherever there is one
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "valid.tsv")]) == 0
