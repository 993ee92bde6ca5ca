"""The bookkeeping of a captured training step, on a CPU: when it warms up, captures, replays,
captures again and gives up. Stand-ins take the place of torch.cuda's graph: "capturing" runs
the step once, and a replay runs it again on the captured inputs. That the graph computes what
the eager step does is tested on CUDA (test_cuda.py)."""

from contextlib import nullcontext

import pytest
import torch

from foundation.captured_step import CapturedStep


class RerunGraph:
    """Replays by running the step again on the captured inputs, into the same gradients."""

    def __init__(self):
        self.step = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        for parameter in self.step.parameters:
            parameter.grad.zero_()  # a captured backward writes its gradients; it does not add to them
        self.step.forward_backward({**self.step.inputs})


def make_step(warmup=2, fail_capture=False):
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    calls = []

    def forward_backward(batch):
        calls.append(batch["x"].clone())
        loss = (weight * batch["x"]).sum()
        loss.backward()
        return loss, {"loss": loss.detach()}, len(batch["x"])

    graphs = []

    def new_graph():
        graphs.append(RerunGraph())
        return graphs[-1]

    def capture(graph):
        if fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        graph.step = step
        return nullcontext()

    step = CapturedStep(forward_backward, [weight], warmup=warmup, graph=new_graph, capture=capture)
    return step, weight, calls, graphs


def test_a_key_is_warmed_up_then_captured_once_and_replayed_on_each_new_batch():
    step, weight, calls, graphs = make_step(warmup=2)
    for i in range(5):
        weight.grad = None  # as the training loop's zero_grad(set_to_none=True) leaves it
        step({"x": torch.tensor([float(i), 1.0])}, key="phase a")
        assert torch.equal(weight.grad, torch.tensor([float(i), 1.0])), i  # each step's own gradient, never a sum
    assert step.captures == 1 and len(graphs) == 1 and graphs[0].replays == 3  # steps 0, 1 eager; captured at 2; 2-4 replayed
    assert torch.equal(step.inputs["x"], torch.tensor([4.0, 1.0]))  # the newest batch was copied into the captured input


def test_a_new_key_or_batch_shape_is_warmed_up_and_captured_again():
    step, weight, calls, graphs = make_step(warmup=1)
    for key in ("a", "a", "b", "b"):
        weight.grad = None
        step({"x": torch.ones(2)}, key=key)
    assert step.captures == 2 and step.key[0] == "b"
    step({"x": torch.ones(1, 2)}, key="b")  # the same phase, another batch shape (a last, smaller batch)
    assert step.graph is None and step.eager_steps == 1 and step.captures == 2


def test_a_failed_capture_is_said_once_and_the_step_runs_eagerly_from_then_on():
    step, weight, calls, graphs = make_step(warmup=1, fail_capture=True)
    with pytest.warns(UserWarning, match=r"could not be captured as a CUDA graph \(operation not permitted when stream is capturing\)"):
        for i in range(4):
            weight.grad = None
            loss, metrics, items = step({"x": torch.tensor([float(i), 2.0])}, key="a")
            assert torch.equal(weight.grad, torch.tensor([float(i), 2.0])) and items == 2
    assert step.failed and step.captures == 0 and len(calls) == 4
