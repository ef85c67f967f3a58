"""Storage formats for cached keys and values, as one table.

``format_table(head_dim, channel_group)`` returns every format the planner may use for a model
with that head dimension: FP32, FP16, BF16, FP8-E4M3/E5M2 (per-token FP16 scale), INT8/INT4/INT3/INT2
and the LM4/LM3/LM2 codebooks (Lloyd-Max levels, docs/design.md §2.3b) per token (group = head_dim) and
per channel (group = ``channel_group`` tokens; any divisor of the analysis' channel group is sound,
docs/design.md §3), and, where head_dim is a power of two, the per-token INT4/3/2 and LM4/3/2 formats of the
Hadamard-rotated vector (``int3_t64_h``, docs/design.md §2.3c). ``by_name``
rebuilds a format from its name (e.g. ``int4_c32``), which is what plan.json stores.
"""

from __future__ import annotations

import re

from ...errors import InputError
from .base import GRANULARITIES, Format, SegmentStats
from .floating import BF16, FP16, FP32, FloatFormat
from .fp8 import Fp8Format, ScaledFp8Format, e4m3, e5m2, float32_exact, scaled_e4m3
from .ggml import GGML_TYPES, GgmlFormat, ggml_format, ggml_formats
from .integer import CODEBOOK_BITS, INT_BITS, CodebookFormat, IntFormat, codebook_format, int_format, packed_row_bytes
from .rotated import RotatedFormat, is_power_of_two, rotated

__all__ = ["Format", "SegmentStats", "FloatFormat", "Fp8Format", "IntFormat", "CodebookFormat", "format_table", "by_name",
           "GRANULARITIES", "channel_groups_of", "FP32", "FP16", "BF16", "INT_BITS", "packed_row_bytes", "RotatedFormat",
           "ROTATED_BITS", "is_power_of_two", "GgmlFormat", "ScaledFp8Format", "engine_formats", "scaled_e4m3"]

#: the bits of the per-token formats that get a rotated variant (INT8 gains nothing from it)
ROTATED_BITS = (4, 3, 2)

# used with fullmatch (``$`` would accept a final newline); ASCII digits without a leading zero, as in
# specs/plan.schema.json (``\d`` would also take other scripts' digits, which int() reads)
_NAME = re.compile(r"(q8_0|q4_0|q5_0|q4_1|q5_1|iq4_nl|fp8_e4m3_s(?:0|[1-9][0-9]*)(?:\.[0-9]*[1-9])?|fp32|fp16|bf16|fp8_e4m3_t([1-9][0-9]*)|fp8_e5m2_t([1-9][0-9]*)|(int(?:8|4|3|2)|lm(?:4|3|2))_(t|c)([1-9][0-9]*))"
                   r"(_h)?")


def channel_groups_of(channel_group: int) -> list[int]:
    """The channel groups a plan may use with an analysis that measured d_channel over groups of
    ``channel_group`` tokens: its divisors that fill whole bytes of every code width (multiples of 8),
    and the group itself. A group aligned at multiples of g lies inside one aligned group of the
    analysis' (docs/design.md §3), so the measured diameter bounds it."""
    return sorted({channel_group} | {g for g in range(8, channel_group, 8) if channel_group % g == 0}, reverse=True)


def engine_formats(head_dim: int) -> dict[str, Format]:
    """The engines' own KV-cache types (llama.cpp's q8_0, q4_0, q5_0, q4_1, q5_1, docs/design.md §2.3d) a model with
    this head_dim can use: for fixed plans (``--uniform``, ``certify-engine``); the planner's search does not pick them."""
    return {f.name: f for f in ggml_formats(head_dim)}


def format_table(head_dim: int, channel_group: int = 32) -> dict[str, Format]:
    fmts: list[Format] = [FP32, FP16, BF16, e4m3(head_dim), e5m2(head_dim)]
    for b in INT_BITS:
        if packed_row_bytes(b, head_dim) * 8 == b * head_dim:     # a token's codes fill whole bytes
            fmts.append(int_format(b, "token", head_dim))
        fmts += [int_format(b, "channel", g) for g in channel_groups_of(channel_group)]
    for b in CODEBOOK_BITS:
        if packed_row_bytes(b, head_dim) * 8 == b * head_dim:
            fmts.append(codebook_format(b, "token", head_dim))
        fmts += [codebook_format(b, "channel", g) for g in channel_groups_of(channel_group)]
    if is_power_of_two(head_dim):
        fmts += [rotated(f) for f in list(fmts) if f.granularity == "token" and f.family in ("int", "codebook")
                 and f.value_bits in ROTATED_BITS]
    return {f.name: f for f in fmts}


def by_name(name: str) -> Format:
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if not m:
        raise InputError(f"unknown format {name!r}: expected fp32, fp16, bf16, q8_0, q4_0, q5_0, q4_1, q5_1, iq4_nl, "
                         "fp8_e4m3_sS (vLLM, fixed scale S), fp8_e4m3_tG, fp8_e5m2_tG, "
                         "intB_tG or intB_cG (B = 8, 4, 3, 2), lmB_tG or lmB_cG (B = 4, 3, 2), and intB_tG_h or "
                         "lmB_tG_h (Hadamard-rotated)")
    if m.group(7):
        if not m.group(4) or m.group(5) != "t":
            raise InputError(f"unknown format {name!r}: only the per-token intB_tG and lmB_tG formats have a "
                             "Hadamard-rotated variant (_h)")
        return rotated(by_name(name[:-2]))
    if name in GGML_TYPES:
        return ggml_format(name)
    if name.startswith("fp8_e4m3_s"):
        from fractions import Fraction

        scale = Fraction(name[len("fp8_e4m3_s"):])
        if not float32_exact(scale):
            raise InputError(f"format {name!r}: the scale must be a positive normal float32 value written exactly "
                             "(e.g. fp8_e4m3_s1, fp8_e4m3_s0.0029296875)")
        return scaled_e4m3(scale)
    if name in ("fp32", "fp16", "bf16"):
        return {"fp32": FP32, "fp16": FP16, "bf16": BF16}[name]
    if m.group(2):
        return e4m3(int(m.group(2)))
    if m.group(3):
        return e5m2(int(m.group(3)))
    group = int(m.group(6))
    if not 1 <= group <= 4096:
        raise InputError(f"format {name!r}: group size must be in [1, 4096]")
    kind, gran = m.group(4), "token" if m.group(5) == "t" else "channel"
    if kind.startswith("lm"):
        return codebook_format(int(kind[2:]), gran, group)
    return int_format(int(kind[3:]), gran, group)
