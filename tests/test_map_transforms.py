"""Transformed copies of the train images: the dump writes them with their transform's id, every
prior learns the transform as a condition, and sampling asks for the identity unless told."""

import json

import pytest
import torch

from foundation.errors import UserError
from stage1_vqvae.map_transforms import GROUPS, TRANSFORMS, apply_transform, parse_transforms
from stage2_prior.maskgit import MaskGITPrior
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.priors import corrupt_codes, training_loss
from stage2_prior.transformer import TransformerPrior
from tests.conftest import TINY_MODEL, reset_accelerate_state

K, H, W = 16, 4, 4
NAMES = ["identity", "flip", "rot90"]


def test_names_and_groups_expand_identity_first_each_once():
    assert parse_transforms("none", 3) == ["identity"]
    assert parse_transforms("", 1) == ["identity"]
    assert parse_transforms("flip,rotations,rot90", 1) == ["identity", "flip", "rot90", "rot180", "rot270"]
    assert parse_transforms("dihedral", 1) == ["identity", *GROUPS["dihedral"]]
    assert len(parse_transforms("colours", 3)) == 6


@pytest.mark.parametrize("text,message", [("mirror", "'mirror' is not a transform"),
                                          ("colours", "reorders the red, green and blue channels")])
def test_a_bad_transform_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_transforms(text, 1)


def test_each_transform_keeps_the_shape_and_the_turns_and_mirrors_undo_as_the_group_says():
    images = torch.rand(2, 3, 16, 16)
    for name in TRANSFORMS:
        assert apply_transform(name, images).shape == images.shape, name
    twice = lambda name, x: apply_transform(name, apply_transform(name, x))
    assert torch.equal(twice("flip", images), images)
    assert torch.equal(twice("rot180", images), images)
    assert torch.equal(apply_transform("rot90", apply_transform("rot270", images)), images)
    assert torch.equal(twice("flip_rot90", images), images)  # a mirror about a diagonal
    assert not torch.equal(apply_transform("zoom_nw", images), apply_transform("zoom_se", images))
    assert torch.equal(apply_transform("colours_bgr", images), images.flip(1))


def make(kind: str, transforms=NAMES, num_classes: int = 3):
    torch.manual_seed(0)
    if kind == "transformer":
        return TransformerPrior(K, H, W, num_classes=num_classes, width=32, layers=2, heads=4, code_vector_dim=0, transforms=transforms)
    if kind == "maskgit":
        return MaskGITPrior(K, H, W, num_classes=num_classes, width=32, layers=2, heads=4, transforms=transforms)
    return GatedPixelCNN(K, H, W, num_classes=num_classes, channels=16, layers=2, kernel_size=5, transforms=transforms)


@pytest.mark.parametrize("kind", ["transformer", "maskgit", "pixelcnn"])
def test_every_prior_reads_the_transform_and_defaults_to_the_identity(kind):
    model = make(kind).eval()
    codes, labels = torch.randint(0, K, (3, H, W)), torch.tensor([0, 1, 2])
    identity = model(codes, labels)
    assert torch.equal(identity, model(codes, labels, transforms=torch.zeros(3, dtype=torch.long)))
    assert not torch.allclose(identity, model(codes, labels, transforms=torch.tensor([1, 2, 1])))
    assert model.num_transforms == 3 and model.transforms == NAMES
    draw = lambda transform: model.generate(4, torch.tensor([0, 1, 2, 0]), transform=transform, guidance=1.5,
                                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(0), model.generate(4, torch.tensor([0, 1, 2, 0]), guidance=1.5, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(draw(0), draw(2))
    with pytest.raises(ValueError, match="transform 3 is out of range"):
        draw(3)


def test_a_prior_without_transforms_refuses_another_and_takes_the_identity():
    model = make("transformer", transforms=None).eval()
    assert model.num_transforms == 0 and not hasattr(model, "transform_embed")
    codes = torch.randint(0, K, (2, H, W))
    assert torch.equal(model(codes), model(codes, None, torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="ask for the identity"):
        model.generate(2, None, transform=1)


def test_with_a_transform_the_cached_and_static_decoders_draw_the_naive_loops_codes():
    model = make("transformer").eval()
    draw = lambda decoding: model.generate(3, torch.tensor([0, 1, 2]), guidance=2.0, transform=2, decoding=decoding,
                                           generator=torch.Generator().manual_seed(4))
    naive = draw("naive")
    assert torch.equal(draw("cache"), naive) and torch.equal(draw("static"), naive)


def test_the_transform_is_saved_with_the_prior(tmp_path):
    from stage2_prior.priors import load_prior

    model = make("maskgit")
    model.save_pretrained(tmp_path)
    loaded = load_prior(tmp_path)
    assert loaded.transforms == NAMES
    assert torch.equal(loaded.transform_embed.weight, model.transform_embed.weight)


def test_corruption_replaces_about_its_share_of_the_inputs_and_never_the_targets():
    torch.manual_seed(0)
    codes = torch.randint(0, K, (200, H, W))
    assert corrupt_codes(codes, 0.0, K) is codes
    changed = (corrupt_codes(codes, 0.3, K) != codes).float().mean().item()
    assert changed == pytest.approx(0.3 * (1 - 1 / K), abs=0.03)  # a replacement may draw the same code
    model = make("transformer").eval()
    inputs = corrupt_codes(codes[:8], 0.5, K)
    # the prior reads the corrupted codes and is scored on the true ones
    with torch.no_grad():
        by_hand = torch.nn.functional.cross_entropy(model(inputs, None), codes[:8]).item()
        assert training_loss(model, codes[:8], None, "transformer", inputs=inputs).item() == pytest.approx(by_hand)
        assert training_loss(model, codes[:8], None, "transformer").item() != pytest.approx(by_hand)


@pytest.fixture(scope="module")
def transformed_run(tmp_path_factory, tiny_fashion_dir):
    """Stage one with the dump's flips and quarter turns, then a prior on its maps."""
    from stage1_vqvae import train as stage_one
    from stage2_prior import train as stage_two
    from tests.test_stage2_training import TINY_PRIOR

    run = tmp_path_factory.mktemp("transformed") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQ_DATA_DIR", str(tiny_fashion_dir))
        stage_one.main(["--run-dir", str(run), *TINY_MODEL, "--max-steps", "4", "--map-transforms", "flip,rot90"])
        reset_accelerate_state()
        stage_two.main(["--run-dir", str(run), *TINY_PRIOR, "--max-steps", "4", "--token-corruption", "0.1", "--transformed-maps"])
        reset_accelerate_state()
    return run


def test_the_dump_writes_each_train_image_as_each_transform_makes_it(transformed_run, tiny_fashion):
    from foundation.data import DataConfig, load_image_data
    from stage1_vqvae.codes import open_codes, read_codes
    from stage1_vqvae.model import VQVAE

    model = VQVAE.from_pretrained(str(transformed_run / "vqvae")).eval()
    data = load_image_data(DataConfig())
    images = data.train.images.float() / 255
    train = read_codes(transformed_run / "codes", "train", vqvae=model)
    assert train.metadata.transforms == NAMES and len(train.codes) == 3 * len(images)
    for index, name in enumerate(NAMES):
        chosen = train.transforms == index
        assert torch.equal(train.codes[chosen], model.encode(apply_transform(name, images))), name
        assert torch.equal(train.labels[chosen], data.train.labels)
    test = read_codes(transformed_run / "codes", "test", vqvae=model)
    assert test.transforms is None and len(test.codes) == len(data.test)  # the test split: the images as they are
    own = open_codes(transformed_run / "codes", "train", transforms=False)
    assert len(own) == len(images) and "transforms" not in own[0]
    assert torch.equal(own.__getitems__(range(len(own)))["codes"], model.encode(images))


def test_the_prior_learns_the_dumps_transforms_and_the_pipeline_draws_by_name(transformed_run, tmp_path):
    from pipelines import sample
    from pipelines.pipeline import VQPipeline

    pipe = VQPipeline.from_run(transformed_run, device="cpu")
    assert pipe.prior.transforms == NAMES
    assert json.loads((transformed_run / "prior" / "train_config.json").read_text())["token_corruption"] == 0.1
    as_is = pipe(n=4, seed=3, output_type="pt")
    assert torch.equal(as_is.codes, pipe(n=4, seed=3, output_type="pt", transform="identity").codes)
    assert not torch.equal(as_is.codes, pipe(n=4, seed=3, output_type="pt", transform="rot90").codes)
    assert torch.equal(pipe(n=4, seed=3, output_type="pt", transform=1).codes, pipe(n=4, seed=3, output_type="pt", transform="flip").codes)
    with pytest.raises(UserError, match="transform 'rot180' is not one this prior learned; it learned identity, flip, rot90"):
        pipe(n=4, transform="rot180")
    completed = pipe.complete(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), samples=2, transform="flip", output_type="pt")
    assert completed.images.shape == (1, 2, 1, 32, 32)
    sample.main(["--run-dir", str(transformed_run), "--n", "4", "--transform", "flip", "--out", str(tmp_path / "flip")])
    assert (tmp_path / "flip" / "grid.png").exists()
    from pipelines import app_actions

    grid, text = app_actions.draw(pipe, None, 4, None, 1.0, None, 3, transform="rot90")
    assert "as rot90 makes them" in text and grid.size[0] > 0


def test_stage_two_can_leave_the_copies_out(transformed_run, tmp_path, capsys):
    import shutil

    from stage2_prior import train as stage_two
    from tests.test_stage2_training import TINY_PRIOR

    run = tmp_path / "run"
    shutil.copytree(transformed_run, run, ignore=shutil.ignore_patterns("prior"))
    stage_two.main(["--run-dir", str(run), *TINY_PRIOR, "--max-steps", "2", "--no-transformed-maps"])
    assert "64 train maps of 8x8 codes (K=16), conditional" in capsys.readouterr().out
    from stage2_prior.priors import load_prior

    assert load_prior(run / "prior").transforms is None


def test_stage_two_learns_from_the_copies_only_where_its_steps_still_pass_over_every_map_often(transformed_run, tmp_path, capsys):
    """64 images and their two copies, 16 maps a step: 480 steps pass over each of the 192 maps 40
    times, 479 steps fewer."""
    import shutil

    from stage2_prior import train as stage_two
    from stage2_prior.priors import load_prior
    from tests.test_stage2_training import TINY_PRIOR

    for steps, used in ((480, True), (479, False)):
        run = tmp_path / str(steps)
        shutil.copytree(transformed_run, run, ignore=shutil.ignore_patterns("prior"))
        stage_two.main(["--run-dir", str(run), *TINY_PRIOR, "--max-steps", str(steps), "--eval-every", "1000",
                        "--checkpoint-every", "1000"])
        out = capsys.readouterr().out
        assert ("--transformed-maps (each image also as the dump's 2 transform(s): the steps still pass over every map 40 times)"
                if used else "--no-transformed-maps (with the dump's transformed copies the steps would pass over each map only 39.9") in out
        assert load_prior(run / "prior").num_transforms == (3 if used else 0)


def test_a_bad_transform_or_corruption_flag_is_one_sentence(transformed_run, tmp_path, tiny_fashion):
    from stage1_vqvae import dump_codes
    from stage2_prior import train as stage_two

    with pytest.raises(UserError, match="--map-transforms 'flips': 'flips' is not a transform"):
        dump_codes.main(["--run-dir", str(transformed_run), "--map-transforms", "flips"])
    with pytest.raises(UserError, match="--token-corruption 1.5 must be at least 0"):
        stage_two.main(["--run-dir", str(tmp_path), "--token-corruption", "1.5"])


def test_maps_read_from_memory_and_from_arrow_are_the_same_with_and_without_the_copies(transformed_run):
    import datasets

    from stage1_vqvae.codes import CodeMapSplit, read_metadata

    table = datasets.load_from_disk(str(transformed_run / "codes" / "train"))
    metadata = read_metadata(transformed_run / "codes")
    for transforms in (True, False):
        held = CodeMapSplit(table, metadata, transforms=transforms)
        mapped = CodeMapSplit(table, metadata, transforms=transforms, max_bytes=0)
        assert not mapped.in_memory and len(held) == len(mapped) == (192 if transforms else 64)
        rows = [5, 0, 63]
        a, b = held.__getitems__(rows), mapped.__getitems__(rows)
        assert a.keys() == b.keys() == ({"codes", "labels", "transforms"} if transforms else {"codes", "labels"})
        assert all(torch.equal(a[key], b[key]) for key in a)
