"""Trainable LoRA factors and head on the frozen backbone, through the serving math.

Training runs the same LoraLinear wrappers and segmented kernel the engine serves with
(one segment spanning the whole batch), so a trained adapter scores identically when served.
"""

import math

import torch
from torch import nn

from engine import Backbone, LoraStepPlan
from engine.lora_kernels import SegmentLoop
from training.config import TrainConfig
from training.loop import predict_labels, run_epochs
from training.progress import OnEvent
from training.recipe import Fitted, Split, detached_copy, mean_pool, round_for_storage


class TrainableLora(nn.Module):
    """LoRA A and B^T for each targeted module, laid out as a one-adapter page pool."""

    def __init__(
        self,
        backbone: Backbone,
        targets: list[str],
        rank: int,
        alpha: float,
        num_labels: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.targets = targets
        self.rank = rank
        self.scale = alpha / rank
        self.a = nn.ParameterList()
        self.b_t = nn.ParameterList()
        for name in targets:
            wrapper = backbone.linears[name]
            a = torch.empty(rank, wrapper.in_features)
            bound = 1.0 / math.sqrt(wrapper.in_features)
            a.uniform_(-bound, bound, generator=generator)
            self.a.append(nn.Parameter(a))
            self.b_t.append(nn.Parameter(torch.zeros(rank, wrapper.out_features)))
        self.head = nn.Linear(backbone.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02, generator=generator)
        nn.init.zeros_(self.head.bias)

    def plan(self, num_rows: int) -> LoraStepPlan:
        names = self.backbone.linear_names
        num_modules = len(names)
        ranks = torch.zeros((num_modules, 1), dtype=torch.int32)
        scales = torch.zeros((num_modules, 1), dtype=torch.float32)
        pools: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_modules
        for i, name in enumerate(self.targets):
            index = self.backbone.linears[name].index
            ranks[index, 0] = self.rank
            scales[index, 0] = self.scale
            pools[index] = (self.a[i], self.b_t[i])
        return LoraStepPlan(
            num_rows=num_rows,
            seg_row_starts=torch.tensor([0, num_rows], dtype=torch.int32),
            seg_pages=torch.arange(self.rank, dtype=torch.int32).unsqueeze(0),
            seg_rank=ranks,
            seg_scale=scales,
            module_active=tuple(bool(r) for r in ranks[:, 0].tolist()),
            pools=tuple(pools),
            kernel=SegmentLoop(),
        )

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from mean-pooled last hidden states."""
        state = self.backbone.lora_state
        state.plan = self.plan(input_ids.shape[0])
        try:
            hidden = self.backbone.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        finally:
            state.plan = None
        return self.head(mean_pool(hidden, mask))

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A [r, in], B [out, r]) in PEFT's orientation."""
        return {
            n: (a.detach(), b_t.detach().t())
            for n, a, b_t in zip(self.targets, self.a, self.b_t, strict=True)
        }


def select_targets(backbone: Backbone, suffixes: tuple[str, ...]) -> list[str]:
    """Linear names matching any suffix (by default every one), never the pooler's: graft's
    heads read mean-pooled states, so factors there would take pool pages and do nothing."""
    names = [n for n in backbone.linear_names if not n.startswith("pooler")]
    if not names:  # SqueezeBERT's layers are Conv1d: "lora" would register a bare head
        raise ValueError(
            f"{backbone.name} has no Linear layer for LoRA to target (its layers are other "
            "modules); train its head alone (mode head)"
        )
    if not suffixes:
        return names

    def matches(name: str, suffix: str) -> bool:
        return name == suffix or name.endswith("." + suffix)

    # each suffix must name something: a misspelt one would train fewer modules than asked
    unmatched = [s for s in suffixes if not any(matches(n, s) for n in names)]
    if unmatched:
        raise ValueError(
            f"no linear layer of the backbone matches target {unmatched[0]!r} "
            f"(of {list(suffixes)}); its linears end in {_last_parts(names)}"
        )
    return [n for n in names if any(matches(n, s) for s in suffixes)]


def _last_parts(names: list[str]) -> str:
    """The distinct final names of the backbone's linears, for a message: query, key..."""
    return ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def fit_lora(
    backbone: Backbone,
    split: Split,
    config: TrainConfig,
    progress: bool,
    on_event: OnEvent | None = None,
) -> Fitted:
    """LoRA factors on the targeted linears plus the head; the backbone's weights stay frozen."""
    generator = torch.Generator().manual_seed(config.seed)
    targets = select_targets(backbone, config.targets)
    model = TrainableLora(
        backbone, targets, config.rank, config.alpha, len(split.labels), generator
    )
    epochs_run = run_epochs(
        model,
        [
            {"params": list(model.a) + list(model.b_t), "lr": config.lora_lr},
            {"params": list(model.head.parameters()), "lr": config.head_lr},
        ],
        backbone,
        split,
        config,
        snapshot=lambda: detached_copy(model.state_dict()),
        progress=progress,
        desc="lora",
        on_event=on_event,
    )
    round_for_storage([*model.a, *model.b_t, *model.head.parameters()], config)
    # held out at the length the engine serves, so the metrics are the served model's
    predictions = predict_labels(
        model, backbone, split.held_out, split.labels, config.eval_length(backbone.max_tokens)
    )
    return Fitted(model.head, predictions, epochs_run, factors=model.lora_factors())
