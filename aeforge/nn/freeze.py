"""Freeze and unfreeze a model's submodules by name, once or on a step schedule (training stages as config).

A name is a dotted path as `model.named_modules()` / `named_parameters()` spell it (`global_encoder`,
`decoder.blocks.0`, `queries`); an unknown name is an error listing the valid ones. Freezing sets
`requires_grad=False` and drops any stale gradient, so the optimiser (AdamW skips parameters without a
gradient, weight decay included) leaves those weights bit-identical; buffers and train/eval mode are not
touched (a frozen block with dropout still drops out; wrap it in `nn/frozen.FrozenModule` for eval mode).

Stages: `FreezeSchedule(freeze=[...], schedule={step: {"freeze": [...], "unfreeze": [...]}})` is a pure
function from the optimiser step to the set of frozen names. A model holds one and calls
`schedule.apply(self, step)` from its `on_train_step_end(step, total)` hook (the state for the next update)
and at the top of a training `forward` with `batch["progress"].step` (so a resumed run starts in the right
stage: `requires_grad` is not in a checkpoint). Why not freeze everything at construction: `AEModule` builds
its optimiser from the parameters that require grad at that moment, so a module frozen then and unfrozen by
the schedule later would never be trained. `initial_frozen()` is what may be frozen at construction: the
names the schedule never unfreezes (their optimiser state is then never allocated).

Under DDP, changing `requires_grad` mid-run needs `find_unused_parameters=True` (DDP registers its hooks at
wrap time)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

_LISTED = 40  # names shown in an error (a deep model has thousands)


def valid_names(model: nn.Module, max_depth: int = 2) -> list[str]:
    """Module and parameter names up to `max_depth` dots, for error messages and docs."""
    names = [n for n, _ in model.named_modules() if n and n.count(".") < max_depth]
    names += [n for n, _ in model.named_parameters() if n.count(".") < max_depth and n not in names]
    return names


def _parameters(model: nn.Module, name: str, where: str) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    if name and name in modules:
        return list(modules[name].parameters())
    params = dict(model.named_parameters())
    if name in params:
        return [params[name]]
    names = valid_names(model)
    shown = ", ".join(names[:_LISTED]) + (f", … ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")
    raise ValueError(f"{where}: unknown module name {name!r} in {type(model).__name__}; valid names: [{shown}] "
                     f"(any deeper dotted path of model.named_modules() works too)")


def set_trainable(model: nn.Module, names: Iterable[str], trainable: bool, where: str = "freeze") -> None:
    """`requires_grad=trainable` for every parameter under each name; freezing also drops stale gradients."""
    for name in names:
        for p in _parameters(model, str(name), where):
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None


def freeze(model: nn.Module, names: Iterable[str]) -> None:
    set_trainable(model, names, False, "freeze")


def unfreeze(model: nn.Module, names: Iterable[str]) -> None:
    set_trainable(model, names, True, "unfreeze")


def frozen_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Of `names`, those whose parameters all have requires_grad=False (for logs and tests)."""
    return [n for n in names if not any(p.requires_grad for p in _parameters(model, n, "frozen_names"))]


class FreezeSchedule:
    """`freeze`: names frozen from step 0; `schedule`: {step: {"freeze": [...], "unfreeze": [...]}}, applied
    once `step` optimiser updates are done (later steps win; within a step, unfreeze after freeze)."""

    def __init__(self, freeze: Iterable[str] = (), schedule: Mapping | None = None):
        self.freeze = [str(n) for n in freeze or ()]
        events: dict[int, tuple[list[str], list[str]]] = {}
        for step, event in (schedule or {}).items():
            try:
                step = int(step)
            except (TypeError, ValueError):
                raise ValueError(f"freeze_schedule: step {step!r} is not an integer") from None
            if step < 0:
                raise ValueError(f"freeze_schedule: step {step} must be >= 0")
            if not isinstance(event, Mapping) or set(event) - {"freeze", "unfreeze"}:
                raise ValueError(f"freeze_schedule[{step}]={event!r}: expected a mapping with keys freeze and/or "
                                 f"unfreeze (lists of module names)")
            events[step] = ([str(n) for n in event.get("freeze") or ()], [str(n) for n in event.get("unfreeze") or ()])
        self.events = dict(sorted(events.items()))
        self._applied: frozenset[str] | None = None

    def names(self) -> list[str]:
        """Every name the schedule ever touches."""
        out = list(self.freeze)
        for f, u in self.events.values():
            out += [n for n in f + u if n not in out]
        return out

    def check(self, model: nn.Module, where: str = "model.freeze") -> None:
        """Raise ValueError naming an unknown module name and the valid ones (call at construction)."""
        for name in self.names():
            _parameters(model, name, where)

    def frozen_at(self, step: int) -> frozenset[str]:
        """The names frozen while update number `step` + 1 is computed (after `step` updates)."""
        frozen = set(self.freeze)
        for at, (f, u) in self.events.items():
            if at > step:
                break
            frozen |= set(f)
            frozen -= set(u)
        return frozenset(frozen)

    def initial_frozen(self) -> list[str]:
        """Names frozen at step 0 that no event unfreezes: safe to freeze at construction."""
        unfrozen = {n for _, u in self.events.values() for n in u}
        return [n for n in self.frozen_at(0) if n not in unfrozen]

    def apply(self, model: nn.Module, step: int) -> None:
        """Set the trainable state for the update after `step` updates. Idempotent; cheap when unchanged."""
        frozen = self.frozen_at(step)
        if frozen == self._applied:
            return
        # unfreeze only what this schedule froze before: a frozen target inside an unfrozen block stays frozen
        set_trainable(model, sorted((self._applied or frozenset()) - frozen), True, "unfreeze")
        set_trainable(model, sorted(frozen), False, "freeze")  # after: a frozen child of an unfrozen parent wins
        self._applied = frozen

    def __bool__(self) -> bool:
        return bool(self.freeze or self.events)
