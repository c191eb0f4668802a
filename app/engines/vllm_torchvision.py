"""PyPI's torchvision beside a CPU torch, for vLLM's CPU wheels where PyTorch's CPU index cannot be reached.

vLLM's Qwen code imports torchvision (for image helpers it never calls on audio). PyPI's torchvision
is a CUDA build: its C++ ops (``_C.so``) cannot load against a CPU torch, and ``import torchvision``
then fails on registering a fake kernel for ``torchvision::nms``, an op that was never defined.
``scripts/setup.sh --engine vllm`` uses torchvision's CPU build where it can be had; where it cannot,
it installs PyPI's and a ``.pth`` line that calls ``install()`` in every process of that environment
(vLLM inspects models in subprocesses). The ops are then defined without a kernel: torchvision's
Python parts import and work, and calling one of its C++ ops is an error, as it should be.
Stdlib only until torchvision is imported, so it costs nothing at start-up.
"""
from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_libraries: list = []   # torch forgets a library's definitions once the object is collected


class _BeforeMetaRegistrations(importlib.abc.MetaPathFinder):
    """Runs once, just before ``torchvision._meta_registrations`` (its C++ ops have loaded or failed by then)."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            _define_missing_ops()
        return None


def _define_missing_ops() -> None:
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops():  # a build whose C++ ops load: nothing to do
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    _libraries.append(library)


def install() -> None:
    if not any(isinstance(f, _BeforeMetaRegistrations) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMetaRegistrations())
