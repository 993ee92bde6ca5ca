import math

import pytest
import torch

from stage2_prior.maskgit import MaskGITPrior, masked_code_loss, masked_fraction, passes_for_map, random_mask, still_masked_after
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.transformer import TransformerPrior

K, H, W = 16, 4, 5


def make_maskgit(layers: int = 2, num_classes: int = 3, seed: int = 0) -> MaskGITPrior:
    torch.manual_seed(seed)
    return MaskGITPrior(K, H, W, num_classes=num_classes, width=32, layers=layers, heads=4).eval()


def test_every_position_sees_every_other():
    """Bidirectional: the logits at one position change when a code after it changes."""
    model = make_maskgit()
    codes = torch.randint(0, K, (1, H, W))
    changed = codes.clone()
    changed[0, -1, -1] = (codes[0, -1, -1] + 1) % K
    assert not torch.allclose(model(codes)[0, :, 0, 0], model(changed)[0, :, 0, 0])


def test_the_training_mask_follows_the_cosine_schedule():
    """With r ~ U(0, 1), E[cos(pi r / 2)] = 2 / pi of the codes are hidden, never none."""
    mask = random_mask(20000, 64, "cpu", torch.Generator().manual_seed(0))
    assert mask.sum(1).min() >= 1
    assert abs(mask.float().mean().item() - 2 / math.pi) < 0.01


@pytest.mark.parametrize("steps", [1, 4, 8, 12])
def test_each_pass_leaves_the_cosine_share_masked_and_the_last_none(steps, monkeypatch):
    model = make_maskgit()
    seen = []
    run = model._logits

    def recording(codes, masked, labels, transforms):
        seen.append(masked.sum(1).tolist())
        return run(codes, masked, labels, transforms)

    monkeypatch.setattr(model, "_logits", recording)
    length = H * W
    codes = model.generate(3, None, steps=steps, generator=torch.Generator().manual_seed(0))
    assert len(seen) == steps
    expected = [length]  # masked at the start of each pass: the cosine share, but one code fewer at least
    for t in range(1, steps):
        expected.append(max(0, min(max(1, math.floor(length * math.cos(math.pi / 2 * t / steps))), expected[-1] - 1)))
    assert [counts[0] for counts in seen] == expected
    if steps <= 8:  # here the cosine alone sets every count
        assert expected[1:] == [math.floor(length * math.cos(math.pi / 2 * t / steps)) for t in range(1, steps)]
    assert all(len(set(counts)) == 1 for counts in seen)
    assert codes.shape == (3, H, W) and codes.min() >= 0 and codes.max() < K  # no mask token left


def test_the_schedule_helpers_agree_with_the_formula():
    assert masked_fraction(0.0).item() == 1.0 and abs(masked_fraction(1.0).item()) < 1e-12
    unknown = torch.tensor([64, 10])
    assert still_masked_after(7, 8, unknown, unknown).tolist() == [0, 0]
    assert still_masked_after(0, 8, unknown, unknown).tolist() == [math.floor(64 * math.cos(math.pi / 16)), 9]
    # every pass but the last fixes at least one code and leaves at least one
    assert still_masked_after(0, 8, torch.tensor([2]), torch.tensor([2])).tolist() == [1]


def test_the_default_passes_grow_with_the_map():
    assert [passes_for_map(side * side) for side in (4, 8, 16, 32)] == [4, 4, 8, 12]
    assert make_maskgit().default_steps == 4  # a 4x5 map
    assert MaskGITPrior(K, 16, 16, default_steps=6).default_steps == 6


def test_the_same_seed_gives_the_same_codes():
    model = make_maskgit()

    def draw(seed):
        return model.generate(4, torch.tensor([0, 1, 2, 0]), guidance=1.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def make_ar(kind: str):
    torch.manual_seed(0)
    if kind == "pixelcnn":
        return GatedPixelCNN(K, H, W, num_classes=3, channels=16, layers=3, kernel_size=5).eval()
    return TransformerPrior(K, H, W, num_classes=3, width=32, layers=2, heads=4).eval()


@pytest.mark.parametrize("kind", ["maskgit", "transformer", "pixelcnn"])
def test_completion_never_changes_kept_codes(kind):
    model = make_maskgit() if kind == "maskgit" else make_ar(kind)
    known = torch.randint(0, K, (6, H, W), generator=torch.Generator().manual_seed(1))
    if kind == "maskgit":  # any region: a random one per map
        keep = torch.rand(6, H, W, generator=torch.Generator().manual_seed(2)) < 0.5
    else:  # the top rows, continued in raster order
        keep = torch.zeros(6, H, W, dtype=torch.bool)
        keep[:, : H // 2] = True
    for guidance in (1.0, 2.0):
        codes = model.generate(6, torch.tensor([0, 1, 2] * 2), guidance=guidance, known=known, keep=keep,
                               generator=torch.Generator().manual_seed(0))
        assert torch.equal(codes[keep], known[keep])
        assert not torch.equal(codes[~keep], known[~keep])  # the rest was drawn, not copied


def test_completion_with_every_code_kept_returns_the_map_unchanged():
    model = make_maskgit()
    known = torch.randint(0, K, (3, H, W))
    keep = torch.ones(3, H, W, dtype=torch.bool)
    assert torch.equal(model.generate(3, None, known=known, keep=keep), known)


def test_guidance_uses_the_conditional_half_as_conditional(monkeypatch):
    """Logits built by hand for every position: conditional [1, 1, -10, ...], unconditional
    [0, 2, -10, ...]. Guidance 3 gives [3, -1]: code 0 nearly always; with the halves swapped
    it would give [-2, 4]: code 1 nearly always. Without guidance codes 0 and 1 are even."""
    model = make_maskgit(num_classes=1)
    conditional = torch.tensor([1.0, 1.0] + [-10.0] * (K - 2))
    unconditional = torch.tensor([0.0, 2.0] + [-10.0] * (K - 2))

    def by_hand(codes, masked, labels, transforms):
        rows = torch.where((labels == model.null_label)[:, None], unconditional, conditional)
        return rows[:, None, :].expand(len(labels), H * W, K)

    monkeypatch.setattr(model, "_logits", by_hand)

    def share_of_code_0(guidance):
        codes = model.generate(200, torch.zeros(200, dtype=torch.long), guidance=guidance, generator=torch.Generator().manual_seed(0))
        return (codes == 0).float().mean().item()

    assert 0.45 < share_of_code_0(1.0) < 0.55
    assert share_of_code_0(3.0) > 0.95


def test_a_tiny_maskgit_overfits_a_handful_of_maps():
    """It learns to fill in 6 maps from their labels alone: greedy sampling then redraws them."""
    model = make_maskgit(layers=2).train()
    codes = torch.randint(0, K, (6, H, W), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    codes[3:] = codes[:3]  # one map per label, so the label alone can tell the map
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = masked_code_loss(model, codes, labels, label_smoothing=0.0).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() / math.log(2) < 0.1 * math.log2(K), loss.item()
    drawn = model.eval().generate(3, labels[:3], temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert (drawn == codes[:3]).float().mean() > 0.95


def test_bad_steps_are_a_clear_error():
    with pytest.raises(ValueError, match="steps 0"):
        make_maskgit().generate(1, None, steps=0)
