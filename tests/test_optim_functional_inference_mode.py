"""The functional block-mean AdaGrad step under torch.inference_mode(): it steps as outside (its buffers made
outside inference mode), and state made inside it is refused in words before anything changes (it stopped on
torch's "Inference tensors do not track version counter" after h and the step count had changed)."""

import pytest
import torch

from bma_gp.optim.functional import Workspace, block_mean_adagrad
from bma_gp.optim.param_blocks import ParamBlocks

RULES = {"tensor": "tensor", "row": "row", "callable": lambda p: torch.arange(p.numel()) % 3}
KW = dict(weight_decay=[0.0, 0.0], maximize=[False, False], eps=1e-10, damping=0.1, update_interval=2, mask=True)


def _problem(rule):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(40, 30, generator=gen), torch.randn(50, generator=gen)]
    blocks = ParamBlocks.build(params, RULES[rule])
    d, k = blocks.bounds[-1], blocks.num_blocks
    state = (torch.zeros(d), {"U": torch.zeros(k, k), "w": torch.zeros(k), "step": 0})
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
    return params, blocks, state, grads


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("workspace", ["outside", "inside", "none"])
def test_steps_under_inference_mode_match_steps_outside(rule, workspace):
    params, blocks, (h, stats), grads = _problem(rule)
    ref, h_ref = [p.clone() for p in params], h.clone()
    stats_ref = {"U": stats["U"].clone(), "w": stats["w"].clone(), "step": 0}
    ws_ref = Workspace.build(blocks, h_ref)
    ws = Workspace.build(blocks, h) if workspace == "outside" else None
    for g in grads:
        with torch.inference_mode():
            if workspace == "inside" and ws is None:
                ws = Workspace.build(blocks, h)
            block_mean_adagrad(params, g, h, stats, blocks, ws, lr=[0.1, 0.1], check_finite=True, fused=False, **KW)
        block_mean_adagrad(
            ref, g, h_ref, stats_ref, blocks, ws_ref, lr=[0.1, 0.1], check_finite=True, fused=False, **KW
        )
    assert stats["step"] == 3
    for a, b in zip(params, ref):
        assert not a.is_inference() and torch.equal(a, b)
    assert torch.equal(h, h_ref) and torch.equal(stats["U"], stats_ref["U"])


@pytest.mark.parametrize("made_inside", ["state_sum", "U", "params"])
def test_state_made_under_inference_mode_is_refused_before_anything_changes(made_inside):
    params, blocks, (h, stats), grads = _problem("tensor")
    if made_inside == "state_sum":
        with torch.inference_mode():
            h = torch.zeros_like(h)
    elif made_inside == "U":
        with torch.inference_mode():
            stats["U"] = torch.zeros_like(stats["U"])
    else:
        with torch.inference_mode():
            params = [p.clone() for p in params]
    before = [p.clone() for p in params], h.clone(), stats["U"].clone()
    name = {"state_sum": "state_sum", "U": 'stats\\["U"\\]', "params": r"params\[0\]"}[made_inside]
    with pytest.raises(ValueError, match=f"{name} is an inference tensor .*outside torch.inference_mode"):
        block_mean_adagrad(
            params, grads[0], h, stats, blocks, None, lr=[0.1, 0.1], check_finite=True, fused=False, **KW
        )
    assert stats["step"] == 0 and torch.equal(h, before[1]) and torch.equal(stats["U"], before[2])
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
