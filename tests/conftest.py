import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack

from maskattn import dispatch

# Under pytest-xdist (-n 2) each worker takes one core: one torch thread, and so do the processes it starts.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# MASKATTN_BACKEND=name runs the suite with every backend="auto" call sent to that backend wherever
# it can run the call (dispatch.can_run); calls it cannot run (weights, dropout, ...) keep auto's choice.
FORCED_BACKEND = os.environ.get("MASKATTN_BACKEND")
if FORCED_BACKEND is not None and FORCED_BACKEND not in dispatch.BACKENDS:
    raise ValueError(f"MASKATTN_BACKEND must be one of {sorted(dispatch.BACKENDS)}, got {FORCED_BACKEND!r}")


@pytest.fixture(autouse=True)
def _forced_backend(monkeypatch):
    if FORCED_BACKEND is None:
        return
    choose = dispatch.choose_backend

    def forced(q, k, mask, *, dropout_p, return_weights, q_offset=0, generator=None, return_lse=False):
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if dispatch.can_run(FORCED_BACKEND, q, dropout_p=dropout_p, return_weights=return_weights,
                            needs_grad=needs_grad, generator=generator, return_lse=return_lse):
            return FORCED_BACKEND
        return choose(q, k, mask, dropout_p=dropout_p, return_weights=return_weights, q_offset=q_offset,
                      generator=generator, return_lse=return_lse)

    monkeypatch.setattr(dispatch, "choose_backend", forced)


def _dynamo_settings() -> dict:
    config = sys.modules["torch._dynamo"].config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # reading a deprecated setting warns
        return {name: getattr(config, name, "(deleted)") for name in config.get_config_copy()}


@pytest.fixture(autouse=True)
def _dynamo_settings_kept():
    """A test leaves torch._dynamo's settings as it found them: a setting changed or deleted (monkeypatch's undo
    deletes it under pytest 9.2) broke every later compile in the process, so a test's outcome depended on which
    tests ran before it in the same worker."""
    if "torch._dynamo" not in sys.modules:
        yield
        return
    before = _dynamo_settings()
    yield
    after = _dynamo_settings()
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert not changed, f"torch._dynamo.config settings left changed: {changed} (use torch._dynamo.config.patch)"


@pytest.fixture
def counted_str():
    """A ``str`` subclass that counts its hashes (``counted_str.hashes``) and equality tests
    (``counted_str.comparisons``): set, dict and list-search work done on its values, for tests that assert an
    operation is done once, not once per row."""

    class Counted(str):
        hashes = comparisons = 0

        def __hash__(self):
            Counted.hashes += 1
            return super().__hash__()

        def __eq__(self, other):
            Counted.comparisons += 1
            return super().__eq__(other)

    return Counted


class FakeStderr:
    """A stand-in stderr: a log file (``tty=False``: nohup, CI, a redirect) or a terminal; ``text`` is what was
    written, to it and to the ``maskattn`` logger (a handler on it, as the command line's)."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def fake_stderr(monkeypatch):
    """``fake_stderr(tty)``: sys.stderr replaced by a :class:`FakeStderr` that the ``maskattn`` logger writes to
    (its one handler: an earlier test's ``main()`` left the command line's, which writes to sys.stderr too)."""
    import logging
    import sys

    def make(tty: bool) -> FakeStderr:
        stream = FakeStderr(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(logging.getLogger("maskattn"), "handlers", [logging.StreamHandler(stream)])
        return stream

    return make


@pytest.fixture
def hashed_files(monkeypatch):
    """The names of the files hashed by ``maskattn.io.sha256`` (where checkpoints and models import it too), in
    order: for tests that assert a file is read once."""
    from maskattn import checkpoint, io
    from maskattn.models import persistence

    hashed, real = [], io.sha256

    def counting(file):
        hashed.append(Path(file).name)
        return real(file)

    for module in (io, checkpoint, persistence):
        monkeypatch.setattr(module, "sha256", counting)
    return hashed


class HostReads(TorchDispatchMode):
    """Counts, while active, the operations that read tensor values back to the host: ``.item()``, ``float(t)``,
    ``int(t)``, ``bool(t)`` (all ``aten._local_scalar_dense``) and the data-dependent ones (``nonzero``, boolean
    selection, ``unique``). On a GPU each waits for the device; on CPU they cost little, which is why a test counts.

    ``count`` is their number; ``paused()`` stops counting within it (e.g. an optimizer's step, which reads its step
    counter, a CPU tensor on every device). ``.tolist()`` is counted too (on CPU it reads memory without dispatching);
    ``.cpu()`` and ``.numpy()`` are not.
    """

    READS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                       torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
                       torch.ops.aten.unique_consecutive.default, torch.ops.aten.unique_dim.default})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist

        def counted(tensor):
            if self in _get_current_dispatch_mode_stack():  # not paused
                self.count += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))

    @staticmethod
    def paused():
        return _disable_current_modes()

    @classmethod
    def uncounted(cls, owner, name: str = "forward") -> None:
        """Leave the reads of ``owner.<name>(...)`` uncounted from now on (e.g. a model's attention layers)."""
        call = getattr(owner, name)

        def paused(*args, **kwargs):
            with cls.paused():
                return call(*args, **kwargs)

        setattr(owner, name, paused)


@pytest.fixture
def host_reads():
    """A new :class:`HostReads` counter per call: ``with host_reads() as reads: ...; reads.count``."""
    return HostReads
