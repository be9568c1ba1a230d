"""The guard itself must catch what it claims to, or the no-sync tests prove nothing."""

import pytest
import torch
from sync_guard import HostSyncError, forbid_host_sync


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x.sum().item(),
        lambda x: x.nonzero(),
        lambda x: bool(x.sum() > 0),
        lambda x: float(x.max()),
    ],
)
def test_guard_catches_host_syncs(fn):
    x = torch.randn(7)
    with pytest.raises(HostSyncError), forbid_host_sync():
        fn(x)


def test_guard_lets_device_work_through():
    x = torch.randn(7)
    with forbid_host_sync():
        y = torch.where(x > 0, x, torch.zeros_like(x)).cumsum(0)
    assert y.shape == (7,)
