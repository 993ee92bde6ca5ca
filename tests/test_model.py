import pytest
import torch

from stage1_vqvae.model import VQVAE

TINY = dict(hidden_channels=16, res_blocks=1, res_channels=8, codebook_size=16, code_dim=8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_shapes_for_channels_and_downsampling(channels, downsample):
    model = VQVAE(in_channels=channels, image_size=32, downsample=downsample, **TINY)
    images = torch.rand(2, channels, 32, 32)
    output = model(images)
    assert output.reconstruction.shape == images.shape
    codes = model.encode(images)
    assert codes.shape == (2, 32 // downsample, 32 // downsample) == (2, *model.map_shape)
    assert model.decode(codes).shape == images.shape


def test_save_and_load_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(in_channels=3, image_size=16, **TINY).eval()
    model.train()(torch.rand(4, 3, 16, 16))  # move the EMA buffers away from their start
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = VQVAE.from_pretrained(str(tmp_path)).eval()
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(model.encode(images), loaded.encode(images))
    assert torch.equal(model(images).reconstruction, loaded(images).reconstruction)
    assert loaded.quantizer.l2_normalize is False and loaded.in_channels == 3
    assert loaded.quantizer.rotation_trick is False


def test_a_vq_vae_trained_with_the_rotation_trick_loads_with_it(tmp_path):
    """--resume must go on with the gradient it started with: the choice travels in config.json."""
    VQVAE(in_channels=1, image_size=16, vq_gradient="rotation", **TINY).save_pretrained(tmp_path)
    assert VQVAE.from_pretrained(str(tmp_path)).quantizer.rotation_trick is True


@pytest.mark.parametrize("downsample", [4, 8])
def test_the_resnet_tokenizer_at_64_pixels_shapes_and_straight_through_gradient(downsample):
    model = VQVAE(in_channels=3, image_size=64, downsample=downsample, architecture="resnet", **TINY)
    assert any(type(m).__name__ == "AttentionBlock" for m in model.encoder.modules())
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder.modules())  # no checkerboard
    images = torch.rand(2, 3, 64, 64)
    output = model(images)
    assert output.reconstruction.shape == images.shape and model.encode(images).shape == (2, *model.map_shape)
    output.loss.backward()  # the pixel loss reaches the encoder through the quantizer (straight-through)
    assert model.encoder[0].weight.grad.abs().sum() > 0
    assert model.decoder[-1].weight.grad is not None  # the layer the adaptive GAN weight reads


def test_the_resnet_tokenizer_saves_and_loads_as_itself(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(in_channels=3, image_size=64, architecture="resnet", **TINY)
    model.save_pretrained(tmp_path)
    loaded = VQVAE.from_pretrained(str(tmp_path)).eval()
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.eval()(images).reconstruction, loaded(images).reconstruction)
    assert type(loaded.encoder).__name__ == "ResnetEncoder"


def test_l2_normalised_lookup_uses_unit_codes():
    model = VQVAE(image_size=16, l2_normalize=True, **TINY)
    output = model(torch.rand(2, 1, 16, 16))
    norms = output.quantizer.quantized.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_downsample_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        VQVAE(downsample=3, **TINY)


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    from stage1_vqvae.metrics import ssim

    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    assert torch.allclose(ssim(images, images), torch.ones(4))
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    values = ssim(images, noisy)
    assert (values < 0.9).all() and (values > 0).all()
    assert ssim(images, (images + 0.05 * torch.randn_like(images)).clamp(0, 1)).mean() > values.mean()


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_torchmetrics(channels):
    """torchmetrics' SSIM map (11x11 Gaussian window, sigma 1.5, data range 1), averaged over the
    positions the window fits, as Wang et al.'s code and scikit-image do (torchmetrics' own mean
    also counts the reflect-padded border)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    from stage1_vqvae.metrics import ssim

    torch.manual_seed(channels)
    images = torch.rand(4, channels, 32, 32)
    other = (images + 0.15 * torch.randn_like(images)).clamp(0, 1)
    _, full_map = structural_similarity_index_measure(other, images, data_range=1.0, reduction="none", return_full_image=True)
    reference = full_map[..., 5:-5, 5:-5].mean((1, 2, 3))
    torch.testing.assert_close(ssim(other, images), reference, rtol=1e-4, atol=1e-4)
