import json
import math

import pytest
import torch
import torch.nn.functional as F

from stage2_prior.maskgit import MaskGITPrior
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.priors import load_prior
from stage2_prior.sampling import filter_logits, sample_logits
from stage2_prior.transformer import TransformerPrior

K, H, W = 16, 4, 5


def make_prior(kind: str, depth: int, num_classes: int = 3):
    torch.manual_seed(depth)
    if kind == "pixelcnn":
        model = GatedPixelCNN(K, H, W, num_classes=num_classes, channels=16, layers=depth, kernel_size=5)
    else:  # "transformer+inputs": the class and the codebook vectors added to every code's input, as stage two builds it
        extras = kind == "transformer+inputs"
        model = TransformerPrior(K, H, W, num_classes=num_classes, width=32, layers=depth, heads=4,
                                 label_every_code=extras, code_vector_dim=6 if extras else 0)
        if extras:
            model.set_code_vectors(torch.randn(K, 6))
    return model.eval()


PRIORS = [("pixelcnn", 2), ("pixelcnn", 4), ("transformer", 1), ("transformer", 3), ("transformer+inputs", 2)]


@pytest.mark.parametrize("kind,depth", PRIORS)
def test_logits_do_not_change_when_codes_at_or_after_the_position_change(kind, depth):
    model = make_prior(kind, depth)
    codes = torch.randint(0, K, (2, H, W))
    labels = torch.tensor([0, 2])
    logits = model(codes, labels)
    assert logits.shape == (2, K, H, W)
    for position in range(H * W):
        changed = codes.clone().view(2, -1)
        changed[:, position:] = torch.randint(0, K, changed[:, position:].shape)
        new_logits = model(changed.view(2, H, W), labels)
        i, j = divmod(position, W)
        assert torch.allclose(logits[:, :, i, j], new_logits[:, :, i, j], atol=1e-5), position


@pytest.mark.parametrize("kind,depth", PRIORS)
def test_every_position_depends_on_every_position_before_it(kind, depth):
    """Gradients from each output reach every earlier input embedding: no blind spot."""
    model = make_prior(kind, depth)
    embedding = model.embed if kind == "pixelcnn" else model.code_embed
    outputs = []
    hook = embedding.register_forward_hook(lambda module, args, out: outputs.append(out.retain_grad() or out))
    codes = torch.randint(0, K, (1, H, W))
    logits = model(codes, torch.tensor([1]))
    hook.remove()
    for position in range(H * W):
        for out in outputs:
            out.grad = None
        i, j = divmod(position, W)
        logits[0, :, i, j].square().sum().backward(retain_graph=True)
        influence = sum(out.grad.abs().sum(-1).flatten() for out in outputs if out.grad is not None)
        if kind != "pixelcnn":  # the transformer's input t is code t-1: pad so index q is code q
            influence = F.pad(influence, (0, 1))
        assert (influence[:position] > 0).all(), f"position {position} misses an earlier code"
        assert (influence[position:] == 0).all(), f"position {position} sees itself or a later code"


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer", "transformer+inputs"])
def test_cached_and_uncached_generation_give_the_same_codes(kind):
    model = make_prior(kind, 2)
    for labels, guidance in ((None, 1.0), (torch.tensor([0, 1, 2]), 1.0), (torch.tensor([2, 2, 0]), 3.0)):
        fast = model.generate(3, labels, generator=torch.Generator().manual_seed(5), guidance=guidance)
        slow = model.generate(3, labels, generator=torch.Generator().manual_seed(5), guidance=guidance, decoding="naive")
        assert fast.shape == (3, H, W) and fast.dtype == torch.long
        assert torch.equal(fast, slow)


def test_top_k_and_top_p_keep_the_specified_codes():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()
    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_p=0.7) == [False, True, False, True]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert kept(top_p=0.5) == [False, True, False, False]  # the top code alone reaches 0.5
    assert kept(top_p=0.9) == [False, True, True, True]
    assert kept(top_p=1.0) == [True, True, True, True]
    assert kept(top_k=3, top_p=0.7) == [False, True, False, True]


def test_temperature_sharpens_and_flattens_a_known_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log().expand(40000, 3)
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        samples = sample_logits(logits, temperature=temperature, generator=generator)
        frequency = torch.bincount(samples, minlength=3).float() / len(samples)
        expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
        assert torch.allclose(frequency, expected, atol=0.01), (temperature, frequency, expected)


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer"])
def test_a_tiny_prior_overfits_a_handful_of_maps(kind):
    model = make_prior(kind, 2).train()
    if kind == "transformer":
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    codes = torch.randint(0, K, (6, H, W), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        loss = F.cross_entropy(model(codes, labels), codes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bits_per_code = loss.item() / math.log(2)
    assert bits_per_code < 0.25 * math.log2(K), bits_per_code


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer", "transformer+inputs"])
def test_a_label_changes_the_output_and_the_null_label_works(kind):
    model = make_prior(kind, 2)
    codes = torch.randint(0, K, (1, H, W))
    logits = {label: model(codes, torch.tensor([label])) for label in (0, 1, 3)}
    assert not torch.allclose(logits[0], logits[1])
    assert torch.equal(model(codes, None), logits[3])  # None means the null label, index num_classes
    assert model.generate(2, None).shape == (2, H, W)


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer"])
def test_a_label_out_of_range_is_a_clear_error(kind):
    model = make_prior(kind, 2)
    with pytest.raises(ValueError, match="label 7 is out of range for a prior trained on 3 classes; use 0 to 2"):
        model.generate(2, 7)
    with pytest.raises(ValueError, match="label -1 is out of range"):
        model(torch.zeros(1, H, W, dtype=torch.long), torch.tensor([-1]))


@pytest.mark.parametrize("kernel, layers", [(3, 6), (5, 3), (7, 2)])
def test_the_pixelcnn_layer_cache_samples_what_the_whole_network_would(kernel, layers):
    torch.manual_seed(kernel)
    model = GatedPixelCNN(K, 6, 7, num_classes=3, channels=16, layers=layers, kernel_size=kernel).eval()
    for labels, guidance in ((None, 1.0), (torch.tensor([0, 1, 2, 0, 1, 2]), 2.0)):
        fast = model.generate(6, labels, generator=torch.Generator().manual_seed(1), guidance=guidance)
        slow = model.generate(6, labels, generator=torch.Generator().manual_seed(1), guidance=guidance, decoding="naive")
        assert torch.equal(fast, slow)


def test_a_pixelcnn_too_shallow_to_see_its_whole_map_is_refused():
    with pytest.raises(ValueError, match="see 24 codes up and to the left, fewer than the 31 a 32x32 map needs; use at least 16 layers"):
        GatedPixelCNN(K, 32, 32, channels=8, layers=12, kernel_size=5)
    GatedPixelCNN(K, 32, 32, channels=8, layers=16, kernel_size=5)  # and one that does is built
    GatedPixelCNN(K, 32, 32, channels=8, layers=11, kernel_size=7)


def test_the_cpu_matmul_attention_gives_the_fused_kernels_logits(monkeypatch):
    """Training on a CPU takes the matmul attention for short maps; it must compute the same thing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stage2_prior import transformer

    model = make_prior("transformer", 2)
    codes, labels = torch.randint(0, K, (3, H, W)), torch.tensor([0, 1, 3])
    matmul = model(codes, labels)
    monkeypatch.setattr(transformer, "attention_kernel", lambda device, length: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    torch.testing.assert_close(model(codes, labels), matmul, atol=1e-5, rtol=1e-4)


def test_guidance_pushes_away_from_the_unconditional_logits_not_towards_them():
    """A prior built by hand (no blocks, 1x1 maps) whose logits for the first code are
    conditional [1, 1, -10, -10] and unconditional [0, 2, -10, -10]. Guidance 3 gives
    [3, -1, ...]: code 0 nearly always. Were the two halves swapped, it would give
    [-2, 4, ...]: code 1 nearly always. Without guidance, codes 0 and 1 are even."""
    model = TransformerPrior(codebook_size=4, map_height=1, map_width=1, num_classes=1, width=4, layers=0, heads=1, dropout=0.0)
    with torch.no_grad():
        model.row_embed.zero_()
        model.col_embed.zero_()
        model.label_embed.weight.copy_(torch.tensor([[1.0, 1, -1, -1], [1, -1, 1, -1]]))  # class 0, then the null label
        model.head.weight.copy_(torch.tensor([[0.5, 0.5, 0, 0], [1.5, -0.5, 0, 0], [-5, 0, 0, 5], [-5, 0, 0, 5]]))
    labels = torch.zeros(2000, dtype=torch.long)

    def share_of_code_0(guidance):
        codes = model.eval().generate(2000, labels, guidance=guidance, generator=torch.Generator().manual_seed(0))
        return (codes == 0).float().mean().item()

    assert 0.45 < share_of_code_0(1.0) < 0.55
    assert share_of_code_0(3.0) > 0.95


def test_only_the_raster_transformer_starts_its_residual_writing_layers_smaller():
    """GPT-2's start measured better for the raster prior and worse for MaskGIT (see docs/measurements.md)."""
    torch.manual_seed(0)
    raster, masked = (kind(width=128, layers=8, heads=2) for kind in (TransformerPrior, MaskGITPrior))
    for model, expected in ((raster, 0.02 / 4), (masked, 0.02)):
        for block in model.blocks:
            for weight in (block.attention.proj.weight, block.mlp[2].weight):
                assert abs(weight.std().item() - expected) < 0.1 * expected


def test_a_transformer_saved_before_the_class_and_codebook_inputs_still_loads(tmp_path):
    """Its config.json has no label_every_code and no code_vector_dim: it loads as it was
    trained, the class in the first token only and no codebook vectors, and samples what it
    sampled before."""
    torch.manual_seed(0)
    old = TransformerPrior(K, H, W, num_classes=3, width=32, layers=1, heads=4, label_every_code=False, code_vector_dim=0)
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["label_every_code"], config["code_vector_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_prior(tmp_path).eval()
    assert not loaded.label_every_code and not loaded.code_vector_dim
    draw = lambda model: model.generate(2, torch.tensor([0, 2]), generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(loaded), draw(old.eval()))


def test_codebook_vectors_are_saved_with_the_prior_and_shape_its_inputs(tmp_path):
    """The vectors are a buffer: they come back from disk, and codes with equal vectors get inputs
    that differ only by their learned embeddings (zeroed here)."""
    model = make_prior("transformer+inputs", 1)
    model.save_pretrained(tmp_path)
    loaded = TransformerPrior.from_pretrained(tmp_path)
    assert loaded.code_vector_dim == 6 and torch.equal(loaded.code_vectors, model.code_vectors)
    assert torch.allclose(model.code_vectors.mean(0), torch.zeros(6), atol=1e-5)  # standardised per dimension
    with torch.no_grad():
        model.code_embed.weight.zero_()
        model.code_vectors[3] = model.code_vectors[5]
    inputs = model.embed_codes(torch.tensor([3, 5, 6]))
    # equal up to rounding: a matrix product may round one row differently from another on some CPUs
    assert torch.allclose(inputs[0], inputs[1], rtol=1e-5, atol=1e-7) and not torch.allclose(inputs[0], inputs[2])


def test_the_model_classes_defaults_are_the_command_lines():
    """One source of truth: a model built in Python with no arguments is the one the flags describe."""
    import inspect

    from stage1_vqvae.discriminator import PatchDiscriminator
    from stage1_vqvae.gan_loss import LossConfig
    from stage1_vqvae.model import VQVAE, ModelConfig
    from stage2_prior.prior_config import PriorConfig

    def defaults(cls):
        return {name: p.default for name, p in inspect.signature(cls).parameters.items()}

    prior, model = PriorConfig(), ModelConfig()
    for cls in (TransformerPrior, MaskGITPrior):
        assert {k: defaults(cls)[k] for k in ("width", "layers", "heads", "dropout")} == \
            {"width": prior.width, "layers": prior.layers, "heads": prior.heads, "dropout": prior.dropout}
    assert defaults(TransformerPrior)["label_every_code"] == prior.label_every_code
    assert defaults(TransformerPrior)["code_vector_dim"] == (model.code_dim if prior.codebook_inputs else 0)
    pixelcnn = defaults(GatedPixelCNN)
    assert (pixelcnn["channels"], pixelcnn["layers"], pixelcnn["kernel_size"]) == \
        (prior.pixelcnn_channels, prior.pixelcnn_layers, prior.kernel_size)
    vqvae = defaults(VQVAE)
    for name in ("hidden_channels", "res_blocks", "res_channels", "downsample", "codebook_size", "code_dim", "beta",
                 "decay", "dead_code_steps", "l2_normalize", "dead_code_share"):
        assert vqvae[name] == getattr(model, name), name
    assert vqvae["ema"] == (model.codebook == "ema")
    assert defaults(PatchDiscriminator)["channels"] == LossConfig().disc_channels
    assert TransformerPrior().width == 128 and len(TransformerPrior().blocks) == 4  # what the README documents


def test_the_prior_flag_offers_exactly_the_priors_that_exist():
    from stage2_prior.prior_config import PRIOR_KINDS
    from stage2_prior.priors import PRIORS

    assert list(PRIOR_KINDS) == list(PRIORS)
