"""How near new images lie to the train images: copies, blends, or as near as unseen real images.

For every sample and every real test image, the distance to its nearest train image, in the
judge's features and in pixels. Real test images were never trained on, so their distances say
how near an image of this data lies to the train split without being one of it:

- `near_copy_share`: the share of samples nearer their nearest train image than 95% of the real
  test images are to theirs (about 5% for images drawn as unseen real ones are);
- `nearest_train_ratio`: the samples' median distance over the test images' median (1: as near
  the data as unseen real images; above 1: off the data, blends of it; below 1: copies).

Pixels alone can be blind where most of an image is background, so the judge's features decide.
"""

import torch

NEAR_COPY_QUANTILE = 0.05


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """[N] Euclidean distance from each query [N, D] to its nearest reference [M, D], in float32
    chunks so that no N x M matrix larger than chunk x chunk is ever held."""
    queries, references = queries.flatten(1).float(), references.flatten(1).float()
    nearest = torch.full((len(queries),), float("inf"))
    for start in range(0, len(queries), chunk):
        block = queries[start: start + chunk]
        for offset in range(0, len(references), chunk):
            distances = torch.cdist(block, references[offset: offset + chunk]).min(1).values
            nearest[start: start + chunk] = torch.minimum(nearest[start: start + chunk], distances)
    return nearest


def memorisation(samples: torch.Tensor, test: torch.Tensor, train: torch.Tensor) -> dict:
    """The near-copy share and the nearest-train ratio of `samples` against real `test` images,
    both [N, ...] vectors in one space (features, or pixels) with the `train` images'."""
    to_samples, to_test = nearest_distances(samples, train), nearest_distances(test, train)
    threshold = torch.quantile(to_test, NEAR_COPY_QUANTILE).item()
    return {
        "near_copy_share": (to_samples < threshold).float().mean().item(),
        "nearest_train_ratio": (to_samples.median() / to_test.median()).item(),
        "samples_median_distance": to_samples.median().item(),
        "test_median_distance": to_test.median().item(),
    }
