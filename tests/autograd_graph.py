"""The nodes of a tensor's autograd graph, for tests that check which backward passes a computation records."""

import torch


def graph_nodes(t: torch.Tensor) -> set:
    """Every node reachable from ``t.grad_fn`` (empty without one)."""
    seen: set = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return seen
