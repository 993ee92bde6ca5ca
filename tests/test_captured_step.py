"""The bookkeeping of a captured training step, on a CPU: when it warms up, captures, replays,
captures again and gives up. Stand-ins take the place of torch.cuda's graph: "capturing" runs
the step once, and a replay runs it again on the captured inputs. That the graph computes what
the eager step does is tested on CUDA (test_cuda.py)."""

import warnings
from contextlib import nullcontext

import pytest
import torch

from foundation.captured_step import CapturedStep


class RerunGraph:
    """Replays by running the step again on its captured inputs, into the same gradients, with
    the Python choices (`phase`) frozen as they were at capture, as a CUDA graph's are."""

    def __init__(self, step, phase):
        self.step, self.phase = step, phase
        self.frozen = self.replays = 0

    def replay(self):
        self.replays += 1
        inputs = next(kept.inputs for kept in self.step.graphs.values() if kept.graph is self)
        for parameter in self.step.parameters:
            parameter.grad.zero_()  # a captured backward writes its gradients; it does not add to them
        now, self.phase["r1"] = self.phase["r1"], self.frozen
        self.step.forward_backward(inputs)
        self.phase["r1"] = now


def make_step(eager_steps=2, fail_capture=False):
    """A step whose loss depends on a choice made in Python (`phase["r1"]`), as R1's penalty does."""
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    calls, phase, graphs = [], {"r1": False}, []

    def forward_backward(batch):
        calls.append(batch["x"].clone())
        loss = ((3.0 if phase["r1"] else 1.0) * weight * batch["x"]).sum()
        loss.backward()
        return loss, {"loss": loss.detach()}, len(batch["x"])

    def new_graph():
        graphs.append(RerunGraph(step, phase))
        return graphs[-1]

    def capture(graph):
        if fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        graph.frozen = phase["r1"]
        return nullcontext()

    step = CapturedStep(forward_backward, [weight], eager_steps=eager_steps, graph=new_graph, capture=capture)
    return step, weight, calls, graphs, phase


def test_a_key_is_warmed_up_then_captured_once_and_replayed_on_each_new_batch():
    step, weight, calls, graphs, _ = make_step(eager_steps=2)
    for i in range(5):
        weight.grad = None  # as the training loop's zero_grad(set_to_none=True) leaves it
        step({"x": torch.tensor([float(i), 1.0])}, key="phase a")
        assert torch.equal(weight.grad, torch.tensor([float(i), 1.0])), i  # each step's own gradient, never a sum
    assert step.captures == 1 and len(graphs) == 1 and graphs[0].replays == 3  # steps 0, 1 eager; captured at 2; 2-4 replayed
    (kept,) = step.graphs.values()
    assert torch.equal(kept.inputs["x"], torch.tensor([4.0, 1.0]))  # the newest batch was copied into the captured input


def test_a_new_key_or_batch_shape_is_warmed_up_and_captured_again():
    step, weight, calls, graphs, _ = make_step(eager_steps=1)
    for key in ("a", "a", "b", "b"):
        weight.grad = None
        step({"x": torch.ones(2)}, key=key)
    assert step.captures == 2 and [key for key, _ in step.graphs] == ["a", "b"]
    step({"x": torch.ones(1, 2)}, key="b")  # the same phase, another batch shape (a last, smaller batch)
    assert step.replays == 2 and step.captures == 2  # warming up a third key: run eagerly


def test_a_failed_capture_is_said_once_and_the_step_runs_eagerly_from_then_on():
    step, weight, calls, graphs, _ = make_step(eager_steps=1, fail_capture=True)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # every warning recorded, so that a second one would be seen
        for i in range(4):
            weight.grad = None
            loss, metrics, items = step({"x": torch.tensor([float(i), 2.0])}, key="a" if i < 2 else "b")
            assert torch.equal(weight.grad, torch.tensor([float(i), 2.0])) and items == 2
    assert len(said) == 1 and "could not be captured as a CUDA graph (operation not permitted when stream is capturing)" in str(said[0].message)
    assert step.failed and step.captures == 0 and len(calls) == 4


def test_keys_taking_turns_faster_than_the_warm_up_each_get_a_graph_replaying_their_own_choice():
    """R1 every fourth step: three steps of one key, one of another. One graph at a time never
    reached the warm-up (or recaptured every fourth step, slower than eager)."""
    step, weight, calls, graphs, phase = make_step(eager_steps=3)
    for i in range(40):
        phase["r1"] = i % 4 == 3
        weight.grad = None
        x = torch.tensor([float(i), 1.0])
        step({"x": x}, key=("phase", phase["r1"]))
        assert torch.equal(weight.grad, (3.0 if phase["r1"] else 1.0) * x), i  # each step's own choice, graph or not
    assert step.captures == 2 and step.replays == 40 - 2 * 3  # all but each key's warm-up steps
    assert [graph.replays for graph in graphs] == [27, 7]
