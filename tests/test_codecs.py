"""Codec round trips, error bounds, top-k selection and encoded sizes against the formulas."""

import math

import pytest
import torch

from skyfed.compression.chain import Chain
from skyfed.compression.codecs import CodecError, TopK, build_codec, keep_count, randk_indices, topk_indices
from skyfed.compression.indices import index_bytes, pack_indices, unpack_indices
from skyfed.compression.wire import spec_of


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 70, generator=g),  # 21000 values: not a multiple of the block
        "b": torch.randn(7, generator=g) * 1e-3,
        "z": torch.zeros(5),  # an all-zero block
    }


def roundtrip(specs, tensors):
    chain = Chain.from_specs(specs)
    parts = chain.encode(tensors)
    return chain, parts, chain.decode(parts, spec_of(tensors), "test")


def part_bytes(parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


@pytest.mark.parametrize("specs", [[], ["fp32"]])
def test_lossless_chains_are_exact(specs):
    t = _tensors()
    _, _, out = roundtrip(specs, t)
    for k in t:
        assert torch.equal(out[k], t[k])


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_casts_exact_on_representable_values_and_size(name, dtype):
    t = {k: v.to(dtype).to(torch.float32) for k, v in _tensors().items()}
    chain, parts, out = roundtrip([name], t)
    for k in t:
        assert torch.equal(out[k], t[k])
    n = sum(v.numel() for v in t.values())
    assert part_bytes(parts) == 2 * n == sum(chain.nbytes(v.numel()) for v in t.values())


def test_fp16_clamps_instead_of_overflowing():
    t = {"x": torch.tensor([1e6, -1e6, 1.0])}
    _, _, out = roundtrip(["fp16"], t)
    assert out["x"].tolist() == [65504.0, -65504.0, 1.0]


@pytest.mark.parametrize("bits,block,levels", [(8, 256, 127), (8, 64, 127), (4, 128, 7), (4, 32, 7)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_blockwise_quantization_error_within_absmax_bound(bits, block, levels, stochastic):
    t = _tensors()
    spec = {"name": f"int{bits}", "block": block, "stochastic": stochastic, "seed": 3}
    chain, parts, out = roundtrip([spec], t)
    for k, x in t.items():
        flat, err = x.reshape(-1), (out[k] - x).reshape(-1).abs()
        nb = math.ceil(flat.numel() / block)
        pad = nb * block - flat.numel()
        amax = torch.nn.functional.pad(flat.abs(), (0, pad)).view(nb, block).amax(1)
        bound = amax / levels * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-12
        err_blocks = torch.nn.functional.pad(err, (0, pad)).view(nb, block).amax(1)
        assert bool((err_blocks <= bound).all()), (k, (err_blocks - bound).max())
        if k == "z":
            assert torch.equal(out[k], x)
    # sizes: q (1 byte, or a nibble packed two per byte) + one float32 scale per block
    for k, x in t.items():
        n = x.numel()
        q = n if bits == 8 else math.ceil(n / 2)
        assert parts[f"{k}::0.q"].numel() == q
        assert part_bytes({p: v for p, v in parts.items() if p.startswith(f"{k}::")}) == q + 4 * math.ceil(n / block)
        assert chain.nbytes(n) == q + 4 * math.ceil(n / block)


def test_int4_packs_two_values_per_byte():
    x = {"x": torch.tensor([7.0, -7.0, 0.0, 1.0, -3.0])}  # absmax 7 -> scale 1: q = x
    _, parts, out = roundtrip([{"name": "int4", "block": 8}], x)
    assert parts["x::0.q"].tolist() == [15 | (1 << 4), 8 | (9 << 4), 5 | (8 << 4)]
    assert torch.equal(out["x"], x["x"])


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = {"x": torch.full((20000,), 0.3)}
    x["x"][0] = 1.0  # absmax 1 -> 0.3 sits between levels
    a = roundtrip([{"name": "int8", "block": 20000, "stochastic": True, "seed": 1}], x)[2]["x"]
    b = roundtrip([{"name": "int8", "block": 20000, "stochastic": True, "seed": 1}], x)[2]["x"]
    c = roundtrip([{"name": "int8", "block": 20000, "stochastic": True, "seed": 2}], x)[2]["x"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a[1:].mean()) - 0.3) < 1e-3  # nearest rounding would give 38/127 = 0.2992


@pytest.mark.parametrize("fraction", [0.1, 0.01])
def test_topk_exact_path_keeps_exactly_the_k_largest(fraction):
    t = _tensors()
    chain, parts, out = roundtrip([{"name": "topk", "fraction": fraction}], t)
    for k, x in t.items():
        n = x.numel()
        kk = keep_count(fraction, n)
        idx = torch.nonzero(out[k].reshape(-1) != 0).squeeze(1)
        if k != "z":
            assert idx.numel() == kk
            expect = torch.topk(x.reshape(-1).abs(), kk).indices.sort().values
            assert torch.equal(idx, expect)
            assert torch.equal(out[k].reshape(-1)[idx], x.reshape(-1)[idx])  # kept values are exact
        size = part_bytes({p: v for p, v in parts.items() if p.startswith(f"{k}::")})
        assert size == index_bytes(kk, n) + 4 * kk == 2 * kk + 4 * math.ceil(n / 65536) + 4 * kk == chain.nbytes(n)


def test_topk_sampled_threshold_path_matches_exact_topk():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400_000, generator=g)
    k = 4000
    sampled = topk_indices(x.abs(), k, exact_max=1000, gen=torch.Generator().manual_seed(1))
    exact = torch.topk(x.abs(), k).indices.sort().values
    assert sampled.numel() == k
    assert torch.equal(sampled, exact)
    # and through the codec, with scope=tensor
    chain, parts, out = roundtrip([{"name": "topk", "fraction": 0.01, "exact_max": 1000}], {"x": x})
    assert int((out["x"] != 0).sum()) == k


def test_topk_global_scope_picks_largest_over_all_tensors():
    t = {"a": torch.arange(1, 101, dtype=torch.float32), "b": -torch.arange(1, 11, dtype=torch.float32) * 100}
    _, parts, out = roundtrip([{"name": "topk", "fraction": 0.1, "scope": "global"}], t)
    assert int((out["b"] != 0).sum()) == 10 and int((out["a"] != 0).sum()) == 1  # 11 of 110 kept
    assert float(out["a"][-1]) == 100.0


def test_indices_pack_across_chunks():
    n = 200_000
    idx = torch.tensor([0, 1, 65535, 65536, 131071, 199_999])
    low, counts = pack_indices(idx, n)
    assert low.dtype == torch.int16 and counts.tolist() == [3, 2, 0, 1]
    assert torch.equal(unpack_indices(low, counts, n, "t"), idx)
    assert index_bytes(6, n) == low.numel() * 2 + counts.numel() * 4


def test_randk_sends_no_indices_and_receiver_regenerates_them():
    t = _tensors()
    chain, parts, out = roundtrip([{"name": "randk", "fraction": 0.1, "seed": 9}], t)
    assert all(p.endswith(".values") for p in parts)
    x = t["w"].reshape(-1)
    n, k = x.numel(), keep_count(0.1, x.numel())
    idx = torch.nonzero(out["w"].reshape(-1)).squeeze(1)
    assert idx.numel() == k and torch.equal(out["w"].reshape(-1)[idx], x[idx])
    assert part_bytes(parts) == sum(4 * keep_count(0.1, v.numel()) for v in t.values())
    other = Chain.from_specs([{"name": "randk", "fraction": 0.1, "seed": 10}]).encode(t)
    assert not torch.equal(other["w::0.values"], parts["w::0.values"])


def test_randk_strata_are_distinct_and_in_range():
    idx = randk_indices(1003, 100, seed=4, device=torch.device("cpu"))
    assert idx.numel() == 100 and bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx[0]) and int(idx[-1]) < 1003


@pytest.mark.parametrize("block", [256, 64, 7])
def test_sign_sends_one_bit_per_value_and_the_block_mean_magnitude(block):
    t = _tensors()
    chain, parts, out = roundtrip([{"name": "sign", "block": block}], t)
    for key, x in t.items():
        flat, n = x.reshape(-1), x.numel()
        want_scale = torch.stack([flat[i : i + block].abs().mean() for i in range(0, n, block)])
        assert torch.allclose(parts[f"{key}::0.scale"], want_scale, rtol=1e-6, atol=0)
        sign = torch.where(flat >= 0, 1.0, -1.0)
        assert torch.equal(out[key].reshape(-1), sign * want_scale.repeat_interleave(block)[:n])
        assert part_bytes({p: v for p, v in parts.items() if p.startswith(f"{key}::")}) == chain.nbytes(n)
        assert chain.nbytes(n) == math.ceil(n / 8) + 4 * math.ceil(n / block)
    assert not out["z"].any()  # an all-zero block decodes to zeros


def test_sign_keeps_the_l1_norm_of_each_block():
    x = {"w": torch.randn(4096, generator=torch.Generator().manual_seed(3))}
    _, _, out = roundtrip([{"name": "sign", "block": 512}], x)
    assert torch.allclose(out["w"].view(8, 512).abs().sum(1), x["w"].view(8, 512).abs().sum(1), rtol=1e-5)


def test_randk_then_sign_sends_half_the_signs_and_no_indices():
    t = _tensors()
    chain, parts, out = roundtrip([{"name": "randk", "fraction": 0.5, "seed": 1}, {"name": "sign", "block": 64}], t)
    assert set(p.split("::")[1] for p in parts) == {"1.bits", "1.scale"}
    n = t["w"].numel()
    k = keep_count(0.5, n)
    assert int(torch.count_nonzero(out["w"])) == k
    assert chain.nbytes(n) == math.ceil(k / 8) + 4 * math.ceil(k / 64)


def _low_rank_matrix(rows: int, cols: int, spectrum: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(spectrum), generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, len(spectrum), generator=g)).Q
    return (u * torch.tensor(spectrum)) @ v.T


def test_lowrank_reproduces_a_rank_r_matrix_and_sends_r_times_rows_plus_cols_values():
    t = {"w": _low_rank_matrix(200, 60, [5.0, 2.0, 0.5]), "b": torch.randn(60)}
    chain, parts, out = roundtrip([{"name": "lowrank", "rank": 3}], t)
    assert torch.allclose(out["w"], t["w"], atol=1e-5) and torch.equal(out["b"], t["b"])  # vectors travel whole
    assert parts["w::0.factors"].numel() == 3 * (200 + 60) and parts["b::0.factors"].numel() == 60
    assert chain.nbytes(200 * 60, (200, 60)) == 4 * 3 * 260 and chain.nbytes(60, (60,)) == 4 * 60


@pytest.mark.parametrize("exact_max", [1 << 22, 100])  # exact SVD, and the seeded randomized range finder
def test_lowrank_error_is_the_dropped_singular_values(exact_max):
    spectrum = [2.0 ** -i for i in range(12)]
    w = _low_rank_matrix(300, 80, spectrum, seed=1)
    _, _, out = roundtrip([{"name": "lowrank", "rank": 4, "exact_max": exact_max}], {"w": w})
    best = sum(s * s for s in spectrum[4:])  # Eckart-Young: the optimum for rank 4
    assert float((out["w"] - w).norm() ** 2) == pytest.approx(best, rel=1e-3)


def test_lowrank_then_int8_quantizes_each_singular_vector_in_its_own_blocks():
    w = _low_rank_matrix(256, 128, [10.0, 1.0, 0.1, 0.01])
    chain, parts, out = roundtrip([{"name": "lowrank", "rank": 4}, {"name": "int8", "block": 128}], {"w": w})
    assert parts["w::1.q"].numel() == 4 * (256 + 128)
    assert chain.nbytes(w.numel(), tuple(w.shape)) == part_bytes(parts) == 4 * 384 + 4 * math.ceil(4 * 384 / 128)
    assert float((out["w"] - w).norm() / w.norm()) < 0.02  # int8 on balanced factors


def test_lowrank_keeps_small_matrices_whole_and_must_come_first():
    t = {"w": torch.randn(6, 5)}  # rank 4 factors (44 values) would not be smaller than 30
    _, parts, out = roundtrip([{"name": "lowrank", "rank": 4}], t)
    assert torch.equal(out["w"], t["w"]) and parts["w::0.factors"].numel() == 30
    with pytest.raises(CodecError, match="must be the first of a chain"):
        Chain.from_specs([{"name": "randk", "fraction": 0.5}, "lowrank"])
    assert "shape" not in build_codec("lowrank").for_shape((3, 4)).spec()


def test_lowrank_rank_by_round_sets_each_rounds_rank_and_the_last_repeats():
    w = _low_rank_matrix(120, 40, [1.0, 0.5, 0.25, 0.125], seed=2)
    chain = Chain.from_specs([{"name": "lowrank", "rank": 16, "rank_by_round": [1, 3]}])
    for rnd, rank in [(0, 1), (1, 3), (7, 3)]:
        c = chain.for_round(rnd)
        parts = c.encode({"w": w})
        assert c.codecs[0].rank == rank and parts["w::0.factors"].numel() == rank * 160
        out = c.decode(parts, spec_of({"w": w}), "test")
        assert float((out["w"] - w).norm() ** 2) == pytest.approx(sum(s * s for s in [1.0, 0.5, 0.25, 0.125][rank:]), rel=1e-4)
    assert Chain.from_specs([{"name": "lowrank", "rank": 5}]).for_round(3).codecs[0].rank == 5  # no schedule: fixed
    for bad in ([0], "8,16", [2.5]):
        with pytest.raises(CodecError, match="rank_by_round"):
            Chain.from_specs([{"name": "lowrank", "rank_by_round": bad}])


def test_topk_then_int8_quantizes_kept_values():
    t = _tensors()
    chain, parts, out = roundtrip([{"name": "topk", "fraction": 0.05}, {"name": "int8", "block": 64}], t)
    assert set(p.split("::")[1] for p in parts) == {"0.idx", "0.count", "1.q", "1.scale"}
    x = t["w"].reshape(-1)
    kk = keep_count(0.05, x.numel())
    kept = torch.topk(x.abs(), kk).indices
    err = (out["w"].reshape(-1)[kept] - x[kept]).abs().max()
    assert float(err) <= float(x.abs().max()) / 254 * (1 + 1e-5)
    n = x.numel()
    assert chain.nbytes(n) == index_bytes(kk, n) + kk + 4 * math.ceil(kk / 64)
    assert part_bytes({p: v for p, v in parts.items() if p.startswith("w::")}) == chain.nbytes(n)


@pytest.mark.parametrize("spec,msg", [
    ("int9", "unknown codec 'int9'"),
    ({"name": "int8", "blocks": 3}, "unknown parameter(s) ['blocks']"),
    ({"name": "int8", "block": 0}, "int8.block must be an integer"),
    ({"name": "topk", "fraction": 1.5}, "topk.fraction must be a number in (0, 1]"),
    ({"name": "topk", "scope": "layer"}, "topk.scope must be"),
    ({"fraction": 0.1}, "unknown codec None"),
])
def test_bad_codec_specs_are_rejected_clearly(spec, msg):
    with pytest.raises(CodecError) as info:
        build_codec(spec)
    assert msg in str(info.value)


def test_terminal_codec_must_be_last():
    with pytest.raises(CodecError, match="must be the last of a chain"):
        Chain.from_specs(["int8", "topk"])


def test_short_and_long_forms_are_equal():
    assert build_codec("topk") == TopK() == build_codec({"name": "topk", "fraction": 0.01})


def test_codecs_run_on_cuda_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    t = {k: v.cuda() for k, v in _tensors().items()}
    for specs in (["int8"], ["int4"], [{"name": "topk", "fraction": 0.1}, "int8"], ["randk"], ["fp16"], ["sign"], ["lowrank", "int8"]):
        _, parts, out = roundtrip(specs, t)
        assert all(v.is_cuda for v in out.values())
