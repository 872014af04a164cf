"""The direct launch path of ``hf_flexattn.kernels._launch`` (logic only, with a stand-in
for a jitted kernel; the CUDA tests in test_decode.py run it for real)."""

from __future__ import annotations

import pytest
import torch
from hf_flexattn.kernels import _launch

triton = pytest.importorskip("triton")


class FakeCompiled:
    def __init__(self, log):
        self.function, self.packed_metadata, self.log = "fn", "meta", log

    def run(self, *a):
        self.log.append(("direct", a))


class FakeJit:
    """Stands in for a @triton.jit function ``k(X, n, scale, BLOCK: constexpr, FLAG:
    constexpr)``; ``fake[grid](...)`` "compiles" once per call and returns the kernel."""

    arg_names = ["X", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def runner(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return FakeCompiled(self.log)

        return runner


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(_launch, "interpreter_on", lambda: False)
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_raw_stream", lambda dev: 1234)
    monkeypatch.setattr(_launch, "_disabled", False)


def test_second_call_goes_direct_with_all_arguments_in_order(fake_cuda):
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    x = torch.zeros(64)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    lau((3, 2), (x, 48, 0.5), cx)
    lau((5,), (x, 64, 0.25), cx)
    assert [e[0] for e in fn.log] == ["triton", "direct"]
    a = fn.log[1][1]
    # grid padded to 3-D, the current stream, the compiled function and metadata, no hooks,
    # then every parameter in signature order (constexprs included)
    assert a[:9] == (5, 1, 1, 1234, "fn", "meta", None, None, None)
    assert a[9] is x and a[10:] == (64, 0.25, 32, True)


@pytest.mark.parametrize(
    "change",
    [
        "misaligned",  # a tensor not 16-byte aligned
        "int1",  # an int equal to 1
        "int_odd",  # an int no longer divisible by 16
        "dtype",
        "constexpr",
        "warps",
    ],
)
def test_a_new_specialisation_goes_through_triton(fake_cuda, change):
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    base = torch.zeros(64)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    lau((1,), (base, 48, 0.5), cx)
    x, n, c = base, 48, dict(cx)
    if change == "misaligned":
        x = base[1:]
    elif change == "int1":
        n = 1
    elif change == "int_odd":
        n = 47
    elif change == "dtype":
        x = base.double()
    elif change == "constexpr":
        c["BLOCK"] = 64
    else:
        c["num_warps"] = 8
    lau((1,), (x, n, 0.5), c)
    assert [e[0] for e in fn.log] == ["triton", "triton"]


def test_hooks_or_odd_arguments_take_triton_path(fake_cuda, monkeypatch):
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    x = torch.zeros(64)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    lau((1,), (x, 48, 0.5), cx)
    lau((1,), (x, 2**40, 0.5), cx)  # outside int32
    lau((1,), (x, [1], 0.5), cx)  # not a plain argument
    from triton import knobs

    hook = knobs.runtime.launch_enter_hook
    if hook is None or type(hook).__name__ != "HookChain":
        pytest.skip("this Triton has no launch hook chain")
    monkeypatch.setattr(hook, "calls", [lambda *a: None])
    lau((1,), (x, 48, 0.5), cx)
    assert [e[0] for e in fn.log] == ["triton"] * 4


def test_spec_distinguishes_bool_from_int():
    assert _launch._spec((True,)) != _launch._spec((1,))
    assert _launch._spec((16,)) != _launch._spec((17,))


def test_bound_launch_inspects_only_the_head(fake_cuda):
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    bound = lau.bind((7, 3), (48, 0.5), cx)
    x, y = torch.zeros(64), torch.ones(64)
    bound(x)
    bound(y)  # same specialisation (aligned float32 tensor): direct
    bound(y[1:])  # misaligned head: another specialisation, through Triton
    bound(y)
    assert [e[0] for e in fn.log] == ["triton", "direct", "triton", "direct"]
    a = fn.log[1][1]
    assert a[:9] == (7, 3, 1, 1234, "fn", "meta", None, None, None)
    assert a[9] is y and a[10:] == (48, 0.5, 32, True)
    # once the Bound knows its kernel, the head goes as raw pointers (ints)
    a = fn.log[3][1]
    assert a[:9] == (7, 3, 1, 1234, "fn", "meta", None, None, None)
    assert a[9] == y.data_ptr() and type(a[9]) is int and a[10:] == (48, 0.5, 32, True)


def test_bounds_sharing_an_entry_launch_directly_from_their_first_call(fake_cuda):
    # one Bound per decoding step: a new step's Bound with the same tail specialisation finds
    # the kernel the previous step's Bound compiled, and passes its own tail
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    shared = lau.shared_entry(cx)
    x = torch.zeros(64)
    lau.bind((7,), (48, 0.5), cx, shared=shared)(x)
    lau.bind((7,), (64, 0.25), cx, shared=shared)(x)
    assert [e[0] for e in fn.log] == ["triton", "direct"]
    assert fn.log[1][1][10:] == (64, 0.25, 32, True)
    lau.bind((7,), (64, 0.25), cx)(x)  # no shared entry: its own first call looks it up
    assert [e[0] for e in fn.log] == ["triton", "direct", "direct"]


def test_spec_of_mixed_arguments():
    x = torch.zeros(64)
    assert _launch._spec((x, 1, 32, 33, None, True, False, 0.5, x[1:])) == (
        (torch.float32, True), 1, 16, 0, None, "T", "F", 0.5, (torch.float32, False)
    )
    assert _launch._spec((2**31,)) is None
    assert _launch._spec(("a",)) is None


def test_bound_checks_the_alignment_of_the_first_checked_head_tensors(fake_cuda):
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    bound = lau.bind((7,), (0.5,), cx, checked=1)
    x, y = torch.zeros(64), torch.zeros(64)
    bound(x, y)
    bound(x[1:], y)  # the checked tensor misaligned: another specialisation
    bound(x, y)
    assert [e[0] for e in fn.log] == ["triton", "triton", "direct"]
    assert fn.log[2][1][9:11] == (x, y) and fn.log[2][1][11:] == (0.5, 32, True)


def test_bound_falls_back_to_triton_when_the_launcher_rejects_arguments(fake_cuda, monkeypatch):
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    bound = lau.bind((7,), (48, 0.5), cx)
    x = torch.zeros(64)
    bound(x)

    def bad_run(*a):
        raise TypeError("other arguments")

    key = next(iter(lau.kernels))
    lau.kernels[key] = (bad_run,) + lau.kernels[key][1:]
    bound2 = lau.bind((7,), (48, 0.5), cx)
    bound2(x)  # looks the kernel up, the direct call fails: Triton launches instead
    assert _launch._disabled
    bound2(x)
    assert [e[0] for e in fn.log] == ["triton", "triton", "triton"]


def test_bound_direct_tail_goes_to_direct_launches_only(fake_cuda):
    # Triton's own path must see the tensors (it specialises on their dtypes); direct
    # launches get the owner's stand-ins (raw pointers)
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    x, t = torch.zeros(64), torch.zeros(16)
    bound = lau.bind((7,), (t, 0.5), cx, direct_tail=(t.data_ptr(), 0.5))
    bound(x)  # compiles through Triton with the tensor
    bound(x)  # looks the kernel up (Launcher._launch), still the tensors
    bound(x)  # the Bound's own hit: pointers
    assert [e[0] for e in fn.log] == ["triton", "direct", "direct"]
    assert fn.log[0][2] == (x, t, 0.5)
    assert fn.log[2][1][9:] == (x.data_ptr(), t.data_ptr(), 0.5, 32, True)
    with pytest.raises(ValueError, match="one value per tail argument"):
        lau.bind((7,), (t, 0.5), cx, direct_tail=(t.data_ptr(),))


# ------------------------------------------------------------------ tensor descriptors
def _desc(t, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


@pytest.fixture
def descriptors(monkeypatch):
    pytest.importorskip("triton.tools.tensor_descriptor")
    monkeypatch.setattr(_launch, "_DESC", [None])  # the first Launcher looks the class up


def test_descriptor_launches_go_direct_with_the_descriptor_itself(fake_cuda, descriptors):
    # the compiled launcher encodes host tensor descriptors itself, so a direct launch
    # passes the descriptor object; a fresh descriptor of the same specialisation hits
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    k = torch.zeros(2, 64, 32)
    lau((1,), (_desc(k, [1, 16, 32]), 48, 0.5), cx)
    d2 = _desc(torch.ones(2, 64, 32), [1, 16, 32])
    lau((1,), (d2, 48, 0.5), cx)
    assert [e[0] for e in fn.log] == ["triton", "direct"]
    assert fn.log[1][1][9] is d2 and fn.log[1][1][10:] == (48, 0.5, 32, True)


@pytest.mark.parametrize("change", ["block", "dtype", "shape_int1", "stride_odd"])
def test_a_new_descriptor_specialisation_goes_through_triton(fake_cuda, descriptors, change):
    # (a descriptor's base is always 16-byte aligned: TensorDescriptor asserts it)
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    base = torch.zeros(2, 64, 32)
    lau((1,), (_desc(base, [1, 16, 32]), 48, 0.5), cx)
    block = [1, 16, 32]
    t = base
    if change == "block":
        block = [1, 32, 32]
    elif change == "dtype":
        t = base.half()
    elif change == "shape_int1":  # batch 1: a shape entry equal to 1
        t = torch.zeros(1, 64, 32)
    else:
        t = torch.zeros(2, 64, 36)[..., :32]  # row stride 36: not divisible by 16
    from triton.tools.tensor_descriptor import TensorDescriptor

    d = TensorDescriptor(t, list(t.shape), list(t.stride()), block)
    lau((1,), (d, 48, 0.5), cx)
    assert [e[0] for e in fn.log] == ["triton", "triton"]


def test_spec_of_descriptors_names_dtype_alignment_block_and_int_classes(descriptors):
    _launch.Launcher(FakeJit())  # loads the descriptor class
    k = torch.zeros(2, 64, 32)
    s = _launch._spec((_desc(k, [1, 16, 32]),))
    # (padding and round_f32_to_tf32 are read where this Triton's descriptor has them)
    assert s[0][:4] == ("desc", torch.float32, True, (1, 16, 32))
    assert s[0][-1] == (0, 16, 16, 16, 16, 1)  # shape (2, 64, 32), strides (2048, 32, 1)
    assert _launch._spec((_desc(k.half(), [1, 16, 32]),)) != s


def test_a_launcher_rejecting_descriptors_turns_off_only_descriptor_launches(
    fake_cuda, descriptors
):
    fn = FakeJit()
    lau = _launch.Launcher(fn)
    cx = dict(BLOCK=32, FLAG=True, num_warps=4, num_stages=2)
    d = _desc(torch.zeros(2, 64, 32), [1, 16, 32])
    lau((1,), (d, 48, 0.5), cx)

    def bad_run(*a):
        raise TypeError("no descriptors here")

    key = next(iter(lau.kernels))
    lau.kernels[key] = (bad_run,) + lau.kernels[key][1:]
    lau((1,), (d, 48, 0.5), cx)  # the direct call fails: Triton launches it instead
    assert _launch._DESC[0] is False and not _launch._disabled
    lau((1,), (d, 48, 0.5), cx)  # descriptors now always through Triton
    x = torch.zeros(64)
    lau((1,), (x, 48, 0.5), cx)
    lau((1,), (x, 48, 0.5), cx)  # plain arguments still go direct
    assert [e[0] for e in fn.log] == ["triton", "triton", "triton", "triton", "direct"]
