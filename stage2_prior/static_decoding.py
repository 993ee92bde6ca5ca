"""The transformer prior's raster decoding with shapes that never change, and on CUDA each code
as one replay of a captured CUDA graph (the way gpt-fast and LlamaGen decode).

Drawing one code at a time on a GPU is bound by kernel launches: a step of the default prior is
about a hundred small kernels, about 2 ms whatever the batch. A graph replays the whole step,
the sampling included, as one launch. For that, everything a step reads lives in buffers that
it updates in place (the position, the key/value cache, the next input, the codes), and what
differs between calls (labels, the draws, kept codes, guidance, temperature) is copied into
those buffers before the replays, so one capture serves every later call with the same batch
size and top-k/top-p. Both paths draw the codes of the growing cache for a seed.
"""

import itertools
import threading
import warnings
import weakref
from collections import OrderedDict

import torch

from stage2_prior.sampling import guide, sample_logits

# A few decoders per prior, kept between calls by what they were built for (the capture is the
# slow part; drawing 80 images decodes a batch of 64 then one of 16, and a page alternates draws
# and completions); no reference back to the prior, so that a prior that is dropped frees its
# decoders and graphs. Each holds a KV cache and a graph's memory, hence the bound.
_decoders: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
KEPT_PER_PRIOR = 4
# A decoder's buffers serve one call at a time: two threads (two visitors of the page) replaying
# one graph would write into each other's codes.
_lock = threading.Lock()


class StaticDecoder:
    """Buffers for `batch` rows (`n` samples, doubled for guidance) and one fixed-shape step."""

    def __init__(self, prior, batch: int, n: int, top_k, top_p, guided: bool, device, dtype):
        from stage2_prior.transformer import StaticKVCache  # the model imports this module

        self.batch, self.n, self.top_k, self.top_p, self.guided = batch, n, top_k, top_p, guided
        self.length = prior.map_shape[0] * prior.map_shape[1]
        self.cache = StaticKVCache(prior.num_layers, batch, prior.heads, self.length, prior.width // prior.heads, device, dtype)
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)
        self.uniforms = torch.zeros(self.length, n, 1, device=device)
        self.known = torch.zeros(n, self.length, dtype=torch.long, device=device)
        self.keep = torch.zeros(n, self.length, dtype=torch.bool, device=device)
        self.guidance = torch.ones((), device=device)
        self.temperature = torch.ones((), device=device)
        self.positions = torch.zeros(self.length, prior.width, device=device)
        self.bias = torch.zeros(batch, 1, prior.width, device=device)
        self.tokens = torch.zeros(batch, 1, prior.width, device=device)
        self.codes = torch.zeros(batch, self.length, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False

    def load(self, prior, labels, transforms, uniforms, known, keep, guidance, temperature) -> None:
        """Copy one call's inputs into the buffers and rewind to the first code."""
        self.labels.copy_(labels)
        self.uniforms.copy_(uniforms)
        if keep is None:
            keep, known = torch.zeros_like(self.keep), torch.zeros_like(self.known)
        self.keep.copy_(keep)
        self.known.copy_(known)
        self.guidance.fill_(guidance)
        self.temperature.fill_(temperature)
        self.positions.copy_(prior._positions())
        self.bias.copy_(torch.as_tensor(prior._condition_bias(labels, transforms)).expand_as(self.bias))  # 0.0 for a prior without it
        self.tokens.copy_(prior._first_input(labels, self.positions, self.bias))
        self.codes.zero_()
        self.cache.reset()

    def step(self, prior) -> None:
        """Draw the code at the cache's position, write it, and write the next position's input."""
        position = self.cache.position.clone()
        logits = prior._run(self.tokens, self.cache)[:, -1]  # moves the cache's position on
        sampled = sample_logits(guide(logits, self.guidance, self.guided), self.temperature, self.top_k, self.top_p,
                                uniforms=self.uniforms[position][0])
        sampled = torch.where(self.keep[:, position][:, 0], self.known[:, position][:, 0], sampled)
        self.codes.index_copy_(1, position, sampled.repeat(self.batch // self.n)[:, None])
        following = (position + 1).clamp_(max=self.length - 1)  # after the last code: unused
        self.tokens.copy_(prior._next_input(self.codes[:, position][:, 0], self.positions[following], self.bias))

    def capture(self, prior) -> None:
        """Record one step as a CUDA graph, after warm-up steps on a side stream (as PyTorch
        asks). Autocast's cache of cast weights is off while capturing: a graph must not read
        tensors freed when the autocast region ends."""
        dtype = torch.get_autocast_dtype("cuda")
        autocast = dict(device_type="cuda", dtype=dtype, enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.autocast(**autocast):
            for _ in range(2):
                self.step(prior)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a loader's pinning thread may work on the GPU meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.autocast(**autocast):
            self.step(prior)
        self.graph = graph

    def capture_once(self, prior) -> bool:
        """Capture on the first call; False where capture failed (said once) and steps run eagerly."""
        if self.graph is None and not self.capture_failed:
            try:
                self.capture(prior)
            except RuntimeError as error:
                self.capture_failed = True
                warnings.warn(f"the decoding step could not be captured as a CUDA graph ({error}); "
                              "decoding without the graph, the same codes more slowly", stacklevel=5)
        return self.graph is not None

    def run(self, prior, captured: bool, progress_bar) -> torch.Tensor:
        for _ in progress_bar(range(self.length)):
            if captured:
                self.graph.replay()
            else:
                self.step(prior)
        return self.codes


def decode_static(prior, labels, transforms, n, uniforms, temperature, top_k, top_p, guidance, known, keep,
                  captured: bool, progress_bar) -> torch.Tensor:
    """Codes [len(labels), h*w] through the static cache; `captured`: as CUDA graph replays,
    captured on the first call for this batch size and top-k/top-p and kept for the next."""
    device = labels.device
    captured = captured and device.type == "cuda"
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
    # The weights' addresses: a prior moved to another device, or loaded anew, needs a new capture.
    weights = tuple(t.data_ptr() for t in itertools.chain(prior.parameters(), prior.buffers()))
    key = (len(labels), n, top_k, top_p, guidance != 1.0, device, dtype, prior.training, weights)  # training: dropout
    with _lock:
        # inference mode: the buffers outlive this call; they are only ever used in here
        with torch.inference_mode():
            decoder = kept_decoder(prior, key, lambda: StaticDecoder(prior, len(labels), n, top_k, top_p, guidance != 1.0,
                                                                     device, dtype))
            inputs = (labels, transforms, uniforms, known, keep, guidance, temperature)
            decoder.load(prior, *inputs)
            if captured and decoder.graph is None:
                captured = decoder.capture_once(prior)
                decoder.load(prior, *inputs)  # the warm-up steps moved the buffers on
            codes = decoder.run(prior, captured and decoder.graph is not None, progress_bar)
        return codes.clone()  # out of inference mode (the caller gets a normal tensor), before the next call's draws


def kept_decoder(prior, key: tuple, build) -> StaticDecoder:
    """The prior's decoder for `key`, built on first use; the least recently used one is dropped
    (with its graph) beyond KEPT_PER_PRIOR, and every one where the weights moved."""
    held = _decoders.setdefault(prior, OrderedDict())
    if any(kept[-1] != key[-1] for kept in held):  # other weights: those graphs read freed memory
        held.clear()
    if key not in held:
        while len(held) >= KEPT_PER_PRIOR:
            held.popitem(last=False)  # frees the old graph before the new one is built
        held[key] = build()
    held.move_to_end(key)
    return held[key]


def kept_decoders(prior) -> list[StaticDecoder]:
    """The prior's kept decoders, the most recently used last."""
    return list(_decoders.get(prior, {}).values())


def forget_decoders(prior) -> None:
    """Drop the prior's decoders and graphs (the benchmark times a first call's capture)."""
    _decoders.pop(prior, None)
