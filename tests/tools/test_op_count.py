"""DeviceOpCounter: computing ops counted by name, views and paused stretches not."""

from __future__ import annotations

import torch

from tools.op_count import DeviceOpCounter


def test_counts_computing_ops_by_name_but_not_views_or_paused_ones():
    x = torch.randn(4, 5)
    with DeviceOpCounter() as counter:
        y = (x * 2).sum(dim=0)          # mul, sum
        x.view(20)[:3].t()              # views only
        with counter.paused():
            torch.exp(y)
        torch.exp(y)
    assert counter.ops == {"mul": 1, "sum": 1, "exp": 1}
    assert counter.total == 3
