"""The fx tracer that names every node by its module path (``layer3.1.relu_1``).

It follows torchvision's ``torchvision.models.feature_extraction.NodePathTracer`` naming exactly
(``tests/test_graph_models.py`` compares the two on torchvision models): a leaf module's node is named
by its path; a function or method node by the path of the module it runs in, a dot, and fx's node
name without fx's global ``_N`` suffix; repeated names get ``_1``, ``_2``... counted within the
module. It lives here rather than being imported from torchvision because importing torchvision
costs about 1.4 s (``torchvision.ops`` imports ``torch._dynamo``), which every command on our own
models would pay at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import fx, nn

__all__ = ["PathTracer"]


class PathTracer(fx.Tracer):
    """``fx.Tracer`` recording ``node_to_qualname``: each node's name by module path, in tracing order."""

    def __init__(self) -> None:
        super().__init__()
        self.current_module_qualname = ""
        self.node_to_qualname: dict[fx.Node, str] = {}

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        outer = self.current_module_qualname
        try:
            path = self.path_of_module(m)
            self.current_module_qualname = path
            if not self.is_leaf_module(m, path):
                return forward(*args, **kwargs)
            return self.create_proxy("call_module", path, args, kwargs)
        finally:
            self.current_module_qualname = outer

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        self.node_to_qualname[proxy.node] = self.qualname(proxy.node)
        return proxy

    def qualname(self, node: fx.Node) -> str:
        name = self.current_module_qualname
        if node.op != "call_module":
            name = f"{name}.{node}" if name else str(node)
        if re.match(r".+_[0-9]+$", name):  # fx's suffix counts over the whole graph: drop it
            name = name.rsplit("_", 1)[0]
        for existing in reversed(self.node_to_qualname.values()):  # count within the module instead
            if re.match(rf"{name}(_[0-9]+)?$", existing):
                suffix = existing.replace(name, "")
                name += f"_{int(suffix[1:]) + 1 if suffix else 1}"
                break
        return name
