"""Pluggable codecs for updates and models, composable as a chain.

A codec turns one flat float tensor into a few named *parts* (tensors that go into the
safetensors blob). A codec may leave one float part, its *carry* (e.g. the kept values
of top-k), for the next codec of the chain to encode, so ``[topk, int8]`` quantizes the
kept values. Chains are written in the config as ``[{name: topk, fraction: 0.01},
{name: int8, block: 256}]`` or in short form ``[int8]``; the payload header records
each codec's name and parameters, so the decoder rebuilds the same chain.

Encoded sizes (bytes of the parts for a tensor of ``n`` values, ``B`` = block size,
``k`` = kept values; fp32 input is ``4 n``):

=========  =============================================  ==========================
codec      parts                                          bytes
=========  =============================================  ==========================
fp32       v (float32)                                    4 n            (lossless)
fp16/bf16  v (float16 / bfloat16)                         2 n
int8       q (int8), scale (float32 per block)            n + 4 ceil(n / B)
int4       q (uint8, two values a byte), scale            ceil(n / 2) + 4 ceil(n / B)
sign       bits (uint8, eight values a byte), scale       ceil(n / 8) + 4 ceil(n / B)
topk       idx (int16), count (int32 per 64 Ki), values   2 k + 4 ceil(n / 65536) + carry
randk      values (indices regenerated from the seed)     carry
lowrank    factors (rank r of an m x c matrix)            carry of r (m + c) values
=========  =============================================  ==========================

where carry = ``4 k`` when the chain ends there (fp32 values), else the next codec's
bytes for ``k`` values; ``k = max(1, floor(fraction * n + 1/2))``, at most ``n``.

* Block-wise absmax quantization (as in NVIDIA FLARE's 8-/4-bit filters and Dettmers
  et al. 2022): per block, ``scale = absmax / L`` with ``L = 127`` (int8) or ``7``
  (int4), ``q = round(x / scale)``; error at most ``scale / 2`` per value (``scale``
  with stochastic rounding, which is unbiased: ``q = floor(x / scale + u)``).
* Top-k sparsification: keep the k largest magnitudes. Tensors larger than
  ``exact_max`` use the sampled threshold of Deep Gradient Compression (Lin et al.
  2018): estimate the threshold from a random sample, take the candidates above it
  and run an exact top-k among them (falling back to a full top-k in the rare case
  the sample overshoots), so the result is still the exact top-k at a fraction of the
  cost. ``scope: global`` picks the k largest over all tensors together.
* Random-k (Stich et al. 2018): one coordinate drawn uniformly from each of k equal
  strata, from a seed both sides know (recorded in the header), so no indices are sent.

Every operation is vectorized torch and runs on the tensors' device (CPU or CUDA).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from skyfed.compression.indices import index_bytes, pack_indices, unpack_indices
from skyfed.errors import WireFormatError

if TYPE_CHECKING:  # torch is imported where a codec computes, so validating a config's chains does not load it
    import torch


class CodecError(WireFormatError):
    """A codec name or its parameters are invalid."""


Parts = dict[str, "torch.Tensor"]
_SLAB = 1 << 20  # values per slab in the quantizers' loops over blocks (not elements)


def mix_seed(seed: int, salt: int) -> int:
    """A 63-bit seed from two integers (splitmix64 finalizer)."""
    z = (seed * 0x9E3779B97F4A7C15 + salt + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def key_seed(seed: int, key: str) -> int:
    return mix_seed(seed, zlib.crc32(key.encode()))


def keep_count(fraction: float, n: int) -> int:
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def _expect(parts: Parts, name: str, dtype: torch.dtype, shape: tuple[int, ...], where: str) -> torch.Tensor:
    t = parts.get(name)
    if t is None:
        raise WireFormatError(f"{where}: missing encoded part {name!r}")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise WireFormatError(
            f"{where}: encoded part {name!r} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, "
            f"expected {str(dtype).removeprefix('torch.')} {shape}"
        )
    return t


@dataclass(frozen=True)
class Codec:
    """Base class: a frozen dataclass whose fields are its YAML/header parameters."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    carry: ClassVar[str | None] = None  # float part a following codec may encode
    part_names: ClassVar[tuple[str, ...]] = ()  # parts it always sends (carry excluded)
    needs_shape: ClassVar[bool] = False  # sees the tensor's shape (first codec of a chain only)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def salted(self, salt: int) -> "Codec":
        """A copy whose random streams are keyed by `salt` (one per message)."""
        if any(f.name == "seed" for f in dataclasses.fields(self)):
            return dataclasses.replace(self, seed=mix_seed(self.seed, salt))  # type: ignore[attr-defined]
        return self

    def carry_numel(self, n: int) -> int:
        """Number of values in the carry part for an input of `n` values."""
        return n

    def for_shape(self, shape: tuple[int, ...]) -> "Codec":
        """This codec for one tensor of `shape` (only a chain's first codec sees shapes)."""
        return self

    def nbytes(self, n: int) -> int:
        """Bytes of this codec's own parts (excluding the carry) for `n` values."""
        raise NotImplementedError

    def prepare(self, flats: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Optional pass over all tensors before per-tensor encoding (global top-k)."""
        return {}

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        raise NotImplementedError

    def check(self, parts: Parts, n: int, where: str) -> int:
        """Validate the non-carry parts for `n` values; return the carry's length."""
        return self.carry_numel(n)

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        """Parts (carry already decoded to float32) -> flat float32 tensor of `n` values."""
        raise NotImplementedError

    def slab_parts(self, n: int) -> dict[str, tuple[torch.dtype, int, int]] | None:
        """For a codec (alone in its chain) whose values decode run by run: each part's
        dtype, element count for `n` values, and values per element; None for the others.
        Runs of values that start at a multiple of `slab_align` then `check` and `decode`
        as whole tensors of that many values would (`compression/slabs.py`)."""
        return None

    @property
    def slab_align(self) -> int:
        return 1


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (values may come from a hostile header)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_int(value: Any, what: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise CodecError(f"{what} must be {bound}, got {_short(value)}")


def _check_fraction(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise CodecError(f"{what} must be a number in (0, 1], got {_short(value)}")


# ---------------------------------------------------------------- casts


@dataclass(frozen=True)
class Fp32(Codec):
    """Identity (plain float32); lossless."""

    name: ClassVar[str] = "fp32"
    lossless: ClassVar[bool] = True
    part_names: ClassVar[tuple[str, ...]] = ("v",)
    dtype_name: ClassVar[str] = "float32"  # the torch dtype sent, by name (torch is imported late)

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    def nbytes(self, n: int) -> int:
        import torch
        return n * torch.empty(0, dtype=self.dtype).element_size()

    def carry_numel(self, n: int) -> int:
        return 0

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        import torch
        if self.dtype == torch.float16:
            x = x.clamp(-65504.0, 65504.0)  # avoid inf; the residual keeps the rest
        return {"v": x.to(self.dtype)}

    def check(self, parts: Parts, n: int, where: str) -> int:
        _expect(parts, "v", self.dtype, (n,), where)
        return 0

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        import torch
        return parts["v"].to(torch.float32)

    def slab_parts(self, n: int) -> dict[str, tuple[torch.dtype, int, int]] | None:
        return {"v": (self.dtype, n, 1)}


@dataclass(frozen=True)
class Fp16(Fp32):
    """Cast to IEEE half precision (values clamped to +-65504)."""

    name: ClassVar[str] = "fp16"
    lossless: ClassVar[bool] = False
    dtype_name: ClassVar[str] = "float16"


@dataclass(frozen=True)
class Bf16(Fp32):
    """Cast to bfloat16 (fp32's range, 8 bits of mantissa)."""

    name: ClassVar[str] = "bf16"
    lossless: ClassVar[bool] = False
    dtype_name: ClassVar[str] = "bfloat16"


# ---------------------------------------------------------------- quantization


@dataclass(frozen=True)
class Int8(Codec):
    """Block-wise absmax quantization to int8: scale = absmax / 127 per block."""

    name: ClassVar[str] = "int8"
    part_names: ClassVar[tuple[str, ...]] = ("q", "scale")
    levels: ClassVar[int] = 127
    values_per_byte: ClassVar[int] = 1
    q_dtype_name: ClassVar[str] = "int8"  # the torch dtype of q, by name
    block: int = 256
    stochastic: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int(self.block, f"{self.name}.block", 1, 1 << 24)
        if not isinstance(self.stochastic, bool):
            raise CodecError(f"{self.name}.stochastic must be true or false, got {_short(self.stochastic)}")
        _check_int(self.seed, f"{self.name}.seed", 0, 2**63 - 1)

    @property
    def q_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.q_dtype_name)

    def carry_numel(self, n: int) -> int:
        return 0

    def qbytes(self, n: int) -> int:
        return n

    def nbytes(self, n: int) -> int:
        return self.qbytes(n) + 4 * math.ceil(n / self.block)

    def _quantize(self, x: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks are processed in slabs of about 2^20 values (cache-sized, reused buffer)."""
        import torch
        n, B, L = x.numel(), self.block, self.levels
        x = x.to(torch.float32)
        nb = math.ceil(n / B)
        q = torch.empty(n, dtype=torch.int8, device=x.device)
        scale = torch.empty(nb, dtype=torch.float32, device=x.device)
        gen = None
        if self.stochastic:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(key_seed(self.seed, key))
        full = n // B
        rows_per_slab = max(1, _SLAB // B)
        buf = torch.empty(min(full, rows_per_slab) * B, dtype=torch.float32, device=x.device)
        slabs = [(r, min(full, r + rows_per_slab)) for r in range(0, full, rows_per_slab)]
        if full < nb:
            slabs.append((full, nb))  # the short tail block
        for r0, r1 in slabs:
            lo, hi = r0 * B, min(n, r1 * B)
            rows = x[lo:hi].view(r1 - r0, -1)
            amax = torch.maximum(rows.amax(1), rows.amin(1).neg_())
            torch.div(amax, L, out=scale[r0:r1])
            inv = torch.where(amax > 0, L / amax, torch.zeros_like(amax))
            y = buf[: hi - lo].view_as(rows) if r1 <= full else rows.clone()
            torch.mul(rows, inv[:, None], out=y)
            if gen is None:
                y.round_()
            else:
                y.add_(torch.rand(y.shape, generator=gen, device=y.device)).floor_().clamp_(-L, L)
            q[lo:hi].view_as(rows).copy_(y)
        return q, scale

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        q, scale = self._quantize(x.reshape(-1), key)
        return {"q": q, "scale": scale}

    def _check_scale(self, parts: Parts, n: int, where: str) -> None:
        import torch
        scale = _expect(parts, "scale", torch.float32, (math.ceil(n / self.block),), where)
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise WireFormatError(f"{where}: {self.name} scales must be finite and non-negative")

    def check(self, parts: Parts, n: int, where: str) -> int:
        import torch
        q = _expect(parts, "q", torch.int8, (n,), where)
        self._check_scale(parts, n, where)
        if n and int(q.min()) < -self.levels:
            raise WireFormatError(f"{where}: int8 value -128 is outside the codec's range [-127, 127]")
        return 0

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
        import torch
        B = self.block
        out = torch.empty(n, dtype=torch.float32, device=q.device)
        step = max(1, _SLAB // B) * B
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            r0, r1 = lo // B, math.ceil(hi / B)
            o = out[lo:hi].copy_(q[lo:hi])
            full = (hi - lo) // B * B
            if full:
                o[:full].view(-1, B).mul_(scale[r0 : r0 + full // B, None])
            if full < hi - lo:
                o[full:].mul_(scale[r1 - 1])
        return out

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        return self._dequantize(parts["q"], parts["scale"], n)

    def slab_parts(self, n: int) -> dict[str, tuple[torch.dtype, int, int]] | None:
        import torch
        per = self.values_per_byte
        return {"q": (self.q_dtype, math.ceil(n / per), per), "scale": (torch.float32, math.ceil(n / self.block), self.block)}

    @property
    def slab_align(self) -> int:
        return math.lcm(self.block, self.values_per_byte)


@dataclass(frozen=True)
class Int4(Int8):
    """Block-wise absmax quantization to 4 bits (scale = absmax / 7), two values per byte.

    A value q in [-7, 7] is stored as the nibble q + 8 (1..15); the low nibble of byte i
    holds value 2i, the high nibble value 2i + 1; an odd tail is padded with nibble 8.
    """

    name: ClassVar[str] = "int4"
    levels: ClassVar[int] = 7
    values_per_byte: ClassVar[int] = 2
    q_dtype_name: ClassVar[str] = "uint8"
    block: int = 128

    def qbytes(self, n: int) -> int:
        return math.ceil(n / 2)

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        import torch
        q, scale = self._quantize(x.reshape(-1), key)
        u = (q + 8).to(torch.uint8)
        if u.numel() % 2:
            u = torch.cat([u, u.new_full((1,), 8)])
        pairs = u.view(-1, 2)
        packed = pairs[:, 0] | (pairs[:, 1] << 4)
        return {"q": packed, "scale": scale}

    def check(self, parts: Parts, n: int, where: str) -> int:
        import torch
        packed = _expect(parts, "q", torch.uint8, (math.ceil(n / 2),), where)
        self._check_scale(parts, n, where)
        if packed.numel() and (bool(((packed & 15) == 0).any()) or bool(((packed >> 4) == 0).any())):
            raise WireFormatError(f"{where}: int4 nibble 0 is outside the codec's range (corrupt values)")
        return 0

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        import torch
        packed = parts["q"]
        u = torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:n]
        q = u.to(torch.int8) - 8
        return self._dequantize(q, parts["scale"], n)


@dataclass(frozen=True)
class Sign(Codec):
    """1-bit scaled sign: each value becomes +-scale, scale = mean |x| of its block.

    The compressor of EF-SignSGD (Karimireddy et al. 2019) and 1-bit SGD (Seide et al.
    2014), made block-wise: with error feedback it keeps the sign's direction error for
    the next round. Bits are packed eight to a byte (value 8i + j in bit j of byte i,
    1 = non-negative); the tail of the last byte is zero.
    """

    name: ClassVar[str] = "sign"
    part_names: ClassVar[tuple[str, ...]] = ("bits", "scale")
    block: int = 256

    def __post_init__(self) -> None:
        _check_int(self.block, "sign.block", 1, 1 << 24)

    def carry_numel(self, n: int) -> int:
        return 0

    def nbytes(self, n: int) -> int:
        return math.ceil(n / 8) + 4 * math.ceil(n / self.block)

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        import torch
        x = x.reshape(-1).to(torch.float32)
        n, B = x.numel(), self.block
        full = n // B * B
        ax = x.abs()
        scale = ax[:full].view(-1, B).mean(1) if full else ax.new_empty(0)
        if full < n:
            scale = torch.cat([scale, ax[full:].mean().reshape(1)])
        bits = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8, device=x.device)
        bits[:n] = x >= 0
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
        packed = (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
        return {"bits": packed, "scale": scale}

    def check(self, parts: Parts, n: int, where: str) -> int:
        import torch
        _expect(parts, "bits", torch.uint8, (math.ceil(n / 8),), where)
        scale = _expect(parts, "scale", torch.float32, (math.ceil(n / self.block),), where)
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise WireFormatError(f"{where}: sign scales must be finite and non-negative")
        return 0

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        import torch
        packed, scale = parts["bits"], parts["scale"]
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed[:, None] >> shifts) & 1).view(-1)[:n]
        out = bits.to(torch.float32).mul_(2).sub_(1)
        B, full = self.block, n // self.block * self.block
        if full:
            out[:full].view(-1, B).mul_(scale[: full // B, None])
        if full < n:
            out[full:].mul_(scale[-1])
        return out


# ---------------------------------------------------------------- low rank


def low_rank_factors(m: torch.Tensor, rank: int, niter: int, exact_max: int, gen: torch.Generator | None):
    """(U, S, Vh) of a rank-`rank` approximation of the matrix `m`.

    Exact SVD for matrices up to `exact_max` values; above, the randomized range finder
    with `niter` power iterations of Halko, Martinsson and Tropp (2011), seeded by `gen`.
    """
    import torch
    if m.numel() <= exact_max:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        q = min(rank + 8, *m.shape)
        y = m @ torch.randn(m.shape[1], q, generator=gen, device=m.device)
        for _ in range(niter):
            y = m @ (m.T @ torch.linalg.qr(y).Q)
        basis = torch.linalg.qr(y).Q
        ub, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
        u = basis @ ub
    return u[:, :rank], s[:rank], vh[:rank]


@dataclass(frozen=True)
class LowRank(Codec):
    """Send a rank-r approximation of each matrix: its two factors, r (rows + cols) values.

    The update of an m x c weight (more dimensions are flattened after the first) is
    approximated by its top-r singular triplets, as in PowerSGD (Vogels et al. 2019) and
    ATOMO (Wang et al. 2018); the factors U sqrt(S) and sqrt(S) V^T travel as the carry,
    one singular vector after another (so a following block quantizer's blocks stay
    within one vector). Vectors, and matrices too small to gain, travel whole as the
    carry. With error feedback, what the rank cut drops is sent in later rounds.

    `rank_by_round` ([r0, r1, ...], the last repeating) sets the rank of each round's
    messages: early updates are close to low rank (the first update of the embedding is
    95% rank one), later ones are flatter and their residuals must be delivered before the
    run ends, so a rising schedule spends the bytes where they count. The round's rank is
    recorded in the message's header, so decoding is unchanged.
    """

    name: ClassVar[str] = "lowrank"
    carry: ClassVar[str | None] = "factors"
    needs_shape: ClassVar[bool] = True
    rank: int = 4
    niter: int = 2
    exact_max: int = 1 << 22
    seed: int = 0
    rank_by_round: tuple[int, ...] = ()
    shape: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_int(self.rank, "lowrank.rank", 1)
        if not isinstance(self.rank_by_round, (list, tuple)):
            raise CodecError(f"lowrank.rank_by_round must be a list of ranks, got {_short(self.rank_by_round)}")
        object.__setattr__(self, "rank_by_round", tuple(self.rank_by_round))
        for r in self.rank_by_round:
            _check_int(r, "lowrank.rank_by_round", 1)
        _check_int(self.niter, "lowrank.niter", 0, 16)
        _check_int(self.exact_max, "lowrank.exact_max", 1)
        _check_int(self.seed, "lowrank.seed", 0, 2**63 - 1)

    def spec(self) -> dict[str, Any]:
        out = super().spec()
        out.pop("shape")
        return out

    def for_shape(self, shape: tuple[int, ...]) -> "LowRank":
        return dataclasses.replace(self, shape=tuple(int(d) for d in shape))

    def for_round(self, round: int) -> "LowRank":
        """This codec at the rank `rank_by_round` gives `round` (unchanged without one)."""
        if not self.rank_by_round:
            return self
        return dataclasses.replace(self, rank=self.rank_by_round[min(round, len(self.rank_by_round) - 1)])

    def _matrix(self, n: int) -> tuple[int, int, int] | None:
        """(rows, cols, rank) when the factors are smaller than the tensor, else None."""
        if len(self.shape) < 2 or math.prod(self.shape) != n:
            return None
        rows, cols = self.shape[0], n // self.shape[0]
        r = min(self.rank, rows, cols)
        return (rows, cols, r) if r * (rows + cols) < n else None

    def carry_numel(self, n: int) -> int:
        mat = self._matrix(n)
        return n if mat is None else mat[2] * (mat[0] + mat[1])

    def nbytes(self, n: int) -> int:
        return 0

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        import torch
        x = x.reshape(-1).to(torch.float32)
        mat = self._matrix(x.numel())
        if mat is None:
            return {"factors": x}
        rows, cols, r = mat
        gen = torch.Generator(device=x.device)
        gen.manual_seed(key_seed(self.seed, key))
        u, s, vh = low_rank_factors(x.view(rows, cols), r, self.niter, self.exact_max, gen)
        root = s.sqrt()
        return {"factors": torch.cat([(u * root).T.reshape(-1), (vh * root[:, None]).reshape(-1)])}

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        f = parts["factors"]
        mat = self._matrix(n)
        if mat is None:
            return f
        rows, cols, r = mat
        return (f[: r * rows].view(r, rows).T @ f[r * rows :].view(r, cols)).reshape(-1)


# ---------------------------------------------------------------- sparsification


def topk_indices(ax: torch.Tensor, k: int, exact_max: int, gen: torch.Generator | None) -> torch.Tensor:
    """Sorted int64 indices of the k largest entries of the non-negative 1-D `ax`.

    Above `exact_max` values, Deep Gradient Compression's sampled threshold (Lin et al.
    2018): a threshold slightly below the k-th largest of a random sample selects a
    candidate set that holds the top k with overwhelming probability; an exact top-k
    among the candidates finishes (a full top-k if the candidates fall short).
    """
    import torch
    n = ax.numel()
    if n <= exact_max or k * 4 >= n:
        idx = torch.topk(ax, k, sorted=False).indices
    else:
        s = min(n, max(65536, math.ceil(256 * n / k)))
        pos = torch.randint(n, (s,), generator=gen, device=ax.device)
        r = min(s, math.ceil(1.25 * k * s / n) + 8)
        thr = torch.topk(ax[pos], r, sorted=False).values.min()
        cand = torch.nonzero(ax >= thr).squeeze(1)
        if cand.numel() >= k:
            idx = cand[torch.topk(ax[cand], k, sorted=False).indices]
        else:
            idx = torch.topk(ax, k, sorted=False).indices
    return torch.sort(idx).values


@dataclass(frozen=True)
class TopK(Codec):
    """Keep the `fraction` largest magnitudes, per tensor or globally."""

    name: ClassVar[str] = "topk"
    carry: ClassVar[str | None] = "values"
    part_names: ClassVar[tuple[str, ...]] = ("idx", "count")
    fraction: float = 0.01
    scope: str = "tensor"  # tensor | global
    exact_max: int = 1 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, "topk.fraction")
        if self.scope not in ("tensor", "global"):
            raise CodecError(f"topk.scope must be 'tensor' or 'global', got {_short(self.scope)}")
        _check_int(self.exact_max, "topk.exact_max", 1)
        _check_int(self.seed, "topk.seed", 0, 2**63 - 1)

    def carry_numel(self, n: int) -> int:
        return keep_count(self.fraction, n)

    def nbytes(self, n: int) -> int:
        return index_bytes(self.carry_numel(n), n)

    def _gen(self, device: torch.device, key: str) -> torch.Generator:
        import torch
        gen = torch.Generator(device=device)
        gen.manual_seed(key_seed(self.seed, key))
        return gen

    def prepare(self, flats: dict[str, torch.Tensor]) -> dict[str, Any]:
        import torch
        if self.scope != "global" or not flats:
            return {}
        cat = torch.cat([x.reshape(-1).abs() for x in flats.values()])
        idx = topk_indices(cat, keep_count(self.fraction, cat.numel()), self.exact_max, self._gen(cat.device, "*"))
        sizes = torch.tensor([x.numel() for x in flats.values()], device=idx.device)
        ends = torch.cumsum(sizes, 0)
        bounds = torch.searchsorted(idx, ends).tolist()
        out, lo, start = {}, 0, 0
        for (key, x), hi in zip(flats.items(), bounds):
            out[key] = idx[lo:hi] - start
            lo, start = hi, start + x.numel()
        return out

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        import torch
        x = x.reshape(-1)
        n = x.numel()
        idx = hint if hint is not None else topk_indices(x.abs(), keep_count(self.fraction, n), self.exact_max, self._gen(x.device, key))
        low, counts = pack_indices(idx, n)
        return {"idx": low, "count": counts, "values": x[idx].to(torch.float32)}

    def check(self, parts: Parts, n: int, where: str) -> int:
        low = parts.get("idx")
        if low is None or low.dim() != 1:
            raise WireFormatError(f"{where}: missing or malformed encoded part 'idx'")
        k = low.numel()
        expected = self.carry_numel(n)
        if (self.scope == "tensor" and k != expected) or k > n:
            raise WireFormatError(f"{where}: topk sent {k} indices, expected {expected if self.scope == 'tensor' else f'at most {n}'}")
        return k

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        import torch
        idx = unpack_indices(parts["idx"], parts["count"], n, where)
        out = torch.zeros(n, dtype=torch.float32, device=idx.device)
        out[idx] = parts["values"].to(torch.float32)
        return out


def randk_indices(n: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """k sorted indices, one uniform in each stratum [floor(i n / k), floor((i+1) n / k))."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    bounds = torch.arange(k + 1, dtype=torch.int64) * n // k
    width = bounds[1:] - bounds[:-1]
    off = (torch.rand(k, generator=gen, dtype=torch.float64) * width).to(torch.int64).clamp_(max=width - 1)
    return (bounds[:-1] + off).to(device)


@dataclass(frozen=True)
class RandK(Codec):
    """Keep a seeded random `fraction` of coordinates; the receiver regenerates the indices."""

    name: ClassVar[str] = "randk"
    carry: ClassVar[str | None] = "values"
    fraction: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, "randk.fraction")
        _check_int(self.seed, "randk.seed", 0, 2**63 - 1)

    def carry_numel(self, n: int) -> int:
        return keep_count(self.fraction, n)

    def nbytes(self, n: int) -> int:
        return 0

    def encode(self, x: torch.Tensor, key: str, hint: Any = None) -> Parts:
        import torch
        x = x.reshape(-1)
        idx = randk_indices(x.numel(), self.carry_numel(x.numel()), key_seed(self.seed, key), x.device)
        return {"values": x[idx].to(torch.float32)}

    def decode(self, parts: Parts, n: int, key: str, where: str) -> torch.Tensor:
        import torch
        values = parts["values"]
        idx = randk_indices(n, self.carry_numel(n), key_seed(self.seed, key), values.device)
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        out[idx] = values.to(torch.float32)
        return out


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp32, Fp16, Bf16, Int8, Int4, Sign, LowRank, TopK, RandK)}


def build_codec(spec: str | dict[str, Any]) -> Codec:
    """A codec from ``"int8"`` or ``{"name": "int8", "block": 256}``; CodecError if invalid."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise CodecError(f"a codec is a name or a mapping with a 'name', got {_short(spec)}")
    params = dict(spec)
    name = params.pop("name", None)
    cls = CODECS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CodecError(f"unknown codec {_short(name)}; available: {', '.join(CODECS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise CodecError(f"codec {name!r}: unknown parameter(s) {_short(unknown)}; it takes {sorted(fields) or 'none'}")
    if "fraction" in params and isinstance(params["fraction"], int) and not isinstance(params["fraction"], bool):
        params["fraction"] = float(params["fraction"])
    return cls(**params)


MAX_CHAIN = 8  # codecs in one chain (a header cannot make the decoder loop for long)


def check_chain_order(codecs: list[Codec]) -> None:
    """CodecError unless only a chain's first codec needs shapes and every codec but the
    last leaves a carry for the next."""
    for c in codecs[1:]:
        if c.needs_shape:
            raise CodecError(f"codec {c.name!r} must be the first of a chain (it needs the tensor's shape)")
    for c in codecs[:-1]:
        if c.carry is None:
            raise CodecError(f"codec {c.name!r} must be the last of a chain (it leaves nothing for {codecs[-1].name!r} to encode)")


def build_chain_codecs(specs: list[Any] | None) -> list[Codec]:
    """The codecs of a chain written as a list of specs (None: no codec); CodecError if
    invalid. Needs no torch, so a config's chains are checked without loading it."""
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise CodecError(f"a codec chain is a list, got {str(specs)[:80]!r}")
    if len(specs) > MAX_CHAIN:
        raise CodecError(f"a codec chain has at most {MAX_CHAIN} codecs, got {len(specs)}")
    codecs = [build_codec(s) for s in specs]
    check_chain_order(codecs)
    return codecs
