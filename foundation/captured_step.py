"""A training step's forward and backward pass replayed as one CUDA graph.

Stage one's default model is small: on an H200 a step of 128 images keeps the GPU busy for about
1.4 ms, while the host spends about 8 ms launching its 333 kernels (a thousand with the
discriminator). Captured once, the whole forward and backward pass (losses, codebook updates,
augmentation, gradient clipping included) is one replay. The optimizer steps after it, eagerly:
fused AdamW is a few kernels, and its learning rate stays the scheduler's plain float.

What a graph needs, the step provides: no read back to the host (the steps of both stages have
none on CUDA; MaskGIT's has, and is not graphed), state changed in place, and a `key` that names
every choice the step makes in Python (the adversarial phase, whether R1 is due, the batch's
shape). Each key gets a graph of its own, captured after a few eager steps with that key and kept
(a few at most): keys that take turns, as R1's every fourth step does with the others, are each
replayed. Where capture fails, the step runs eagerly from then on, said once.
"""

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Graph:
    """One key's captured step: the graph, the tensors it reads the batch from, what it returns,
    and the gradients its backward writes."""
    graph: object
    inputs: dict
    outputs: tuple
    grads: list


class CapturedStep:
    """`step(batch, key)` runs `forward_backward(batch)` (which returns what the training step
    returns, after backward and clipping) as a replay of that key's graph once `eager_steps` steps with
    the key have run eagerly. Graph or not, the gradients are left in the parameters' `.grad` for
    the optimizer; the caller may set them to None after it steps (before a replay they are
    pointed back at the tensors that graph writes)."""

    EAGER_STEPS_BEFORE_CAPTURE = 3  # eager steps of a new key before it is captured
    MOST_GRAPHS = 4  # keys kept captured; the least recently replayed goes first

    def __init__(self, forward_backward, parameters, eager_steps: int = EAGER_STEPS_BEFORE_CAPTURE, graph=None, capture=None):
        self.forward_backward, self.eager_steps = forward_backward, eager_steps
        self.parameters = [p for p in parameters if p.requires_grad]
        # graph and capture: torch.cuda's, or stand-ins where a test runs on a CPU
        self.new_graph = graph or torch.cuda.CUDAGraph
        self.capture_into = capture or (lambda graph: torch.cuda.graph(graph, capture_error_mode="thread_local"))
        self.graphs: OrderedDict = OrderedDict()
        self.warmed: dict = {}  # key -> eager steps run with it so far
        self.side_stream = None
        self.failed, self.captures, self.replays, self.steps = False, 0, 0, 0

    def __call__(self, batch: dict, key):
        self.steps += 1
        key = (key, tuple((name, tuple(value.shape)) for name, value in batch.items() if torch.is_tensor(value)))
        if self.failed:
            return self.forward_backward(batch)
        captured = self.graphs.get(key)
        if captured is None:
            if self.warmed.get(key, 0) < self.eager_steps:
                self.warmed[key] = self.warmed.get(key, 0) + 1
                return self._on_a_side_stream(batch)
            captured = self._capture(key, batch)
            if captured is None:
                return self.forward_backward(batch)
        self.graphs.move_to_end(key)
        for name, value in captured.inputs.items():
            value.copy_(batch[name])
        for parameter, grad in zip(self.parameters, captured.grads):
            parameter.grad = grad  # an eager step or another key's replay in between replaced or dropped them
        captured.graph.replay()
        self.replays += 1
        return captured.outputs

    def _on_a_side_stream(self, batch):
        """Warm-up steps run on a side stream, as PyTorch asks before a capture."""
        if not any(torch.is_tensor(value) and value.is_cuda for value in batch.values()):
            return self.forward_backward(batch)
        if self.side_stream is None:  # one for every warm-up step: each step's gradient nodes belong to one stream
            self.side_stream = torch.cuda.Stream()
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            outputs = self.forward_backward(batch)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return outputs

    def _capture(self, key, batch) -> Graph | None:
        while len(self.graphs) >= self.MOST_GRAPHS:
            self.graphs.popitem(last=False)  # its memory goes with it
        inputs = {name: value.clone() for name, value in batch.items() if torch.is_tensor(value)}
        for parameter in self.parameters:
            parameter.grad = None  # the captured backward then writes gradients of its own at every replay
        graph = self.new_graph()
        try:
            with self.capture_into(graph):
                outputs = self.forward_backward({**batch, **inputs})
        except RuntimeError as error:
            self.failed = True
            self.graphs.clear()
            for parameter in self.parameters:
                parameter.grad = None
            warnings.warn(f"the training step could not be captured as a CUDA graph ({str(error).splitlines()[0]}); "
                          "it runs without one, the same step more slowly", stacklevel=3)
            return None
        self.graphs[key] = captured = Graph(graph, inputs, outputs, [p.grad for p in self.parameters])
        self.captures += 1
        return captured
