"""The mixed-batch benchmark's contenders: graft, the bare base model, PEFT and merged models.

Split out of ``benchmarks.mixed_batch`` so that building the models sits apart from timing and
reporting them: a ``Scenario`` names the rows every method runs, ``write_adapters`` makes the
random PEFT adapters they use, and ``Contenders`` loads each way of running them and turns a
scenario's ``Workload`` into one no-argument step per method.
"""

from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHODS = ("base", "graft-loop", "graft-gather", "graft-auto", "peft", "merged")
UNIFORM_RANKS = "r8"
MIXED_RANKS = "r4-64"
MIXED_RANK_CYCLE = (64, 4, 16, 8, 32)
TARGETS = ("query", "key", "value", "dense")  # every encoder Linear, and the pooler's dense
LORA_ALPHA = 16.0
LABELS = ("neg", "pos")

Step = Callable[[], np.ndarray | None]  # one batch through one method: probabilities or None


@dataclass(frozen=True, slots=True)
class Scenario:
    """One measured configuration: every method runs the same rows."""

    batch: int  # rows per step
    seq_tokens: int  # every row truncated or padded to this many tokens
    num_adapters: int  # distinct adapters among the rows
    ranks: str  # UNIFORM_RANKS (all rank 8) or MIXED_RANKS (MIXED_RANK_CYCLE over adapters)

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq_tokens} N={self.num_adapters} {self.ranks}"

    def adapter_ranks(self) -> dict[str, int]:
        """Name -> rank of its adapters: the first N of the rank-8 set or of the mixed set."""
        if self.ranks == UNIFORM_RANKS:
            return {f"r8_{i}": 8 for i in range(self.num_adapters)}
        cycle = MIXED_RANK_CYCLE
        return {f"mix_{i}": cycle[i % len(cycle)] for i in range(self.num_adapters)}


@dataclass(frozen=True, slots=True)
class Workload:
    """The rows of one scenario, in the order every method sees them (grouped by adapter)."""

    token_ids: list[list[int]]  # per row, special tokens included, at most seq_tokens
    input_ids: torch.Tensor  # int64 [B, T] on the device, padded with the pad id
    attention_mask: torch.Tensor  # int64 [B, T], 0 on padding
    row_adapters: tuple[str, ...]  # adapter name of each row
    seg_starts: tuple[int, ...]  # S + 1 row offsets of the adapter groups
    seq_tokens: int  # T


def write_adapters(backbone: Any, root: Path, ranks: dict[str, int]) -> dict[str, Path]:
    """Random PEFT SEQ_CLS adapters (LoRA on TARGETS, a 2-class head), one directory each."""
    from engine import write_peft_adapter

    gen = torch.Generator().manual_seed(0)
    targets = [n for n in backbone.linear_names if n.rsplit(".", 1)[-1] in TARGETS]
    dirs = {}
    for name, rank in ranks.items():
        modules = {}
        for target in targets:
            linear = backbone.linears[target]
            a = torch.randn(rank, linear.in_features, generator=gen) * 0.05
            b = torch.randn(linear.out_features, rank, generator=gen) * 0.05
            modules[target] = (a, b)
        head = torch.randn(len(LABELS), backbone.hidden_size, generator=gen)
        dirs[name] = root / name
        write_peft_adapter(
            dirs[name],
            backbone,
            modules,
            rank=rank,
            alpha=LORA_ALPHA,
            head_weight=head * 2 / backbone.hidden_size**0.5,  # logits of order 1
            head_bias=torch.randn(len(LABELS), generator=gen) * 0.1,
        )
    return dirs


class Contenders:
    """The four ways to run a mixed batch over one set of adapters; each loaded on first use.

    Each model is its own copy: graft's wrapped backbone, a clean ``AutoModel``, a PEFT model,
    and a template the merged copies are made from.
    """

    def __init__(
        self, backbone: Any, adapters: dict[str, tuple[Path, int]], device: str, dtype: torch.dtype
    ) -> None:
        self._backbone = backbone
        self._adapters = adapters  # name -> (PEFT directory, rank)
        self._device, self._dtype = device, dtype
        self._memory: Any = None
        self._base: Any = None
        self._peft: Any = None
        self._merge_template: Any = None
        self._merged: dict[str, Any] = {}

    @classmethod
    def build(
        cls, model_dir: Path, adapter_root: Path, plan: Sequence[Scenario], device: str, dtype: Any
    ) -> "Contenders":
        from engine import load_backbone

        backbone = load_backbone(model_dir, device=device, dtype=dtype)
        ranks = {name: r for scenario in plan for name, r in scenario.adapter_ranks().items()}
        dirs = write_adapters(backbone, adapter_root, ranks)
        return cls(backbone, {name: (dirs[name], ranks[name]) for name in ranks}, device, dtype)

    def describe(self) -> str:
        config = self._backbone.model.config
        names = self._backbone.linear_names
        targeted = sum(n.rsplit(".", 1)[-1] in TARGETS for n in names)
        dtype = str(self._dtype).removeprefix("torch.")
        return (
            f"{config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} "
            f"layers, LoRA on {targeted} of {len(names)} Linears, {dtype}"
        )

    def workload(self, scenario: Scenario, texts: Sequence[str]) -> Workload:
        """Rows i = texts[i]; adapters dealt round-robin, then rows grouped by adapter, the
        groups ordered by rank as the engine's planner orders segments."""
        ranks = scenario.adapter_ranks()
        names = list(ranks)
        rows = sorted(
            (names[i % len(names)] for i in range(scenario.batch)),
            key=lambda name: (ranks[name], names.index(name)),
        )
        starts = [0] + [i for i in range(1, len(rows)) if rows[i] != rows[i - 1]] + [len(rows)]
        tokenizer = self._backbone.tokenizer
        encoded = tokenizer(
            list(texts[: scenario.batch]), truncation=True, max_length=scenario.seq_tokens
        )["input_ids"]
        ids = torch.full((scenario.batch, scenario.seq_tokens), tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(encoded):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return Workload(
            token_ids=[list(row) for row in encoded],
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            row_adapters=tuple(rows),
            seg_starts=tuple(starts),
            seq_tokens=scenario.seq_tokens,
        )

    def step(self, method: str, work: Workload) -> Step | None:
        """``work`` through ``method`` as a no-argument call; None where it cannot run here."""
        if method == "base":
            return self._base_step(work)
        if method.startswith("graft-"):
            return self._graft_step(method.removeprefix("graft-"), work)
        if method == "peft":
            return self._peft_step(work)
        if method == "merged":
            return self._merged_step(work)
        raise ValueError(f"unknown method {method!r}")

    def _base_step(self, work: Workload) -> Step:
        from transformers import AutoModel

        if self._base is None:
            self._base = self._load(AutoModel)

        def step() -> None:
            with torch.inference_mode():
                self._base(input_ids=work.input_ids, attention_mask=work.attention_mask)

        return step

    def _graft_step(self, kernel: str, work: Workload) -> Step | None:
        from engine.lora_kernels import kernel_for
        from engine.runner import ModelRunner
        from scheduler import Batch, Row

        try:
            lora_kernel = kernel_for(kernel, self._device)
        except ImportError as exc:  # the Triton path, where it is not there yet
            print(f"  graft-{kernel}: skipped ({exc})")
            return None
        runner = ModelRunner(self._backbone, self._graft_memory(), self._device, lora_kernel)
        keys = [f"bench/{name}@1" for name in work.row_adapters]
        rows = tuple(
            Row(i, 0, "bench", key, len(work.token_ids[i]), 0.0) for i, key in enumerate(keys)
        )
        seg_adapter = tuple(keys[lo] for lo in work.seg_starts[:-1])
        batch = Batch(rows, work.seg_starts, seg_adapter, max_tokens=work.seq_tokens)
        return lambda: np.stack(runner.step(batch, work.token_ids))

    def _graft_memory(self) -> Any:
        """Every adapter resident in one AdapterMemory, as a warm serving engine holds them."""
        from engine import POOLING_CLS_POOLER, parse_adapter
        from engine.memory import AdapterMemory
        from engine.peft_io import CONFIG_FILE, WEIGHTS_FILE

        if self._memory is None:
            num_pages = sum(rank for _, rank in self._adapters.values())
            self._memory = AdapterMemory(self._backbone, num_pages, self._device, self._dtype)
            for name, (path, _) in self._adapters.items():
                config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
                adapter = parse_adapter(
                    config.read_bytes(),
                    weights.read_bytes(),
                    LABELS,
                    POOLING_CLS_POOLER,
                    self._backbone,
                )
                self._memory.acquire(f"bench/{name}@1", lambda a=adapter: a)
        return self._memory

    def _load(self, auto_class: Any, **kwargs: Any) -> Any:
        model = auto_class.from_pretrained(
            str(self._backbone.path), local_files_only=True, dtype=self._dtype, **kwargs
        )
        return model.to(self._device).eval()

    def _peft_step(self, work: Workload) -> Step:
        import peft
        from transformers import AutoModelForSequenceClassification

        if self._peft is None:
            (first, (path, _)), *rest = self._adapters.items()
            classifier = self._load(AutoModelForSequenceClassification, num_labels=len(LABELS))
            model = peft.PeftModel.from_pretrained(classifier, str(path), adapter_name=first)
            for name, (path, _) in rest:
                model.load_adapter(str(path), adapter_name=name)
            self._peft = model.to(self._device).eval()
        names = list(work.row_adapters)

        def step() -> np.ndarray:
            with torch.inference_mode():
                out = self._peft(
                    input_ids=work.input_ids,
                    attention_mask=work.attention_mask,
                    adapter_names=names,
                )
            return _probs(out.logits)

        return step

    def _merged_step(self, work: Workload) -> Step:
        bounds = list(zip(work.seg_starts[:-1], work.seg_starts[1:], strict=True))
        self._keep_merged({work.row_adapters[lo] for lo, _ in bounds})
        groups = [(self._merged[work.row_adapters[lo]], lo, hi) for lo, hi in bounds]

        def step() -> np.ndarray:
            with torch.inference_mode():
                logits = [
                    model(
                        input_ids=work.input_ids[lo:hi], attention_mask=work.attention_mask[lo:hi]
                    ).logits
                    for model, lo, hi in groups
                ]
            return _probs(torch.cat(logits))

        return step

    def _keep_merged(self, names: set[str]) -> None:
        """Hold merged copies for exactly ``names``: N full models is what this baseline costs."""
        import peft
        from transformers import AutoModelForSequenceClassification

        for name in set(self._merged) - names:
            del self._merged[name]
        if self._merge_template is None:
            self._merge_template = self._load(
                AutoModelForSequenceClassification, num_labels=len(LABELS)
            )
        template = self._merge_template
        # the embeddings carry no LoRA: sharing them halves the copies' memory, not their compute
        shared = getattr(template.base_model, "embeddings", None)
        for name in sorted(names - set(self._merged)):
            copy = deepcopy(template, memo={id(shared): shared} if shared is not None else {})
            path = self._adapters[name][0]
            self._merged[name] = peft.PeftModel.from_pretrained(copy, str(path)).merge_and_unload()


def _probs(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()
