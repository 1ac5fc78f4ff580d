"""The leak audit, attention pictures and the command line for any Hugging Face ``transformers`` model.

An HF ``PreTrainedModel`` declares nothing to maskattn, so :class:`HFAdapter` declares it: its attention
modules (every module with an ``is_causal`` flag and a ``layer_idx``), and what its kind promises.

* **causal language models** (``config.is_decoder``, a causal-LM class, or causal attention modules):
  no logit depends on a later token, nor on how many there are; no token of one packed document
  depends on another document. Packed documents reach the model as transformers reads them in
  training (:func:`position_id_resets`: ``position_ids`` restarting at each document, no
  ``attention_mask``, ``use_cache=False``); pass ``packing=`` to audit how your own pipeline feeds them.
  Where the config puts a sliding window W on every one of its N layers (:func:`window_reach`), no
  logit at t depends on a token before t - N * (W - 1).
* **encoders**: no hidden state of a real token depends on the padding (2-D ``attention_mask``).

The adapter is registered with :func:`maskattn.models.register_adapter`, so ``maskattn.audit(hf_model)``
and :func:`maskattn.viz.capture_attention` take HF models as they are, whatever their
``attn_implementation``. Pictures are cheap under ``"maskattn"`` (recomputed from the log-sum-exp that
:func:`maskattn.hf.observe` hands over) and read from the attention modules' weights output under
``"eager"``; other implementations return no weights, and capturing them raises an error saying so.

:data:`COMMANDS` are ``maskattn viz`` / ``audit`` / ``evaluate`` / ``generate`` for a directory
written by ``save_pretrained`` (loaded with transformers, local files only, under ``"maskattn"``).

Shape legend: B batch, H query heads, Lq queries, Lk keys, L sequence length.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from maskattn import hf, metrics
from maskattn.data import open_text
from maskattn.decoding import check_sampling
from maskattn.errors import UsageError
from maskattn.models.inspection import AttentionSite, AuditProbe, ProbeCheck, ProbeInput, register_adapter
from maskattn.tokenization import decode_continuation
from maskattn.weights import attention_weights, select

Packing = Callable[[Tensor, Tensor], dict[str, Any]]


def position_id_resets(input_ids: Tensor, documents: Tensor) -> dict[str, Any]:
    """Packed documents as transformers reads them in training: ``position_ids`` that restart at 0 where
    the (B, L) document ids change, no ``attention_mask``, no KV cache (transformers derives the
    packed-document mask from the resets only then)."""
    steps = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)  # (B, L)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, steps, 0).cummax(dim=1).values  # (B, L) start of each token's document
    return {"input_ids": input_ids, "position_ids": steps - first, "use_cache": False}


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            for name in ((names,) if isinstance(names, str) else names)}


# Architectures whose config has no ``layer_types`` and whose every layer runs ``config.sliding_window`` when it is set
# (their model builds transformers' sliding-window causal mask from it, for all layers alike).
WINDOW_ON_EVERY_LAYER = frozenset({"mistral", "mixtral", "ministral3", "phi3", "phimoe", "qwen3_moe", "starcoder2"})


def window_reach(config: Any) -> int | None:
    """How many positions back a causal LM's logits may read, when its config puts a sliding window on every layer:
    N layers of windows of W keys (transformers' ``k > q - W``: keys q - W + 1 .. q) reach N * (W - 1). None where
    a layer is global (Gemma-2/3's alternating layers, Qwen2 below ``max_window_layers``: the reach is unbounded),
    or where the config does not say (``layer_types`` absent and the architecture not in
    :data:`WINDOW_ON_EVERY_LAYER`)."""
    config = config.get_text_config()
    window, layers = getattr(config, "sliding_window", None), getattr(config, "num_hidden_layers", None)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (window, layers)):
        return None
    kinds = getattr(config, "layer_types", None)
    every = (len(kinds) == layers and all(kind == "sliding_attention" for kind in kinds) if kinds is not None
             else config.model_type in WINDOW_ON_EVERY_LAYER)
    return layers * (window - 1) if every else None


class HFAdapter:
    """An HF ``PreTrainedModel`` as maskattn inspects it (:class:`maskattn.models.Inspectable` and
    :class:`maskattn.models.AttentionObserver`).

    Args:
        model: the HF model (not an encoder-decoder one).
        packing: how a packed batch reaches the model: ``(input_ids (B, L), document ids (B, L))`` ->
            the keyword arguments of the model call (default :func:`position_id_resets`).

    Raises:
        TypeError: for an encoder-decoder model (its cross-attention is not declared here).
    """

    def __init__(self, model: nn.Module, *, packing: Packing = position_id_resets) -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise TypeError(f"{type(model).__name__}: maskattn inspects HF decoder-only and encoder-only models; "
                            "encoder-decoder models are not supported")
        self.model = model
        self.packing = packing
        self.causal = bool(getattr(model.config, "is_decoder", False)) or type(model).__name__ in _causal_lm_classes() \
            or any(site.kind == "self-causal" for site in self.attention_sites().values())

    def attention_sites(self) -> dict[str, AttentionSite]:
        """Every module with a bool ``is_causal`` and an int ``layer_idx`` (HF attention modules), by name."""
        return {name: AttentionSite("self-causal" if module.is_causal else "self-bidirectional", module.layer_idx)
                for name, module in self.model.named_modules()
                if isinstance(getattr(module, "is_causal", None), bool)
                and isinstance(getattr(module, "layer_idx", None), int)}

    def audit_probe(self) -> AuditProbe:
        """Causal LMs: logits vs later tokens (and, all layers sliding windows, vs tokens beyond their reach), and
        packed documents; encoders: hidden states vs padding."""
        title = type(self.model).__name__
        tokens = ProbeInput("input_ids", "tokens", self.model.config.get_text_config().vocab_size)
        if not self.causal:
            uses = ("input_ids", "lengths")
            return AuditProbe(inputs=(tokens, ProbeInput("lengths", "lengths")),
                              checks=(ProbeCheck("padding", uses, f"{title} hidden states vs padding",
                                                 varies="input_ids", lengths="lengths"),))
        packing = getattr(self.packing, "__name__", type(self.packing).__name__)
        reach = window_reach(self.model.config)
        window = () if reach is None else (ProbeCheck("window", ("input_ids",), f"{title} logits vs tokens outside "
                                                      "the sliding window", varies="input_ids", reach=reach),)
        return AuditProbe(
            inputs=(tokens, ProbeInput("documents", "documents")),
            checks=(ProbeCheck("causal", ("input_ids",), f"{title} logits vs later tokens", varies="input_ids"),
                    *window,
                    ProbeCheck("documents", ("input_ids", "documents"), f"{title} packed documents ({packing})",
                               varies="input_ids", documents="documents")))

    def __call__(self, *, input_ids: Tensor, lengths: Tensor | None = None,
                 documents: Tensor | None = None) -> Tensor:
        """The model's ``.logits`` (or ``.last_hidden_state``) for the probe's inputs: ``lengths`` become a
        right-padding ``attention_mask``, ``documents`` go through ``packing``."""
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if documents is not None:
            kwargs = self.packing(input_ids, documents)
        if lengths is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            kwargs["attention_mask"] = (positions < lengths[:, None].to(input_ids.device)).long()  # (B, L)
        out = self.model(**kwargs)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state

    def eval(self) -> HFAdapter:
        self.model.eval()
        return self

    def get_submodule(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def observe_attention(self, names: Mapping[str, nn.Module], record: Callable[[str, Tensor], None], *,
                          heads: Sequence[int] | None, rows: Sequence[int] | None) -> list[RemovableHandle]:
        """Record the weights of every call of the modules ``names``: from the log-sum-exp where the call
        ran through maskattn (:func:`maskattn.hf.observe`), else from the module's weights output (eager).

        A call that gives neither raises RuntimeError, from the forward, naming the module and the fix.
        """
        by_module = {id(module): name for name, module in names.items()}
        seen: set[str] = set()  # modules whose current call maskattn reported

        def from_lse(call: hf.ObservedCall) -> None:
            name = by_module.get(id(call.module))
            if name is not None:
                seen.add(name)
                record(name, attention_weights(call.query, call.key, call.lse, call.mask.mask, scale=call.scale,
                                               q_offset=call.mask.q_offset, heads=heads, rows=rows))

        def from_output(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                if name in seen:
                    seen.discard(name)
                    return
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if not isinstance(weights, Tensor):
                    implementation = getattr(self.model.config, "_attn_implementation", None)
                    fix = ("its soft-capped calls run densely, without a log-sum-exp; use 'eager'"
                           if implementation == hf.NAME else
                           "use model.set_attn_implementation('maskattn') after maskattn.hf.register() (cheap), "
                           "or 'eager'")
                    raise RuntimeError(f"capture_attention: {name} ({type(module).__name__}) returned no attention "
                                       f"weights under attn_implementation={implementation!r}; {fix}")
                record(name, select(weights.detach(), heads, rows))  # (B, H, Lq, Lk) -> the chosen heads and rows
            return hook

        return [hf.observe(from_lse), *(module.register_forward_hook(from_output(name))
                                        for name, module in names.items())]


def _adapt(model: Any) -> HFAdapter | None:
    modeling = sys.modules.get("transformers.modeling_utils")  # an HF model exists only once this is loaded
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return None
    return HFAdapter(model)


register_adapter(_adapt)


# --- Hugging Face directories on the command line -----------------------------------------------------
def is_hf_directory(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory written by transformers' ``save_pretrained`` (a ``config.json``
    with a ``model_type``), not one written by maskattn."""
    config = Path(path) / "config.json" if path else None
    if config is None or not config.is_file():
        return False
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "format" not in meta


def load(directory: str | Path, *, tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from an HF directory, local files only, running ``attn_implementation="maskattn"``.

    The class is ``AutoModelForCausalLM`` when ``config.json`` names a causal-LM architecture, else
    ``AutoModel``. The tokenizer is None when ``tokenizer`` is False.

    Raises:
        ValueError: naming the directory, when it holds no tokenizer and one was asked for, an encoder-decoder model,
            no safetensors weights (a pickle is never read) or a model defined by its own Python code (never run)
            (UsageError).
    """
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # huggingface_hub before its typed configs: no such check, no such error
        StrictDataclassError = TypeError
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from maskattn.models.persistence import check_counts, load_tokenizer, refuse_broken_link

    # never run a directory's own Python code (transformers asks on a terminal, and runs it on "y"), never unpickle
    meta = json.loads((Path(directory) / "config.json").read_text())
    if "auto_map" in meta and meta.get("model_type") not in CONFIG_MAPPING:
        raise UsageError(f"{directory}: config.json's model_type {meta.get('model_type')!r} is defined by Python code "
                         "in the directory (auto_map); maskattn runs no code from a model directory")
    weights = [Path(directory) / name for name in ("model.safetensors", "model.safetensors.index.json")]
    if not any(path.is_file() for path in weights):
        for path in weights:
            refuse_broken_link(path)
        found = sorted(p.name for p in Path(directory).iterdir())
        raise UsageError(f"{directory}: no model.safetensors nor model.safetensors.index.json (maskattn reads "
                         f"safetensors weights only, never a pickle such as pytorch_model.bin; found {found})")
    shapes = _stored_shapes(Path(directory))
    if shapes is not None:  # before transformers reads config.json: Qwen2's config builds a list num_hidden_layers long
        model_type = meta.get("model_type")
        known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
        check_counts(meta, CONFIG_MAPPING[model_type].attribute_map if known else {}, len(shapes[0]),
                     source=Path(directory) / "config.json", weights=shapes[1])
        for key, values in meta.items():  # a text_config's layers too
            if isinstance(values, dict):
                check_counts(values, {}, len(shapes[0]), source=f"{Path(directory) / 'config.json'}: {key}",
                             weights=shapes[1])
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (StrictDataclassError, TypeError) as err:  # huggingface_hub's type checks of the fields: a traceback
        said = " ".join(str(err).split())  # its message spans lines
        raise UsageError(f"{Path(directory) / 'config.json'}: transformers refuses its settings: {said}") from err
    if getattr(config, "is_encoder_decoder", False):  # HFAdapter refuses them: say so before loading any weights
        raise UsageError(f"{directory}: an encoder-decoder model ({config.model_type}); maskattn's commands run "
                         "Hugging Face decoder-only and encoder-only models")
    causal = any(name in _causal_lm_classes() for name in (getattr(config, "architectures", None) or ()))
    cls = AutoModelForCausalLM if causal else AutoModel
    if shapes is not None:  # transformers builds the whole model from config.json first
        _check_sizes(Path(directory), config, cls, *shapes)
    name = hf.register()
    try:
        model = cls.from_pretrained(directory, local_files_only=True, attn_implementation=name,
                                    use_safetensors=True, trust_remote_code=False).eval()
    except KeyError as err:  # Falcon, GPT-Neo: a dict of their own attention classes, a KeyError traceback
        if err.args != (name,):
            raise
        raise UsageError(f"{directory}: transformers' {config.model_type} model does not take attn_implementation="
                         f"{name!r} (it picks its attention classes itself); maskattn's commands cannot run it") \
            from err
    # Bloom, MPT, DeBERTa, XLNet: transformers takes the name, then their own attention code runs (and fails on the
    # mask maskattn built, or never calls maskattn); transformers' own test of that, as set_attn_implementation uses it
    bypassing = [type(m).__name__ for m in model.modules() if isinstance(m, PreTrainedModel)
                 and not getattr(type(m), "_can_set_attn_implementation", lambda: True)()]
    if bypassing:
        raise UsageError(f"{directory}: transformers' {config.model_type} model does not take attn_implementation="
                         f"{name!r} ({bypassing[0]} runs its own attention code, not transformers' "
                         "AttentionInterface); maskattn's commands cannot run it")
    if not tokenizer:
        return model, None
    if (Path(directory) / "tokenizer.json").exists():  # one of another kind was transformers' KeyError traceback
        load_tokenizer(Path(directory) / "tokenizer.json")
    try:
        return model, AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory}: no tokenizer that transformers can load locally ({err})") from err


def _stored_shapes(directory: Path) -> tuple[dict[str, tuple[int, ...]], str] | None:
    """The shapes of the tensors of an HF directory's safetensors files (read from their headers) and the name of the
    file they come from (the index for shards); None when transformers is left to name an unreadable index itself.
    A FormatError naming a safetensors file whose header cannot be read."""
    from maskattn.models.persistence import stored_shapes

    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        try:
            files = sorted({f for f in json.loads(index.read_text())["weight_map"].values()
                            if isinstance(f, str) and Path(f).name == f and (directory / f).is_file()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:  # a file that is there but unreadable is named here: transformers' SafetensorError names none
        shapes.update(stored_shapes(directory / name))
    return shapes, files[0] if len(files) == 1 else index.name


def _check_sizes(directory: Path, config: Any, cls: Any, shapes: dict[str, tuple[int, ...]], weights: str) -> None:
    """A FormatError naming ``config.json`` and the setting when its sizes do not fit the safetensors tensors
    (``shapes``, from the file named ``weights``), compared with the model built on the meta device (10^9 layers are
    refused by count, never built). Tensors the model lacks or the files lack (tied weights, buffers, renamed keys)
    are not compared."""
    from maskattn.models.persistence import check_shapes

    stored = dict(shapes)

    def skeleton(config: Any) -> nn.Module:
        model = cls.from_config(config)
        prefix = f"{model.base_model_prefix}." if model.base_model_prefix else None
        if prefix:  # saved from the base model or a model with a head: transformers adds or strips the prefix
            stored.update({prefix + n: s for n, s in shapes.items() if prefix + n not in shapes})
            stored.update({n.removeprefix(prefix): s for n, s in shapes.items()
                           if n.startswith(prefix) and n.removeprefix(prefix) not in shapes})
        return model

    check_shapes(skeleton, config, stored, {}, source=directory / "config.json", weights=weights)


def evaluate_text(model: nn.Module, tokenizer: Any, path: str | Path) -> dict[str, float]:
    """Mean next-token loss (nats per token) and perplexity of an HF causal LM on a text file, read in
    windows of the model's context (at most 1,024 tokens) that overlap by one token, so that every token
    but the first is scored exactly once.

    Raises:
        ValueError: when the model is not a causal language model.
    """
    if not HFAdapter(model).causal or getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"evaluate scores causal language models; {type(model).__name__} is not one")
    with open_text(path) as f:  # gzip too, and one error naming the file, as for maskattn's own models
        ids = tokenizer(f.read())["input_ids"]
    block = min(1024, getattr(model.config.get_text_config(), "max_position_embeddings", None) or 1024)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, max(1, len(ids) - 1), max(1, block - 1)):  # its first token: the last one scored
            x = torch.tensor([ids[start : start + block]])  # (1, L)
            if x.shape[1] < 2:
                continue
            logits = model(input_ids=x).logits  # (1, L, V)
            total += float(F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
    if count == 0:  # never a perplexity from no tokens (maskattn's own lm evaluation refuses it too)
        raise UsageError(f"{path}: fewer than 2 tokens to score; a loss of 0.0 (perplexity 1.0) would mean nothing")
    mean = total / count
    return {"loss": mean, "perplexity": metrics.perplexity(mean), "tokens": count}


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 200,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0) -> str:
    """The prompt followed by text from ``model.generate`` (greedy when temperature is 0)."""
    if not callable(getattr(model, "generate", None)) or not HFAdapter(model).causal:
        raise UsageError(f"generate continues text with causal language models; {type(model).__name__} is not one")
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = tokenizer(prompt)["input_ids"]
    fallback = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
                     if i is not None), 0)
    x = torch.tensor([ids or [fallback]])  # (1, L)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "pad_token_id": pad}
    if temperature > 0:
        options.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **options)
    except IndexError as e:  # a learned position table (GPT-2) ends at max_position_embeddings; RoPE does not
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        room = f"; at most {limit - x.shape[1]} new tokens fit" if limit and limit > x.shape[1] else ""
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the prompt ({x.shape[1]} tokens) and the new tokens are "
                         f"longer than {type(model).__name__} can read (max_position_embeddings={limit}){room}") from e
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    return prompt + decode_continuation(decode, ids, out[0, x.shape[1]:].tolist())


class _Tokens:
    """What :func:`maskattn.viz.visualize` reads of a tokenizer, from an HF one."""

    def __init__(self, tokenizer: Any) -> None:
        self.encode = lambda text: tokenizer(text)["input_ids"]
        self.backend = tokenizer.backend_tokenizer  # a tokenizers.Tokenizer: id_to_token
        self.pad_id = tokenizer.pad_token_id or 0


def _viz(args: argparse.Namespace) -> int:
    from maskattn.viz import check_out_directory, replace_earlier_pictures, visualize

    check_out_directory(args.out)
    model, tokenizer = load(args.model)
    if not tokenizer(args.input)["input_ids"]:
        raise UsageError(f"--input: {args.input!r} is no token for {type(model).__name__}; give some text")
    try:
        written = visualize(model, _Tokens(tokenizer), args.input, args.out, target=args.target)
    except IndexError as e:  # a learned position table (GPT-2, BERT) ends at max_position_embeddings; RoPE does not
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        raise UsageError(f"--input: longer than {type(model).__name__} can read (max_position_embeddings={limit}): "
                         f"{e}") from e
    replace_earlier_pictures(args.out, written)
    print(f"wrote {len(written)} files to {args.out}; open {written[-1]}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from maskattn.audit import audit_model

    model = load(args.model, tokenizer=False)[0]
    try:
        report = audit_model(model, length=args.length)
    except IndexError as e:  # a learned position table (GPT-2, BERT) ends at max_position_embeddings; RoPE does not
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if not isinstance(limit, int) or args.length <= limit:
            raise
        raise UsageError(f"--length {args.length}: more than the {limit} positions of {args.model} "
                         "(max_position_embeddings)") from e
    print(f"== {args.model}\n{report}\n")
    return 0 if report.ok else 1


def _evaluate(args: argparse.Namespace) -> int:
    print(json.dumps(evaluate_text(*load(args.model), args.data), indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    print(generate_text(*load(args.model), args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "viz": _viz, "audit": _audit, "evaluate": _evaluate, "generate": _generate,
}
"""``maskattn COMMAND MODEL ...`` when MODEL is an HF directory (:func:`is_hf_directory`)."""
