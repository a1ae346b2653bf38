"""aeforge/nn/freeze.py: freezing by name, the step schedule, and the errors for unknown names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aeforge.nn.freeze import FreezeSchedule, freeze, frozen_names, unfreeze


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
        self.decoder = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.decoder(self.encoder(x)) * self.scale


def _train(net, steps, schedule=None, lr=1e-2):
    # AdamW with weight decay: a frozen weight must not even decay
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)
    for step in range(steps):
        if schedule is not None:
            schedule.apply(net, step)
        loss = net(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_weights_stay_bit_identical_through_training():
    torch.manual_seed(0)
    net = Net()
    freeze(net, ["encoder.0", "scale"])
    before_enc, before_dec = _snapshot(net.encoder[0]), _snapshot(net.decoder)
    scale = net.scale.detach().clone()
    _train(net, 5)
    for k, v in net.encoder[0].state_dict().items():
        assert torch.equal(v, before_enc[k]), k
    assert torch.equal(net.scale, scale)
    assert not torch.equal(net.decoder.weight, before_dec["weight"])  # the rest did train
    assert frozen_names(net, ["encoder.0", "encoder.1", "scale"]) == ["encoder.0", "scale"]
    unfreeze(net, ["encoder"])
    assert all(p.requires_grad for p in net.parameters() if p is not net.scale)


def test_schedule_freezes_and_unfreezes_at_its_steps():
    torch.manual_seed(0)
    net = Net()
    sched = FreezeSchedule(freeze=["decoder"], schedule={2: {"unfreeze": ["decoder"], "freeze": ["encoder"]}})
    assert sched.frozen_at(0) == {"decoder"} and sched.frozen_at(1) == {"decoder"}
    assert sched.frozen_at(2) == {"encoder"} and sched.frozen_at(100) == {"encoder"}
    assert sched.initial_frozen() == []  # the decoder is unfrozen later: it must stay in the optimiser
    dec = _snapshot(net.decoder)
    _train(net, 2, sched)  # steps 0, 1: decoder frozen
    assert all(torch.equal(v, dec[k]) for k, v in net.decoder.state_dict().items())
    enc = _snapshot(net.encoder)
    _train(net, 3, FreezeSchedule(schedule={0: {"freeze": ["encoder"]}}))
    assert all(torch.equal(v, enc[k]) for k, v in net.encoder.state_dict().items())
    assert not net.encoder[0].weight.requires_grad


def test_schedule_unfreezes_only_what_it_froze():
    net = Net()
    net.decoder.requires_grad_(False)  # frozen by someone else (a frozen target), later frozen by the schedule too
    events = {0: {"freeze": ["encoder"]}, 3: {"unfreeze": ["encoder"]}, 5: {"freeze": ["decoder"]}}
    sched = FreezeSchedule(schedule=events)
    sched.apply(net, 0)
    assert not net.encoder[0].weight.requires_grad and not net.decoder.weight.requires_grad
    sched.apply(net, 3)
    assert net.encoder[0].weight.requires_grad  # the schedule's own freeze undone
    assert not net.decoder.weight.requires_grad  # not the schedule's to undo


def test_unknown_name_lists_valid_names():
    net = Net()
    with pytest.raises(ValueError, match=r"unknown module name 'global_encoder'.*valid names: \[encoder, "
                                         r"encoder.0, encoder.1, decoder.*scale"):
        freeze(net, ["global_encoder"])
    with pytest.raises(ValueError, match="model.freeze: unknown module name 'nope'"):
        FreezeSchedule(schedule={5: {"freeze": ["nope"]}}).check(net)
    with pytest.raises(ValueError, match="expected a mapping with keys freeze and/or unfreeze"):
        FreezeSchedule(schedule={5: {"frezee": ["encoder"]}})
    with pytest.raises(ValueError, match="not an integer"):
        FreezeSchedule(schedule={"soon": {"freeze": ["encoder"]}})
