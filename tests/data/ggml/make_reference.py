"""Reference vectors for llama.cpp's KV-cache types, made by code hnfverify did not write: the ``gguf`` package's
numpy quantizers (``gguf.quants.quantize`` / ``dequantize``, gguf 0.19.0, which follow ggml's
``quantize_row_q*_ref`` bit for bit) for q8_0, q4_0, q5_0, q4_1, q5_1; for iq4_nl, which gguf only dequantizes,
ggml's own reference quantizer compiled from its source (``iq4_nl_ref.c``: ggml commit d99724f2, copied verbatim,
``gcc -O2 -ffp-contract=off``) and gguf's dequantizer. Run once; ``reference.npz`` is committed with this
provenance and tests/kv/test_ggml_formats.py requires hnfverify's codec to reproduce every byte.

    .venv/bin/python tests/data/ggml/make_reference.py
"""

import subprocess
import tempfile
from pathlib import Path

import numpy as np
from importlib.metadata import version

from gguf.quants import dequantize, quantize
from gguf import GGMLQuantizationType as T


def inputs() -> np.ndarray:
    rng = np.random.default_rng(20261204)
    x = rng.standard_normal((48, 64)).astype(np.float32) * np.exp(rng.standard_normal((48, 1))).astype(np.float32)
    x[0] = 0.0                                              # an all-zero token (d = 0)
    x[1] = 3.25                                             # a constant token
    x[2, :32] = np.tile([1.0, -1.0], 16)                    # q4_0's clamp: the positive extreme one step off
    x[3, 5] = 1000.0                                        # one outlier channel
    x[4] = np.linspace(-7.5, 7.5, 64, dtype=np.float32)     # values exactly on half steps
    x[5] *= np.float32(1e-6)                                # tiny scales (FP16 subnormal d)
    x[6, :32] = np.float32(2.0) ** -30                      # a block whose d underflows FP16
    return x


def main() -> None:
    x = inputs()
    out = {"x": x}
    for name in ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1"):
        qt = getattr(T, name.upper())
        blocks = quantize(x, qt)
        out[f"{name}_blocks"] = blocks
        out[f"{name}_values"] = dequantize(blocks, qt)
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "iq4_nl_ref"
        subprocess.run(["gcc", "-O2", "-std=gnu11", "-ffp-contract=off", "-o", str(exe), str(here / "iq4_nl_ref.c"),
                        "-lm"], check=True)
        raw = subprocess.run([str(exe)], input=x.astype(np.float32).tobytes(), capture_output=True, check=True).stdout
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(x.shape[0], -1)
    out["iq4_nl_blocks"] = blocks
    out["iq4_nl_values"] = dequantize(blocks, T.IQ4_NL)
    np.savez_compressed(Path(__file__).with_name("reference.npz"), gguf_version=np.array(version("gguf")), **out)


if __name__ == "__main__":
    main()
