"""A training step's forward and backward pass replayed as one CUDA graph.

Stage one's default model is small: on an H200 a step of 128 images keeps the GPU busy for about
1.4 ms, while the host spends about 8 ms launching its 333 kernels (a thousand with the
discriminator). Captured once, the whole forward and backward pass (losses, codebook updates,
augmentation, gradient clipping included) is one replay. The optimizer steps after it, eagerly:
fused AdamW is a few kernels, and its learning rate stays the scheduler's plain float.

What a graph needs, the step provides: no read back to the host (the steps of both stages have
none on CUDA; MaskGIT's has, and is not graphed), state changed in place, and a `key` that names
every choice the step makes in Python (the adversarial phase, the batch's shape): a new key is
warmed up eagerly for a few steps and captured again. Where capture fails, the step runs eagerly
from then on, said once.
"""

import warnings

import torch


class CapturedStep:
    """`step(batch, key)` runs `forward_backward(batch)` (which returns what the training step
    returns, after backward and clipping) as a graph replay once `warmup` steps with that key
    have run eagerly. Graph or not, the gradients are left in the parameters' `.grad` for the
    optimizer; the caller may set them to None after it steps (before a replay they are pointed
    back at the tensors the graph writes)."""

    WARMUP = 3  # eager steps of a new key before it is captured

    def __init__(self, forward_backward, parameters, warmup: int = WARMUP, graph=None, capture=None):
        self.forward_backward, self.warmup = forward_backward, warmup
        self.parameters = [p for p in parameters if p.requires_grad]
        # graph and capture: torch.cuda's, or stand-ins where a test runs on a CPU
        self.new_graph = graph or torch.cuda.CUDAGraph
        self.capture_into = capture or (lambda graph: torch.cuda.graph(graph, capture_error_mode="thread_local"))
        self.key = self.graph = self.inputs = self.outputs = self.grads = self.side_stream = None
        self.eager_steps, self.failed, self.captures = 0, False, 0

    def __call__(self, batch: dict, key):
        key = (key, tuple((name, tuple(value.shape)) for name, value in batch.items() if torch.is_tensor(value)))
        if self.failed:
            return self.forward_backward(batch)
        if key != self.key:
            self._release()
            self.key, self.eager_steps = key, 0
        if self.graph is None:
            if self.eager_steps < self.warmup:
                self.eager_steps += 1
                return self._on_a_side_stream(batch)
            if not self._capture(batch):
                return self.forward_backward(batch)
        for name, value in self.inputs.items():
            value.copy_(batch[name])
        for parameter, grad in zip(self.parameters, self.grads):
            parameter.grad = grad  # an eager step in between may have replaced or dropped them
        self.graph.replay()
        return self.outputs

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

    def _capture(self, batch) -> bool:
        self.inputs = {name: value.clone() for name, value in batch.items() if torch.is_tensor(value)}
        static_batch = {**batch, **self.inputs}
        for parameter in self.parameters:
            parameter.grad = None  # the captured backward then writes fresh gradients at every replay
        graph = self.new_graph()
        try:
            with self.capture_into(graph):
                self.outputs = self.forward_backward(static_batch)
        except RuntimeError as error:
            self.failed = True
            self._release()
            warnings.warn(f"the training step could not be captured as a CUDA graph ({str(error).splitlines()[0]}); "
                          "it runs without one, the same step more slowly", stacklevel=3)
            return False
        self.graph, self.grads, self.captures = graph, [p.grad for p in self.parameters], self.captures + 1
        return True

    def _release(self) -> None:
        """Drop the graph and the gradients it owns, before another is captured."""
        if self.grads is not None:
            for parameter in self.parameters:
                parameter.grad = None
        self.graph = self.inputs = self.outputs = self.grads = None
