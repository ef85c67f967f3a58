"""hnfverify: certified mixed-precision KV-cache plans for Hugging Face causal LMs.

Importing the package loads nothing heavy and changes nothing: torch and transformers are
imported only by the modules that need them (analysis, instrumentation, the runtime cache).
"""

__version__ = "0.1.0"
