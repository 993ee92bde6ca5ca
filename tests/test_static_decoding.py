"""The static key/value cache draws exactly the codes of the growing one, on the CPU; the
captured CUDA graph's codes are checked against it in test_cuda.py."""

import warnings

import pytest
import torch

from stage2_prior import static_decoding
from stage2_prior.static_decoding import StaticDecoder
from tests.test_priors import H, K, W, make_prior


def draw(model, n, labels, decoding, seed=5, **options):
    return model.generate(n, labels, generator=torch.Generator().manual_seed(seed), decoding=decoding, **options)


@pytest.mark.parametrize("kind", ["transformer", "transformer+inputs"])
@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_the_static_cache_draws_the_codes_of_the_growing_cache(kind, n, guidance):
    model = make_prior(kind, 2)
    labels = torch.arange(n) % 3
    for options in ({}, dict(temperature=0.7, top_k=5), dict(top_p=0.8)):
        growing = draw(model, n, labels, "cache", guidance=guidance, **options)
        static = draw(model, n, labels, "static", guidance=guidance, **options)
        assert static.shape == (n, H, W) and torch.equal(static, growing)
    assert torch.equal(draw(model, n, labels, "naive", guidance=guidance), draw(model, n, labels, "static", guidance=guidance))


def test_a_kept_decoder_serves_later_calls_as_a_fresh_one_would():
    """The buffers outlive a call; what a call brings (labels, draws, kept codes, guidance) must
    replace all of the last call's."""
    model = make_prior("transformer+inputs", 2)
    known = torch.randint(0, K, (4, H, W), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(4, H, W, dtype=torch.bool)
    keep[:, :2] = True
    calls = [dict(labels=torch.tensor([0, 1, 2, 0]), guidance=2.0, seed=1),
             dict(labels=torch.tensor([2, 2, 1, 0]), guidance=3.0, seed=2, known=known, keep=keep),
             dict(labels=torch.tensor([1, 0, 0, 2]), guidance=1.5, seed=3, temperature=0.5)]
    decoders = []
    for call in calls:
        labels, seed = call.pop("labels"), call.pop("seed")
        static = draw(model, 4, labels, "static", seed=seed, **call)
        decoders.append(static_decoding.kept_decoders(model)[-1])
        assert torch.equal(static, draw(model, 4, labels, "cache", seed=seed, **call))
    assert all(decoder is decoders[0] for decoder in decoders)  # the same buffers served all three calls


def test_kept_codes_are_written_as_given_and_the_rest_continues_them():
    model = make_prior("transformer", 2)
    known = torch.randint(0, K, (3, H, W), generator=torch.Generator().manual_seed(4))
    keep = torch.zeros(3, H, W, dtype=torch.bool)
    keep[:, :2] = True
    static = draw(model, 3, torch.tensor([0, 1, 2]), "static", guidance=2.0, known=known, keep=keep)
    assert torch.equal(static[keep], known[keep])
    assert torch.equal(static, draw(model, 3, torch.tensor([0, 1, 2]), "cache", guidance=2.0, known=known, keep=keep))


def test_graph_decoding_off_cuda_says_so_and_decodes_static():
    model = make_prior("transformer", 2)
    with pytest.warns(UserWarning, match="decoding 'graph' needs a CUDA GPU"):
        graph = draw(model, 3, None, "graph")
    assert torch.equal(graph, draw(model, 3, None, "static"))
    with pytest.raises(ValueError, match="decoding 'fast' is not one of auto, graph, static, cache, naive"):
        draw(model, 3, None, "fast")
    with pytest.raises(ValueError, match="the PixelCNN decodes 'cache' or 'naive', not 'static'"):
        draw(make_prior("pixelcnn", 2), 3, None, "static")


def test_a_failed_capture_is_said_once_and_decoding_goes_on_without_it(monkeypatch):
    """Where capture is not possible the step runs eagerly: the CUDA branch, run as far as a CPU allows."""
    model = make_prior("transformer", 2)
    decoder = StaticDecoder(model, 2, 2, None, None, False, torch.device("cpu"), torch.float32)

    def refuse(prior):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decoder, "capture", refuse)
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph .operation not permitted"):
        assert decoder.capture_once(model) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decoder.capture_once(model) is False  # said once, not tried again


def test_drawing_80_images_again_and_again_builds_each_batch_sizes_decoder_once(monkeypatch):
    """80 images decode as 64 then 16; keeping one decoder per prior rebuilt (on CUDA recaptured)
    both on every call."""
    model = make_prior("transformer", 2)
    built = []
    real = static_decoding.StaticDecoder
    monkeypatch.setattr(static_decoding, "StaticDecoder", lambda *args: built.append(args[1]) or real(*args))
    for seed in range(3):
        for n in (64, 16):
            draw(model, n, None, "static", seed=seed)
    assert built == [64, 16]
    for n in range(1, static_decoding.KEPT_PER_PRIOR + 3):  # bounded: the least recently used goes
        draw(model, n, None, "static")
    assert len(static_decoding.kept_decoders(model)) == static_decoding.KEPT_PER_PRIOR


def test_two_threads_decoding_at_once_each_get_their_own_seeds_codes():
    """The page serves two visitors from threads; one decoder's buffers must not serve both at once."""
    import threading

    model = make_prior("transformer+inputs", 2)
    labels = torch.tensor([0, 1, 2, 0])
    alone = {seed: draw(model, 4, labels, "static", seed=seed, guidance=2.0) for seed in range(6)}
    together, barrier = {}, threading.Barrier(2)

    def visitor(seeds):
        barrier.wait()
        for seed in seeds:
            together[seed] = draw(model, 4, labels, "static", seed=seed, guidance=2.0)

    threads = [threading.Thread(target=visitor, args=(seeds,)) for seeds in ((0, 2, 4), (1, 3, 5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(together[seed], alone[seed]) for seed in alone)
