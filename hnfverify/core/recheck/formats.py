"""The storage formats and their error models (docs/design.md §2.2, §2.3)."""

import re
import struct
from fractions import Fraction as F

from .numbers import fmt, round_up, sqrt_up


# ---------------------------------------------------------------- formats (docs/design.md §2.2, §2.3)
#: the codebook formats' levels in units of the scale (docs/design.md §2.3b), this checker's own copy
CODEBOOK_LEVELS = {
    2: (16, 39, 58, 80),
    3: (14, 50, 77, 101, 125, 149, 176, 211),
    4: (8, 54, 91, 123, 152, 179, 204, 229, 254, 279, 305, 331, 360, 391, 428, 473),
}
CODEBOOK_LEVELS = {b: tuple(F(n, 32) for n in lv) for b, lv in CODEBOOK_LEVELS.items()}


def _reach(levels):
    """The farthest a point of [0, 2^b - 1] lies from its nearest level."""
    return max(levels[0], len(levels) - 1 - levels[-1], max(b - a for a, b in zip(levels, levels[1:])) / 2)


#: llama.cpp's KV types: name -> (code bits, symmetric, n of d = M / -n (or amax / 127), N of d = range / N)
GGML = {"q8_0": (8, True, 127), "q4_0": (4, True, 8), "q5_0": (5, True, 16), "q4_1": (4, False, 15),
        "q5_1": (5, False, 31), "iq4_nl": (4, True, 0)}
#: iq4_nl's per-element coefficient (docs/design.md §2.3d, proofs/iq4_nl_scale.py): E / 127 + 2^-14 + 2^-11 (1 + 49/400
#: + 2^-14) + 2^-22 with E = 27.06, this checker's own copy
IQ4NL_COEF = F(2706, 100) / 127 + F(1, 2 ** 14) + F(1, 2 ** 11) * (1 + F(49, 400) + F(1, 2 ** 14)) + F(1, 2 ** 22)

#: the rotated formats' error-model text before the inner format's (docs/design.md §2.3c)
ROTATION_MODEL = ("Hadamard-rotated y = FWHT32(x) / sqrt(d); |dx| <= E_in + e_f + rho (N + e_f + E_in) + tau, "
                  "e_f = rho N + tau, rho = gamma_(log2 d + 2), tau = 5 sqrt(d) 2^-126, E_in the inner bound on the "
                  "ranges of y (d_token_h, amax_h) widened by e_f; inner: ")


def fmt_def(name):
    """The format a name denotes, or None: unit roundoff u, grid, domain, bits, table entry."""
    if isinstance(name, str) and name.endswith("_h"):
        inner = fmt_def(name[:-2])
        if inner is None or inner.get("rot") or inner["family"] not in ("int", "codebook") or inner["gran"] != "token":
            return None
        return dict(inner, name=name, rot=inner)
    floats = {"fp32": (23, -126, (2 - F(1, 2 ** 23)) * F(2) ** 127, 32), "fp16": (10, -14, F(65504), 16),
              "bf16": (7, -126, (2 - F(1, 2 ** 7)) * F(2) ** 127, 16)}
    if not isinstance(name, str):
        return None
    if name in GGML:                        # llama.cpp's block types (docs/design.md §2.3d)
        bits, sym, n = GGML[name]
        if name == "iq4_nl":
            lead, coef = IQ4NL_COEF, IQ4NL_COEF
        else:
            lead = (F(1, 2 * n) if n == 127 else F(1, n)) if sym else F(1, 2 * n)
            coef = lead + F(1, 2 ** 11)
        return {"name": name, "family": "ggml", "gran": "token", "group": 32, "bits": bits, "over": 16 if sym else 32,
                "u": lead / 2 if sym else lead, "coef": coef, "sym": sym, "steps": n, "domain": F(65504)}
    m = re.fullmatch(r"fp8_e4m3_s((0|[1-9][0-9]*)(\.[0-9]*[1-9])?)", name)
    if m:                                   # vLLM's FP8 with a fixed float32 scale (docs/design.md §2.3d)
        s = F(m.group(1))
        if s <= 0 or F(struct.unpack("<f", struct.pack("<f", float(s)))[0]) != s or s < F(2) ** -126:
            return None
        return {"name": name, "family": "fp8", "gran": "none", "group": 0, "bits": 8, "over": 0, "max": F(448),
                "domain": 448 * s, "u": F(1, 16), "sub": F(2) ** -10, "scale": s}
    if name in floats:
        mant, emin, mx, bits = floats[name]
        f = {"family": "float", "gran": "none", "group": 0, "bits": bits, "over": 0, "max": mx, "domain": mx}
    elif re.fullmatch(r"fp8_(e4m3|e5m2)_t[1-9][0-9]*", name):
        mant, emin, mx = (3, -6, F(448)) if "e4m3" in name else (2, -14, F(57344))
        f = {"family": "fp8", "gran": "token", "group": int(name.rsplit("_t", 1)[1]), "bits": 8, "over": 16,
             "max": mx, "domain": F(65504)}
    else:
        m = re.fullmatch(r"(int|lm)(8|4|3|2)_(t|c)([1-9][0-9]*)", name)
        if not m or not 1 <= int(m.group(4)) <= 4096 or (m.group(1) == "lm" and m.group(2) == "8"):
            return None
        b = int(m.group(2))
        u = F(1, 2 * (2 ** b - 1)) if m.group(1) == "int" else _reach(CODEBOOK_LEVELS[b]) / (2 ** b - 1)
        return {"name": name, "family": "int" if m.group(1) == "int" else "codebook",
                "gran": "token" if m.group(3) == "t" else "channel",
                "group": int(m.group(4)), "bits": b, "over": 32, "u": u, "domain": F(65504)}
    f.update(name=name, u=F(1, 2 ** (mant + 1)), sub=F(2) ** (emin - mant - 1))
    return f


def fmt_json(f):
    """The format's entry in a plan's formats table."""
    if f.get("rot"):
        e = fmt_json(f["rot"])
        return dict(e, error_model=ROTATION_MODEL + e["error_model"])
    if f["family"] == "ggml":
        if f["name"] == "iq4_nl":
            em = ("llama.cpp iq4_nl: blocks of 32 channels, the nearest of 16 fixed levels at d0 = amax/127, then "
                  "FP16 d = the least-squares scale of those codes; |dx| <= c (1 + 2^-9) amax + 2^-18, c = "
                  f"{fmt(IQ4NL_COEF)}")
        elif f["sym"]:
            how = "round to nearest" if f["steps"] == 127 else \
                f"trunc(x/d + {f['steps']} + 1/2), clamped at {2 * f['steps'] - 1}"
            em = (f"llama.cpp {f['name']}: blocks of 32 channels, FP16 d = amax/{f['steps']} (signed for q4_0/q5_0), "
                  f"{how}; |dx| <= (c + 2^-11)(1 + 2^-9) amax + 2^-18")
        else:
            em = (f"llama.cpp {f['name']}: blocks of 32 channels, FP16 d = (max - min)/{f['steps']} and FP16 min; "
                  "|dx| <= (1/(2N) + 2^-11)(1 + 2^-9) range + (2^-11 + 2^-20) amax + 2^-18")
    elif f.get("scale") is not None:
        em = (f"fixed float32 scale s = {fmt(f['scale'])} (vLLM fp8_e4m3), clamp to +-448, round-to-nearest-"
              f"even; |dx| <= (u + 2^-21)|x| + (1 + 2^-21) {fmt(f['sub'])} s for |x| <= 448 s")
    elif f["family"] == "float":
        em = (f"round-to-nearest; |dx| <= u|x| (normal), <= {fmt(f['sub'])} (subnormal); "
              f"overflow above {fmt(f['max'])}")
    elif f["family"] == "fp8":
        em = (f"per-token FP16 scale s >= amax/{fmt(f['max'])}, clamp, round-to-nearest-even; "
              f"|dx| <= (u + 2^-21)|x| + (1 + 2^-21) {fmt(f['sub'])} s")
    elif f["family"] == "codebook":
        em = ("asymmetric nearest of the Lloyd-Max levels, FP16 zero-point (rounded down) and scale (rounded up) "
              "per group; |dx| <= u (1 + 2^-9) range + (u 2^-9 + 2^-20) |x|max + 2^-23")
    else:
        em = ("asymmetric round-to-nearest, FP16 zero-point (rounded down) and scale (rounded up) per group; "
              "|dx| <= u (1 + 2^-9) range + (u 2^-9 + 2^-20) |x|max + 2^-23")
    bpe = F(f["bits"]) + (F(f["over"], f["group"]) if f["over"] else 0)
    out = {"family": f["family"], "granularity": f["gran"], "group": f["group"], "value_bits": f["bits"],
           "overhead_bits": f["over"], "bits_per_element": fmt(bpe), "u": fmt(f["u"]), "error_model": em}
    if f.get("scale") is not None:
        out["scale"] = fmt(f["scale"])
    return out


def rotation(d):
    """rho and tau of the rotation's lemma (§2.3c) for a power-of-two d."""
    n = d.bit_length() + 1
    return n * F(1, 2 ** 24) / (1 - n * F(1, 2 ** 24)), 5 * sqrt_up(F(d)) * F(1, 2 ** 126)


def rotated_stages(st):
    """(N, e_f, the ranges of the computed H x) for ranges st: the measured rotated ranges where given, capped by
    what ||H x|| = ||x|| <= sqrt(d) amax implies."""
    sd = sqrt_up(F(st["d"]))
    rho, tau = rotation(st["d"])
    n = sd * st["amax"]
    amh = n if st.get("amh") is None else min(st["amh"], n)
    n = min(n, sd * amh)
    dth = 2 * sd * amh if st.get("dth") is None else min(st["dth"], 2 * sd * amh)
    e = rho * n + tau
    return n, e, widen({"d": st["d"], "dt": dth, "dc": dth, "amax": amh}, e)


def domain_ok(f, st):
    """Every value (and, rotated, every rotated value) within the format's domain."""
    if f.get("rot"):
        return st["amax"] <= f["domain"] and rotated_stages(st)[2]["amax"] <= f["domain"]
    return st["amax"] <= f["domain"]


def diam(f, st):
    """D of Theorem 5.7: the l2 diameter of the box the format quantizes a vector over."""
    if f.get("rot"):
        return rotated_stages(st)[2]["dt"]
    if f["family"] == "ggml" and f["sym"]:       # the box [-amax, amax]^d
        return 2 * sqrt_up(F(st["d"])) * st["amax"]
    return st["dc"] if f["gran"] == "channel" else st["dt"]


def l2_error(f, st):
    """||x - dequant(quant(x))||_2 for one cached d-vector within the ranges st (the lemmas of §2.3)."""
    if f.get("rot"):
        rho, tau = rotation(st["d"])
        n, e, ys = rotated_stages(st)
        ein = l2_error(f["rot"], ys)
        return ein + e + rho * (n + e + ein) + tau
    sd = sqrt_up(F(st["d"]))
    norm = sd * st["amax"]
    if f["family"] == "float":
        return f["u"] * norm + sd * f["sub"]
    if f["family"] == "ggml":
        lead = f["coef"] * (1 + F(1, 2 ** 9))
        if f["sym"]:
            return lead * norm + sd * F(1, 2 ** 18)
        return lead * st["dt"] + (F(1, 2 ** 11) + F(1, 2 ** 20)) * norm + sd * F(1, 2 ** 18)
    if f.get("scale") is not None:
        return (f["u"] + F(1, 2 ** 21)) * norm + sd * f["sub"] * (1 + F(1, 2 ** 21)) * f["scale"]
    if f["family"] == "fp8":
        scale = max(st["amax"] * (1 + F(1, 2 ** 9)) / f["max"], F(1, 2 ** 14))
        return (f["u"] + F(1, 2 ** 21)) * norm + sd * f["sub"] * (1 + F(1, 2 ** 21)) * scale
    sl = F(1, 2 ** 9)
    return f["u"] * (1 + sl) * diam(f, st) + (f["u"] * sl + F(1, 2 ** 20)) * norm + sd * F(1, 2 ** 23)


def widen(st, e):
    """Ranges of values moved by at most e in l2 (so by at most e per element), §2.3."""
    if e == 0:
        return st
    g = 2 * sqrt_up(F(st["d"])) * e
    out = {"d": st["d"], "dt": st["dt"] + g, "dc": st["dc"] + g, "amax": st["amax"] + e}
    if "dth" in st:         # the rotated ranges move by at most e per element too
        out.update(dth=None if st["dth"] is None else st["dth"] + g, amh=None if st["amh"] is None else st["amh"] + e)
    return out


def chain_stages(chain, st):
    """[(format, its widened ranges, the error so far)]: e_1 = err(f_1), e_k = up(e_(k-1) + err(f_k))."""
    out, e = [], F(0)
    for k, f in enumerate(chain):
        s = widen(st, e)
        step = l2_error(f, s)
        e = step if k == 0 else round_up(e + step)
        out.append((f, s, e))
    return out
