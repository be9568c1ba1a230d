"""A dispatch mode that fails on anything that would make the host wait for the device.

Used as `with forbid_host_sync(): ...` around code that must stay on the device: it
raises on `.item()`-style reads, `nonzero`, `is_nonzero` (a Python branch on a tensor)
and device-to-host copies. On the CPU there is no device to wait for, but the same ops
are what would synchronise on a GPU, so the check is meaningful on both.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_FORBIDDEN = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
}


class HostSyncError(RuntimeError):
    pass


def _is_device_to_host(func, args, kwargs) -> bool:
    if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.device):
        src = args[0]
        dst = kwargs.get("device")
        return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    if func is torch.ops.aten.copy_.default:
        dst, src = args[0], args[1]
        return src.device.type != "cpu" and dst.device.type == "cpu"
    return False


class forbid_host_sync(TorchDispatchMode):
    """Raise HostSyncError on the first op that would synchronise with the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        overload = getattr(func, "overloadpacket", None)
        if func in _FORBIDDEN or overload in (torch.ops.aten.nonzero,):
            raise HostSyncError(f"host synchronisation: {func}")
        if _is_device_to_host(func, args, kwargs):
            raise HostSyncError(f"device-to-host copy: {func}")
        return func(*args, **kwargs)
