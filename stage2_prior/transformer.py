"""Decoder-only transformer prior over raster-ordered code maps.

The sequence is [class-or-null token, code 0, ..., code n-2]; output t predicts code t.
Input t also carries the learned row and column embedding of the code it predicts, so
the model always knows where it is writing, and (`label_every_code`, as stage two builds it)
an embedding of the class, so that no position has to find the class through attention
alone: the samples are recognised as their class more often. Where the train maps hold
transformed copies of the images (stage one's dump), every input also carries the embedding of
the transform that made its map, and sampling asks for the identity's. With `code_vector_dim` (as
stage two builds it) a code's input also carries its VQ-VAE codebook vector, projected:
codes the decoder draws alike start alike, so a code seen rarely borrows from its
neighbours (test NLL 0.04-0.06 bits/code lower in the same steps). Blocks are pre-norm and use
`scaled_dot_product_attention`. Generation keeps a preallocated key/value cache, so each
new code costs one token's work instead of the whole prefix; on CUDA that step is replayed as
one captured CUDA graph (static_decoding.py).
"""


import warnings
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from stage1_vqvae.model import MODEL_DEFAULTS
from stage2_prior.prior_config import PRIOR_DEFAULTS
from stage2_prior.prior_metadata import PriorMetadata, prepare_transforms
from stage2_prior.sampling import draw_uniforms, guide, prepare_labels, sample_logits, with_null_labels
from stage2_prior.static_decoding import decode_static


class KVCache:
    """Keys and values of every layer for `length` positions, filled one position at a time;
    each step attends to the positions filled so far, so its shapes grow with the sequence."""

    def __init__(self, layers, batch, heads, length, head_dim, device, dtype):
        shape = (layers, batch, heads, length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.filled = 0

    def advance(self, count: int) -> None:
        self.filled += count


class StaticKVCache(KVCache):
    """The same cache with shapes that never change, so that a decoding step can be captured
    as a CUDA graph (as gpt-fast and LlamaGen decode): one new position per step, written in
    place at `position` (a tensor on the device), and every step attends over the whole length
    with the positions not yet written masked out."""

    def __init__(self, layers, batch, heads, length, head_dim, device, dtype):
        super().__init__(layers, batch, heads, length, head_dim, device, dtype)
        self.steps = torch.arange(length, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(1, length, dtype=torch.bool, device=device)  # [query, key]
        self.reset()

    def reset(self) -> None:
        self.position.zero_()
        torch.le(self.steps, self.position, out=self.visible[0])

    def advance(self, count: int) -> None:
        self.position.add_(count)
        torch.le(self.steps, self.position, out=self.visible[0])


# On CUDA, every attention backend but cuDNN's: cuDNN builds an execution plan for each new
# shape, and sampling grows the sequence by one code per step (50 ms per code on an H200).
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernel(device: torch.device, length: int | None = None):
    """On a CPU, short sequences train faster with plain matmul attention than with the fused
    kernel (65 codes, forward and backward: 7 ms against 67 ms; a step of the default prior:
    118 ms against 139 ms); from 256 codes on, the fused kernel wins. On CUDA, no cuDNN.
    `length` None (a decoding step) leaves the CPU's choice to PyTorch."""
    if device.type == "cpu" and length is not None and length <= 128:
        return sdpa_kernel(SDPBackend.MATH)
    return sdpa_kernel(CUDA_ATTENTION) if device.type == "cuda" else nullcontext()


class SelfAttention(nn.Module):
    """Dropout on its output only: on the attention weights it takes the CPU off the fused
    kernel (a 16x16-map step 92 ms against 62) and regularised no better (the icons' best test
    NLL 4.40 with it, 4.39 without; at 64 pixels 3.00 and 2.98)."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if cache is None:
            with attention_kernel(x.device, x.shape[1]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        elif isinstance(cache, StaticKVCache):  # one new position, written where `position` says
            cache.keys[layer].index_copy_(2, cache.position, k.to(cache.keys.dtype))
            cache.values[layer].index_copy_(2, cache.position, v.to(cache.values.dtype))
            with attention_kernel(x.device):
                out = F.scaled_dot_product_attention(q, cache.keys[layer], cache.values[layer], attn_mask=cache.visible)
        else:  # the new positions attend to everything cached so far, and to each other causally
            start, end = cache.filled, cache.filled + x.shape[1]
            cache.keys[layer, :, :, start:end] = k
            cache.values[layer, :, :, start:end] = v
            k, v = cache.keys[layer, :, :, :end], cache.values[layer, :, :, :end]
            mask = None
            if x.shape[1] > 1:
                mask = torch.ones(x.shape[1], end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            with attention_kernel(x.device):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj_dropout(self.proj(rearrange(out, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Pre-norm attention and MLP; `causal=False` lets every position see every other (MaskGIT)."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool = True):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout, causal)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x, cache=None, layer=0):
        x = x + self.attention(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class CodeTransformer(PriorMetadata):
    """What the raster transformer and MaskGIT share: the metadata stored in config.json, code,
    class and row/column embeddings, pre-norm blocks (causal or not) and a head over the K codes."""

    def _build(self, codebook_size, map_height, map_width, num_classes, width, layers, heads, dropout, prior,
               codes_source, class_names, default_guidance, label_dropout, causal: bool, extra_tokens: int = 0,
               transforms: list[str] | None = None):
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self._record(codebook_size, map_height, map_width, num_classes, prior, codes_source, class_names,
                     default_guidance, label_dropout, transforms)
        self.heads, self.num_layers, self.width = heads, layers, width
        self.code_embed = nn.Embedding(codebook_size + extra_tokens, width)  # extra: MaskGIT's mask token
        self.label_embed = nn.Embedding(num_classes + 1, width)  # the last one is "no class"
        if self.num_transforms:  # added to every input, as the class is
            self.transform_embed = nn.Embedding(self.num_transforms, width)
        self.row_embed = nn.Parameter(torch.zeros(map_height, width))
        self.col_embed = nn.Parameter(torch.zeros(map_width, width))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, causal) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.row_embed, std=0.02)
        nn.init.normal_(self.col_embed, std=0.02)
        if causal:
            # The raster prior starts as GPT-2 does: the layers that write into the residual stream
            # start smaller, so its variance does not grow with depth (the default prior: test NLL
            # 2.757 against 2.767). MaskGIT's masked NLL fell more slowly with this start (4.326
            # against 4.305 after the same steps), so it keeps the plain one.
            for block in self.blocks:
                nn.init.normal_(block.attention.proj.weight, std=0.02 / (2 * layers) ** 0.5)
                nn.init.normal_(block.mlp[2].weight, std=0.02 / (2 * layers) ** 0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _positions(self) -> torch.Tensor:
        """[h*w, width]: the row plus column embedding of each code, in raster order."""
        return rearrange(self.row_embed[:, None] + self.col_embed[None], "h w c -> (h w) c")

    def _transform_bias(self, transforms: torch.Tensor | None) -> torch.Tensor | float:
        """[B, 1, width]: the transform's embedding, added to every input; 0 where there is none."""
        return self.transform_embed(transforms)[:, None] if transforms is not None else 0.0


class TransformerPrior(CodeTransformer, PyTorchModelHubMixin):
    def __init__(
        self,
        codebook_size: int = 512,
        map_height: int = 8,
        map_width: int = 8,
        num_classes: int = 10,
        width: int = PRIOR_DEFAULTS.width,
        layers: int = PRIOR_DEFAULTS.layers,
        heads: int = PRIOR_DEFAULTS.heads,
        dropout: float = PRIOR_DEFAULTS.dropout,
        prior: str = "transformer",
        codes_source: str = "",
        class_names: list[str] | None = None,
        default_guidance: float = 1.0,
        label_dropout: float | None = None,
        label_every_code: bool = PRIOR_DEFAULTS.label_every_code,
        code_vector_dim: int = MODEL_DEFAULTS.code_dim if PRIOR_DEFAULTS.codebook_inputs else 0,
        transforms: list[str] | None = None,
    ):
        super().__init__()
        self._build(codebook_size, map_height, map_width, num_classes, width, layers, heads, dropout, prior,
                    codes_source, class_names, default_guidance, label_dropout, causal=True, transforms=transforms)
        # (`load_prior` passes False and 0 where config.json predates these two: such a prior loads as it was trained.)
        self.label_every_code = label_every_code
        if label_every_code:
            self.label_bias = nn.Embedding(num_classes + 1, width)
            nn.init.normal_(self.label_bias.weight, std=0.02)
        # The vectors are a buffer: saved with the weights, never trained.
        self.code_vector_dim = code_vector_dim
        if code_vector_dim:
            self.register_buffer("code_vectors", torch.zeros(codebook_size, code_vector_dim))
            self.code_proj = nn.Linear(code_vector_dim, width)
            nn.init.normal_(self.code_proj.weight, std=0.02 / code_vector_dim**0.5)  # outputs start at std 0.02, as code_embed's
            nn.init.zeros_(self.code_proj.bias)

    def set_code_vectors(self, codebook: torch.Tensor) -> None:
        """Store the VQ-VAE's codebook [K, D], standardised per dimension so the projection's
        start does not depend on the codebook's scale."""
        codebook = codebook.detach().float()
        self.code_vectors.copy_((codebook - codebook.mean(0)) / codebook.std(0).clamp_min(1e-6))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] -> [..., width]: the learned embedding, plus the projected codebook vector."""
        embedded = self.code_embed(codes)
        return embedded + self.code_proj(self.code_vectors[codes]) if self.code_vector_dim else embedded

    def _first_input(self, labels, positions, bias) -> torch.Tensor:
        """[B, 1, width]: what a decoding step reads to draw the first code (the class)."""
        return (self.label_embed(labels) + positions[0])[:, None] + bias

    def _next_input(self, codes, position, bias) -> torch.Tensor:
        """[B, 1, width]: what it reads after drawing `codes` [B], at `position`'s embedding."""
        return (self.embed_codes(codes) + position)[:, None] + bias

    def _condition_bias(self, labels: torch.Tensor, transforms: torch.Tensor | None) -> torch.Tensor | float:
        """[B, 1, width]: the class and the transform added to every input token, or 0 when the
        prior has neither."""
        label = self.label_bias(labels)[:, None] if self.label_every_code else 0.0
        return label + self._transform_bias(transforms)

    def _run(self, tokens, cache=None):
        x = self.dropout(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.head(self.norm(x))

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, transforms: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, h, w] -> logits [B, K, h, w]; the logits of a code see only codes before it.
        `transforms` [B]: the id of the transform that made each map (None: the identity)."""
        batch, height, width = codes.shape
        labels = prepare_labels(batch, labels, self.num_classes, codes.device)
        transforms = prepare_transforms(batch, transforms, self.num_transforms, codes.device)
        previous = self.embed_codes(rearrange(codes, "b h w -> b (h w)")[:, :-1])
        tokens = (torch.cat([self.label_embed(labels)[:, None], previous], dim=1) + self._positions()
                  + self._condition_bias(labels, transforms))
        logits = self._run(tokens)
        return rearrange(logits, "b (h w) k -> b k h w", h=height, w=width)

    @torch.no_grad()
    def generate(self, n, labels=None, temperature=1.0, top_k=None, top_p=None, generator=None,
                 guidance=1.0, decoding="auto", progress=False, known=None, keep=None, transform=0) -> torch.Tensor:
        """Sample n code maps [n, h, w]; `guidance` > 1 applies classifier-free guidance;
        `transform`: draw maps as that transform's id makes them (0: the images as they are).

        `decoding` says how each code is computed; every way draws the same codes for a seed:
        "cache" keeps a key/value cache that grows by one position a code, "static" a cache of
        fixed shapes, "graph" replays the static step as one CUDA graph (CUDA only), "naive"
        reruns the whole prefix for every code, as most VQ-VAE repositories do; "auto" is
        "graph" on CUDA and "cache" elsewhere.
        `known` [n, h, w] and `keep` [n, h, w] (bool): codes written as given instead of drawn;
        a kept top part is continued in raster order (a code only sees the codes before it).
        """
        device = self.code_embed.weight.device
        decoding = resolve_decoding(decoding, device)
        labels = with_null_labels(prepare_labels(n, labels, self.num_classes, device), self.null_label, guidance)
        batch, length = len(labels), self.map_shape[0] * self.map_shape[1]
        transforms = prepare_transforms(batch, transform, self.num_transforms, device)
        uniforms = draw_uniforms(length, n, generator, device)
        if keep is not None:
            keep, known = (rearrange(x.to(device), "n h w -> n (h w)") for x in (keep.bool(), known))
        bar = partial(tqdm, desc="sampling codes", disable=not progress, leave=False)
        if decoding in ("static", "graph"):
            codes = decode_static(self, labels, transforms, n, uniforms, temperature, top_k, top_p, guidance, known, keep,
                                  captured=decoding == "graph", progress_bar=bar)
            return rearrange(codes[:n], "b (h w) -> b h w", h=self.map_shape[0])
        positions = self._positions()
        bias = self._condition_bias(labels, transforms)
        tokens = self._first_input(labels, positions, bias)  # the cached path keeps only the newest
        cache = None
        if decoding == "cache":
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else tokens.dtype
            cache = KVCache(self.num_layers, batch, self.heads, length, self.width // self.heads, device, dtype)
        codes = torch.zeros(batch, length, dtype=torch.long, device=device)
        for t in bar(range(length)):
            logits = self._run(tokens, cache)[:, -1]
            sampled = sample_logits(guide(logits, guidance), temperature, top_k, top_p, uniforms=uniforms[t])
            if keep is not None:
                sampled = torch.where(keep[:, t], known[:, t], sampled)
            codes[:, t] = sampled.repeat(batch // n)
            if t + 1 < length:
                next_token = self._next_input(codes[:, t], positions[t + 1], bias)
                tokens = next_token if cache is not None else torch.cat([tokens, next_token], dim=1)
        return rearrange(codes[:n], "b (h w) -> b h w", h=self.map_shape[0])


DECODINGS = ("auto", "graph", "static", "cache", "naive")


def resolve_decoding(decoding: str, device: torch.device) -> str:
    """"auto" -> "graph" on CUDA, else "cache"; "graph" off CUDA runs "static" (said once)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding {decoding!r} is not one of {', '.join(DECODINGS)}")
    if decoding == "auto":
        return "graph" if device.type == "cuda" else "cache"
    if decoding == "graph" and device.type != "cuda":
        warnings.warn("decoding 'graph' needs a CUDA GPU; elsewhere it decodes 'static', the same codes without the graph")
        return "static"
    return decoding
