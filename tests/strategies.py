"""Shared hypothesis strategies."""

from hypothesis import strategies as st

#: target attention weights for one distinguished position: near 0, near 1/2, near 1, or anywhere
alpha_targets = st.one_of(
    st.floats(1e-6, 1e-3),
    st.floats(0.499, 0.501),
    st.just(0.5),
    st.floats(0.999, 1.0 - 1e-7),
    st.floats(0.01, 0.99),
)

#: (query heads, kv heads) with GQA groups
head_layouts = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2), (9, 3)])
