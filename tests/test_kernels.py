"""The packed n-bit kernels: decode bit for bit as the schemes decode, Linear to float32 rounding,
the same answers from the pure-PyTorch fallback, one warning when the build fails, and a Python
exception (never a crash) for bad arguments. No timing here: see bench/kernels.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BITS, SCHEMES, relative_error

import bitsweep
from bitsweep import kernels
from bitsweep.pack import pack_bits

# (N, K, group): per channel (group = K) with rows that are not whole bytes, whole 256-code blocks
# and a tail; groups that are a multiple of 8 (dividing K or not) and groups that are not.
SHAPES = [(13, 300, 300), (6, 512, 512), (5, 37, 37), (9, 517, 64), (6, 777, 24), (7, 1000, 100), (5, 37, 5)]
BATCHES = (1, 2, 3, 8, 24, 64)


def make_case(scheme, bits, n, k, group, seed=0):
    """Random codes (every pattern of the width) with per-group scales and zero points, the scheme's
    level table, and the weight the scheme itself decodes them to."""
    gen = torch.Generator().manual_seed(seed)
    codec = bitsweep.schemes()[scheme]
    qmin, _ = codec.code_range(bits)
    lut = codec.decode(torch.arange(qmin, qmin + 2**bits), torch.ones(()), torch.zeros(()), bits).float()
    u = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    groups = math.ceil(k / group)
    scale = torch.rand(n, groups, generator=gen) + 0.5
    zero = torch.zeros(n, groups)
    if scheme == "asymmetric":
        zero = torch.randint(0, 2**bits, (n, groups), generator=gen).float()
    per_k = torch.arange(k) // group
    weight = codec.decode(u.int() + qmin, scale[:, per_k], zero[:, per_k], bits)
    packed = kernels.KernelWeight.build(pack_bits(u, bits), n, k, bits, lut, scale, zero, group)
    return packed, weight


@pytest.fixture
def fresh_extension():
    """Forget the loaded module before and after, so environment changes take effect and do not leak."""
    kernels.extension.cache_clear()
    yield
    kernels.extension.cache_clear()


@pytest.fixture(scope="module")
def ext():
    module = kernels.extension()
    assert module is not None, "the C++ kernels did not build here (scripts/setup.sh installs g++)"
    return module


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_decode_is_bit_exact_and_linear_matches_f_linear(ext, scheme, bits, monkeypatch):
    for i, (n, k, group) in enumerate(SHAPES):
        w, weight = make_case(scheme, bits, n, k, group, seed=bits * 100 + i)
        assert w.compiled
        assert torch.equal(w.decode(), weight), (n, k, group)
        for batch in BATCHES:
            x = torch.randn(batch, k)
            ref = F.linear(x, weight)
            assert relative_error(w.linear(x), ref) < 1e-5, (n, k, group, batch)
        # Batches beyond the fused kernel's: slices decoded for the BLAS.
        monkeypatch.setattr(kernels, "FUSED_MAX_BATCH", {256: (0, 0), 512: (0, 0)})
        for batch in (1, 64):
            x = torch.randn(batch, k)
            assert relative_error(w.linear(x), F.linear(x, weight)) < 1e-5, (n, k, group, batch)
        monkeypatch.undo()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_the_fused_kernel_takes_batches_up_to_its_limit_and_decoding_the_rest(ext, scheme, bits):
    """Up to fused_max_batch() rows of x run the fused kernel, more are decoded slice by slice (the two paths
    round differently, so the result says which one ran). The limit is the lower one where levels are costly
    (pow2's bits at 6 to 8 bits) and, with AVX-512, where the blocks run on 256-bit vectors."""
    w, weight = make_case(scheme, bits, 20, 512, 512)
    args = (w.codes, w.n, w.k, w.bits, w.lut)
    width = ext.vector_bits()
    costly = scheme == "pow2" and bits >= 6
    narrow = width == 512 and not ext.wide_blocks(w.lut, bits, w.linear_lut)
    limit = w.fused_max_batch()
    assert limit == kernels.FUSED_MAX_BATCH[width][costly or narrow]
    gen = torch.Generator().manual_seed(bits)
    for batch, decoded in ((limit, False), (limit + 1, True)):
        x = torch.randn(batch, 512, generator=gen)
        fused = ext.linear(x, *args, w.linear_lut, w.scale, w.zero, w.group)
        sliced = ext.linear_decoded(x, *args, w.scale, w.zero, w.group)
        assert not torch.equal(fused, sliced), "the two paths must be told apart by their rounding"
        out = w.linear(x)
        assert torch.equal(out, sliced if decoded else fused), (batch, decoded)
        assert relative_error(out, F.linear(x, weight)) < 1e-5


def test_blocks_run_on_512_bit_vectors_where_they_save_instructions(ext):
    """With AVX-512: 2- and 4-bit linear codes, tables of 4, 16 and 32 levels and pow2 from 4 bits; the
    AVX2 blocks elsewhere, and everywhere on CPUs without AVX-512."""
    cases = {(scheme, bits): make_case(scheme, bits, 1, 8, 8)[0] for scheme in SCHEMES for bits in BITS}
    wide = {case for case, w in cases.items() if ext.wide_blocks(w.lut, w.bits, w.linear_lut)}
    expected = {("asymmetric", 2), ("asymmetric", 4), ("symmetric", 2), ("symmetric", 4), ("pow2", 2),
                *(("pow2", bits) for bits in range(4, 9))}
    assert wide == (expected if ext.vector_bits() == 512 else set())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n, k", [(1200, 1000), (3000, 700)])
@pytest.mark.parametrize("group", [None, 64, 100])
def test_large_batches_decode_every_slice(ext, scheme, n, k, group):
    """Weights of 4.8 and 8.4 MB in fp32 are decoded in slices of rows (1 MB, or 8 rows per row of x) for
    batches beyond the fused kernel's, per channel and with groups that do or do not end on a block. Each
    slice goes into rows of y.T up to 64 rows of x, into columns of y beyond."""
    w, weight = make_case(scheme, 3, n, k, group or k)
    for batch in (w.fused_max_batch() + 8, 100):
        x = torch.randn(batch, k, generator=torch.Generator().manual_seed(n))
        assert relative_error(w.linear(x), F.linear(x, weight)) < 1e-5, batch


@pytest.mark.parametrize("scheme", SCHEMES)
def test_linear_holds_for_large_small_and_zero_activations(ext, scheme):
    w, weight = make_case(scheme, 4, 8, 600, 600)
    for factor in (1e30, 1e-20, 1.0):
        x = torch.randn(3, 600) * factor
        assert relative_error(w.linear(x), F.linear(x, weight)) < 1e-5, factor
    assert torch.equal(w.linear(torch.zeros(2, 600)), torch.zeros(2, 8))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_subnormal_arithmetic_whatever_the_cpu(ext, scheme):
    """With denormals-are-zero and flush-to-zero on, any subnormal a kernel reads or makes becomes 0 and
    the result goes wrong; on CPUs where subnormals cost a microcode assist (Intel) they would also be
    ~100x slower. So every width and granularity must still match, on any CPU, with the modes set by the
    caller and left alone by the kernels (one thread: the modes are per thread)."""
    assert not any("setcsr" in path.read_text() for path in (*kernels.SOURCES, kernels.HEADER))  # modes left alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.set_flush_denormal(True), "this CPU cannot set denormals-are-zero"
    try:
        for bits in BITS:
            for i, (n, k, group) in enumerate([(6, 777, 777), (9, 517, 64), (5, 1000, 1000), (1, 8, 8)]):
                w, weight = make_case(scheme, bits, n, k, group, seed=bits * 10 + i)
                assert torch.equal(w.decode(), weight), (bits, n, k, group)
                for batch, size in ((1, 1.0), (3, 1.0), (2, 1e-30), (2, 1e30)):
                    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch + i)) * size
                    # Each output against float64, relative to the sum of |w| |x| it adds up: the error
                    # float32 rounding allows in any summation order (a plain relative error is unbounded
                    # where the terms cancel, as an 8-term dot product can).
                    exact = F.linear(x.double(), weight.double())
                    bound = 1e-5 * F.linear(x.double().abs(), weight.double().abs())
                    assert ((w.linear(x).double() - exact).abs() <= bound).all(), (bits, n, k, group, batch, size)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def test_kernels_use_the_widest_vectors_this_cpu_has(ext):
    """Built with -march=native: the 512-bit blocks where the CPU has AVX-512, AVX2 elsewhere. So on an
    AVX-512 CPU every other test here checks the 512-bit code, and on any other the AVX2 code."""
    flags = kernels.cpu_flags()
    if "avx2" not in flags:
        pytest.skip("no x86 feature flags in /proc/cpuinfo")
    assert ext.vector_bits() == (512 if "avx512f" in flags else 256)


def test_prepared_codes_stay_the_size_of_the_file(ext):
    for bits in BITS:
        n, k = 96, 1000
        data = pack_bits(torch.randint(0, 2**bits, (n * k,), dtype=torch.uint8), bits)
        prepared = ext.prepare(data, n, k, bits)
        assert prepared.numel() <= data.numel() + 8


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pure_pytorch_fallback_gives_the_same_results(ext, scheme, monkeypatch, fresh_extension):
    cases = [(bits, shape) for bits in (3, 4, 7) for shape in SHAPES[:5]]
    xs = [torch.randn(3, shape[1]) for _, shape in cases]
    compiled = []
    for (bits, shape), x in zip(cases, xs):
        fast, weight = make_case(scheme, bits, *shape, seed=bits)
        compiled.append((fast.linear(x), weight))
    monkeypatch.setenv("BITSWEEP_KERNELS", "python")
    kernels.extension.cache_clear()
    assert kernels.extension() is None
    for (bits, shape), x, (fast_y, weight) in zip(cases, xs, compiled):
        slow, _ = make_case(scheme, bits, *shape, seed=bits)
        assert not slow.compiled
        assert torch.equal(slow.decode(), weight)
        assert relative_error(slow.linear(x), F.linear(x, weight)) < 1e-5
        assert relative_error(slow.linear(x), fast_y) < 1e-5


def test_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch, fresh_extension):
    broken = tmp_path / "kernels.cpp"
    broken.write_text("this is not C++ {\n")
    monkeypatch.setattr(kernels, "SOURCES", (broken,))  # alone: the build fails at once, with nothing else to finish
    monkeypatch.setenv("BITSWEEP_KERNELS_DIR", str(tmp_path / "kernels"))
    kernels.extension.cache_clear()
    with pytest.warns(kernels.KernelWarning) as record:
        assert kernels.extension() is None
        w, weight = make_case("asymmetric", 3, 5, 40, 40)
        x = torch.randn(2, 40)
        assert relative_error(w.linear(x), F.linear(x, weight)) < 1e-5
    assert len([r for r in record if issubclass(r.category, kernels.KernelWarning)]) == 1
    assert not w.compiled


BAD_CALLS = {
    "x of the wrong width": lambda e, a: e.linear(torch.randn(2, 41), *a["linear"]),
    "x not float32": lambda e, a: e.linear(torch.randn(2, 40).double(), *a["linear"]),
    "x not 2-D": lambda e, a: e.linear(torch.randn(40), *a["linear"]),
    "codes too short": lambda e, a: e.linear(torch.randn(2, 40), a["codes"][:-1], *a["linear"][1:]),
    "bits out of range": lambda e, a: e.decode(a["codes"], 5, 40, 9, *a["decode"][4:]),
    "lut too short": lambda e, a: e.decode(a["codes"], 5, 40, 3, a["lut"][:4], *a["decode"][5:]),
    "scale of the wrong size": lambda e, a: e.decode(a["codes"], 5, 40, 3, a["lut"], torch.ones(3), a["zero"], 40),
    "group of zero": lambda e, a: e.decode(a["codes"], 5, 40, 3, a["lut"], a["scale"], a["zero"], 0),
    "fused groups not of 8": lambda e, a: e.linear(torch.randn(2, 40), a["codes"], 5, 40, 3, a["lut"], True,
                                                   torch.ones(5, 4), torch.zeros(5, 4), 10),
    "data of the wrong length": lambda e, a: e.prepare(torch.zeros(14, dtype=torch.uint8), 5, 40, 3),
    "negative rows": lambda e, a: e.prepare(torch.zeros(15, dtype=torch.uint8), -5, 40, 3),
    "data not uint8": lambda e, a: e.prepare(torch.zeros(15, dtype=torch.int32), 5, 40, 3),
    "table of the wrong size": lambda e, a: e.wide_blocks(a["lut"], 4, False),
}


@pytest.mark.parametrize("call", BAD_CALLS, ids=list(BAD_CALLS))
def test_bad_arguments_raise_instead_of_crashing(ext, call):
    w, _ = make_case("asymmetric", 3, 5, 40, 40)
    args = {"codes": w.codes, "lut": w.lut, "scale": w.scale, "zero": w.zero,
            "linear": (w.codes, 5, 40, 3, w.lut, True, w.scale, w.zero, 40),
            "decode": (w.codes, 5, 40, 3, w.lut, w.scale, w.zero, 40)}
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        BAD_CALLS[call](ext, args)


@pytest.mark.parametrize("bits", BITS)
def test_any_level_table(ext, bits):
    """A plugin's levels are arbitrary floats: the table path, blocks and tail, at every width."""
    gen = torch.Generator().manual_seed(bits)
    lut = torch.randn(2**bits, generator=gen)
    for n, k in ((8, 256), (6, 300), (5, 40)):
        u = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
        scale = torch.rand(n, 1, generator=gen) + 0.5
        w = kernels.KernelWeight.build(pack_bits(u, bits), n, k, bits, lut, scale, torch.zeros(n, 1), k)
        weight = lut[u.long()] * scale
        assert torch.equal(w.decode(), weight)
        for batch in (1, 3):
            x = torch.randn(batch, k, generator=gen)
            assert relative_error(w.linear(x), F.linear(x, weight)) < 1e-5, (n, k, batch)

