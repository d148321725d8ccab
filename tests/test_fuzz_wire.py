"""Property-based tests of the update and model decoders (hypothesis).

Valid payloads of every codec chain decode exactly to what the chain itself decodes;
every mutation of them (tests/wire_mutations.py) is refused with a `WireFormatError`,
and never by the catch-all in `decode_payload` (which would mean a check is missing).
`make fuzz` (bench/fuzz.py) runs the same mutations 10^5 times.
"""

import json
import random
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyfed.compression import strictjson
from skyfed.compression.channel import Downlink, DownlinkReceiver
from skyfed.compression.chain import Chain
from skyfed.compression.payload import decode_payload, encode_payload
from skyfed.compression.wire import MAX_ABS, check_norm, pack, spec_of, update_norm
from skyfed.errors import WireFormatError
from wire_mutations import CHAINS, HOSTILE_TOKENS, MUTATIONS, inner_join, inner_split, join, split, substitute, valid_case

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refused(data: bytes, spec, **kw) -> str:
    """Decode `data` expecting a refusal that no catch-all had to produce; its message."""
    with pytest.raises(WireFormatError) as info:
        decode_payload(data, spec, 1 << 20, "update from aws", **kw)
    cause = info.value.__cause__
    assert cause is None or isinstance(cause, WireFormatError), f"caught by the safety net: {cause!r}"
    assert "\n" not in str(info.value)
    return str(info.value)


@FAST
@given(chain=st.sampled_from(CHAINS), seed=st.integers(0, 2**32 - 1), views=st.booleans())
def test_valid_payloads_of_every_chain_round_trip_exactly(chain, seed, views):
    payload, spec, tensors, built = valid_case(random.Random(seed), chain)
    out, header = decode_payload(payload, spec, views=views)
    expected = built.decode(built.encode(tensors), spec, "direct") if built else tensors
    assert header["round"] < 100 and header["client"] == "aws"
    for name in spec:
        assert out[name].dtype == torch.float32 and torch.equal(out[name], expected[name].view(spec[name].shape))
        if built.lossless:
            assert torch.equal(out[name], tensors[name])


@FAST
@given(rnd=st.randoms(use_true_random=False), mutation=st.sampled_from(sorted(MUTATIONS)), views=st.booleans())
def test_mutated_payloads_raise_only_wire_format_errors(rnd, mutation, views):
    payload, spec, _, _ = valid_case(rnd)
    bad = MUTATIONS[mutation](rnd, payload)
    try:
        decode_payload(bad, spec, 1 << 20, "update from aws", views=views)
    except WireFormatError as exc:
        assert exc.__cause__ is None or isinstance(exc.__cause__, WireFormatError), f"safety net caught {exc.__cause__!r}"
        assert "\n" not in str(exc) and len(str(exc)) < 600


@FAST
@given(rnd=st.randoms(use_true_random=False), token=st.sampled_from(HOSTILE_TOKENS), inner=st.booleans())
def test_every_hostile_header_value_is_refused_or_harmless(rnd, token, inner):
    payload, spec, _, _ = valid_case(rnd, [])
    _, head, blob = split(payload)
    if inner:
        meta, data = inner_split(blob)
        bad = join(head, inner_join(substitute(rnd, meta, token), data))
    else:
        bad = join(substitute(rnd, head, token), blob)
    for views in (False, True):
        try:
            out, _ = decode_payload(bad, spec, 1 << 20, "update", views=views)
        except WireFormatError as exc:
            assert exc.__cause__ is None or isinstance(exc.__cause__, WireFormatError)
        else:  # accepted: then it is a valid update of the model's shapes, finite and bounded
            assert all(out[n].shape == spec[n].shape and bool(out[n].abs().max() <= MAX_ABS) for n in spec)


@FAST
@given(rnd=st.randoms(use_true_random=False), mutation=st.sampled_from(sorted(MUTATIONS)))
def test_downlink_receiver_refuses_mutated_models_and_keeps_its_model(rnd, mutation):
    spec = {"w": spec_of({"w": torch.zeros(6, 5)})["w"], "b": spec_of({"b": torch.zeros(7)})["b"]}
    gen = torch.Generator().manual_seed(rnd.randrange(2**31))  # hypothesis replays need seeded data
    initial = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(7, generator=gen)}
    before = {n: t.clone() for n, t in initial.items()}
    downlink = Downlink(Chain.from_specs(rnd.choice(CHAINS[1:])), spec)
    params = {n: t + 0.01 for n, t in initial.items()}
    payload = downlink.payload_for("aws", params, round=0, version=0)
    receiver = DownlinkReceiver(initial)
    bad = MUTATIONS[mutation](rnd, payload)
    try:
        receiver.receive(bad, spec, 1 << 20)
    except WireFormatError as exc:
        assert exc.__cause__ is None or isinstance(exc.__cause__, WireFormatError)
    assert all(torch.equal(initial[n], before[n]) for n in initial)  # never written in place


# ------------------------------------------------------------ the issue's cases, one by one


def _plain():
    payload, spec, _, _ = valid_case(random.Random(7), [])
    return payload, spec


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize(
    "token, message",
    [
        ("Infinity", "JSON constant Infinity is not allowed"),
        ("NaN", "JSON constant NaN is not allowed"),
        ("9" * 5000, "integer of 5000 characters is out of range"),
        ("[" * 100_000 + "]" * 100_000, "levels deep (at most 16)"),
        ("1e999", "number 1e999 is not finite"),
    ],
)
def test_inner_header_values_from_the_issue(token, message, views):
    payload, spec = _plain()
    _, head, blob = split(payload)
    meta, data = inner_split(blob)
    doc = meta.decode().replace('"shape":[', f'"shape":[{token},', 1)
    msg = refused(join(head, inner_join(doc.encode(), data)), spec, views=views)
    # views: skyfed's own parser; otherwise the safetensors library's (its own message)
    assert (message if views else "corrupt tensor data") in msg, msg


@pytest.mark.parametrize("token, message", [("[" * 100_000 + "]" * 100_000, "nested 100001 levels"), ("Infinity", "Infinity")])
def test_outer_header_values_from_the_issue(token, message):
    payload, spec = _plain()
    _, head, blob = split(payload)
    bad = join(head.replace(b'"kind":"update"', b'"kind":' + token.encode()), blob)
    assert message in refused(bad, spec)


@pytest.mark.parametrize("field, value, message", [
    ("blob_bytes", -5, "blob_bytes=-5 is outside"),
    ("crc32", "x", "crc32 must be int, got str"),
    ("round", -1, "round=-1 is outside"),
    ("tag", [1], "tag must be int or null, got list"),
    ("format", 2, "format=2 is outside [1, 1]"),
    ("codecs", ["randk"] * 9, "at most 8 codecs"),
])
def test_header_fields_are_type_and_range_checked(field, value, message):
    payload, spec = _plain()
    _, head, blob = split(payload)
    h = json.loads(head)
    h[field] = value
    if field == "crc32" or field == "blob_bytes":
        bad = PREFIX_JOIN(h, blob)
    else:
        bad = join(json.dumps(h, separators=(",", ":")).encode(), blob)
    assert message in refused(bad, spec)


def PREFIX_JOIN(h, blob):
    head = json.dumps(h, separators=(",", ":")).encode()
    return struct.pack("<6sHI", b"SKYFED", 1, len(head)) + head + blob


def test_values_above_the_bound_are_refused_and_the_bound_is_configurable():
    t = {"w": torch.tensor([1.0, 3e38, 2.0])}  # the issue's poisoning value: finite, but 3 of them overflow
    payload = encode_payload(t)
    for views in (False, True):
        assert "magnitude 3e+38, above the bound of 1e+30" in refused(payload, spec_of(t), views=views)
    out, _ = decode_payload(payload, spec_of(t), max_abs=None)
    assert out["w"][1].item() == pytest.approx(3e38)
    for chain in (["int8"], [{"name": "lowrank", "rank": 1}]):  # finite parts whose decoding overflows
        parts = Chain.from_specs(chain).encode({"w": torch.ones(4, 4)})
        key = "w::0.scale" if "w::0.scale" in parts else "w::0.factors"
        parts[key] = torch.full_like(parts[key], 3e38)
        assert "NaN or Inf" in refused(pack(parts, {"codecs": Chain.from_specs(chain).specs()}), {"w": spec_of({"w": torch.ones(4, 4)})["w"]})


def test_update_norm_is_exact_in_float64_and_check_norm_refuses_above_the_bound():
    t = {"a": torch.full((4,), 1e30), "b": torch.full((12,), 1e30)}  # float32 sum of squares overflows
    assert update_norm(t) == pytest.approx(4 * float(torch.tensor(1e30)), rel=1e-12)
    assert check_norm({"a": torch.tensor([3.0, 4.0])}, 5.0) == 5.0
    with pytest.raises(WireFormatError, match=r"update from aws: L2 norm 5 exceeds the bound of 4.9"):
        check_norm({"a": torch.tensor([3.0, 4.0])}, 4.9, "update from aws")


def test_decoder_defects_become_refusals_naming_the_exception(monkeypatch):
    import skyfed.compression.payload as payload_mod

    def broken(*args):
        raise RecursionError("boom")

    monkeypatch.setattr(payload_mod, "blob_views", broken)
    payload, spec = _plain()
    with pytest.raises(WireFormatError, match=r"update: undecodable payload \(RecursionError\)$"):
        decode_payload(payload, spec, what="update", views=True)


def test_unicode_digits_in_part_names_are_refused():
    parts = Chain.from_specs(["fp16"]).encode({"w": torch.ones(3)})
    parts["w::\u00b2.v"] = parts.pop("w::0.v")  # '²'.isdigit() is True, int('²') raises
    assert "unexpected encoded tensor" in refused(pack(parts, {"codecs": ["fp16"]}), spec_of({"w": torch.ones(3)}))


def test_safetensors_entries_are_checked_field_by_field():
    payload, spec = _plain()
    _, head, blob = split(payload)
    meta, data = inner_split(blob)
    doc = json.loads(meta)
    name = next(n for n in doc if n != "__metadata__")
    for entry, message in [
        (dict(doc[name], shape=[2**62, 2**62, 0]), "is too large"),
        (dict(doc[name], shape=[True]), "shape must list"),
        (dict(doc[name], dtype="F8_E4M3"), "dtype 'F8_E4M3' is not one of"),
        (dict(doc[name], data_offsets=[0]), "data_offsets must be two"),
        (dict(doc[name], extra=1), "exactly dtype, shape and data_offsets"),
    ]:
        bad = join(head, inner_join(json.dumps(dict(doc, **{name: entry})).encode(), data))
        assert message in refused(bad, spec, views=True)


# ------------------------------------------------------------ strictjson


def test_strict_json_accepts_ordinary_json_and_bounds_everything_else():
    assert strictjson.loads(b'{"a":[1,-2,3.5,"[[[",null,true],"b":{"c":{}}}', "h") == {
        "a": [1, -2, 3.5, "[[[", None, True], "b": {"c": {}}
    }
    assert strictjson.nesting_depth(b'[[["]]]]]]"]]]') == 3
    for raw, message in [
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b'"\\ud800"', "surrogates not allowed"),
        (b"[" * 17 + b"]" * 17, "nested 17 levels deep (at most 16)"),
        (b"\xff", "can't decode byte 0xff"),
        (b'{"a":-9223372036854775809}', "out of the signed 64-bit range"),
    ]:
        with pytest.raises(WireFormatError, match="^h: ") as info:
            strictjson.loads(raw, "h")
        assert message in str(info.value)


def test_crc_is_recomputed_by_the_mutators_so_they_reach_the_inner_parser():
    payload, spec = _plain()
    _, head, blob = split(payload)
    meta, data = inner_split(blob)
    bad = join(head, inner_join(meta.replace(b'"F32"', b'"F33"', 1), data))
    assert json.loads(split(bad)[1])["crc32"] == zlib.crc32(split(bad)[2])
    assert "dtype 'F33'" in refused(bad, spec, views=True)


def _reference_depth(raw: bytes):
    """Character by character; None when a backslash stands outside a string (invalid JSON)."""
    depth = deepest = 0
    inside = escaped = False
    for ch in raw.decode("latin-1"):
        if inside:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inside = False
        elif ch == "\\":
            return None
        elif ch == '"':
            inside = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=60).map(lambda b: bytes(b"[]{}\"\\a,"[x % 8] for x in b)), block=st.sampled_from([1, 3, 7, 1 << 20]))
def test_nesting_depth_matches_a_character_loop_across_block_boundaries(raw, block):
    expected = _reference_depth(raw)
    if expected is None:
        return
    old = strictjson._BLOCK
    strictjson._BLOCK = block
    try:
        assert strictjson.nesting_depth(raw) == expected
    finally:
        strictjson._BLOCK = old


def test_nesting_depth_of_an_unterminated_string_of_escaped_quotes():
    raw = b'["' + b'\\"' * 50_000 + b"[[["  # linear in the scan; a backtracking regex was quadratic
    assert strictjson.nesting_depth(raw) == 1
    with pytest.raises(WireFormatError, match="^h: Unterminated string"):
        strictjson.loads(raw, "h")


def test_downlink_receiver_refuses_a_change_that_pushes_its_model_out_of_bounds():
    spec = spec_of({"w": torch.zeros(3)})
    initial = {"w": torch.full((3,), 9e29)}
    downlink = Downlink(Chain.from_specs(["fp32"]), spec)
    receiver = DownlinkReceiver({"w": initial["w"].clone()})
    receiver.receive(downlink.payload_for("aws", initial, round=0, version=0), spec, 1 << 20)  # the shared start
    downlink.settle(["aws"], ["aws"])
    payload = downlink.payload_for("aws", {"w": torch.full((3,), 1.8e30)}, round=1, version=1)  # a change of 9e29
    with pytest.raises(WireFormatError, match=r"applying the change leaves tensor 'w' that has a value of magnitude 1\.8e\+30"):
        receiver.receive(payload, spec, 1 << 20)
    assert torch.equal(receiver.held["w"], initial["w"])  # still the model it held
