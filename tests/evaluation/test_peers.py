"""The quanto peer's teacher-forced emulation equals decoding through transformers' real QuantizedCache."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.quanto")

from hnfverify.evaluation import WindowStats  # noqa: E402
from hnfverify.models import tiny_model  # noqa: E402
from hnfverify.evaluation.quanto import packed_nbytes, quanto_cache, quanto_method  # noqa: E402


@pytest.mark.parametrize("nbits", [2, 4])
def test_quanto_emulation_equals_real_quantized_cache_decoding(nbits):
    torch.manual_seed(0)
    lm = tiny_model("tiny-llama", seed=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    head_dim = 64 // 4
    prefix, residual, t_len = 10, 4, 23                      # epochs of 4 after the prefill, the last one partial
    ids = torch.randint(0, 256, (1, t_len), generator=torch.Generator().manual_seed(5))
    m = quanto_method(nbits, residual=residual, group=head_dim)
    st = WindowStats()
    with torch.no_grad():
        with m.context(lm.model, prefix, st):
            tf = lm.model(input_ids=ids, use_cache=False).logits[0, prefix - 1:t_len - 1]
        exact = lm.model(input_ids=ids, use_cache=False).logits[0, prefix - 1:t_len - 1]
        cache = quanto_cache(lm.model.config, nbits, residual=residual, group=head_dim)
        out = lm.model(input_ids=ids[:, :prefix], cache=cache, use_cache=True)
        dec = [out.logits[0, -1]]
        for i in range(prefix, t_len - 1):
            out = lm.model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
            dec.append(out.logits[0, -1])
        lm.model(input_ids=ids[:, t_len - 1:t_len], cache=cache, use_cache=True)
    dec = torch.stack(dec)
    assert torch.allclose(tf, dec, atol=2e-5, rtol=1e-4), float((tf - dec).abs().max())
    # the quantization is real: the pass differs from the exact one
    assert float((tf - exact).abs().max()) > 1e-3
    # real bytes: the cache's quantized tensors and its residual, as the emulation counts them
    real = 0
    for layer in cache.layers:
        real += packed_nbytes(layer._quantized_keys) + packed_nbytes(layer._quantized_values)
        real += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    assert m.nbytes(st, t_len) == real
