"""Read a finished stage-one log for the two ways its adversarial phase goes wrong, so that the
run's summary says so instead of leaving it to a person to spot in the grids.

- The discriminator wins outright: it tells nearly every real image from its reconstruction
  with room to spare (its hinge loss, which asks for logits beyond +1 and -1, falls near 0; a
  balanced game keeps the logits near 0 and the loss near 1). It has then learned the training images by heart, and its features, which feature matching
  uses as a perceptual loss, describe that small set rather than images.
- The codebook collapses: the test split uses far fewer codes than before the discriminator
  started, or few of them at the end.
"""

from pathlib import Path

from foundation.training import read_log

WON_LOSS = 0.2  # the hinge loss when most real and reconstructed images are past their margins (+1, -1)
LATE_FRACTION = 0.25  # the part of the adversarial phase judged: its last quarter
COLLAPSE = 0.5  # codebook use below this fraction of its use before the discriminator started
FEW_CODES = 0.25  # codebook use at the end below this


def diagnose(log_path: Path, disc_start: int) -> list[str]:
    """One sentence for each problem found in the log, naming what to try; [] for a healthy run."""
    rows = read_log(log_path)
    return [warning for warning in (discriminator_won(rows, disc_start), codebook_collapsed(rows, disc_start)) if warning]


def discriminator_won(rows: list[dict], disc_start: int) -> str | None:
    game = [row for row in rows if "train/real_logit" in row and row["step"] > disc_start]
    if disc_start < 0 or not game:
        return None
    late = game[-max(1, round(len(game) * LATE_FRACTION)):]
    loss = sum(row["train/disc_loss"] for row in late) / len(late)
    if loss >= WON_LOSS:
        return None
    real = sum(row["train/real_logit"] for row in late) / len(late)
    fake = sum(row["train/fake_logit"] for row in late) / len(late)
    return (f"the discriminator won outright (over steps {late[0]['step']}-{late[-1]['step']} its real logits averaged "
            f"{real:+.2f} and its fake ones {fake:+.2f}, loss {loss:.3f}; a balanced game keeps both near 0 and the loss near 1): "
            f"it has learned the training images by heart, so its features no longer help the decoder; give it "
            f"--disc-augment diffaugment (every image augmented, not ADA's share), train on more images, or train "
            f"without it (--disc-start -1)")


def codebook_collapsed(rows: list[dict], disc_start: int) -> str | None:
    usage = sorted((row["step"], row["test/codebook_usage"]) for row in rows if "test/codebook_usage" in row)
    if not usage:
        return None
    before = [used for step, used in usage if step <= disc_start] if disc_start >= 0 else []
    after = [(step, used) for step, used in usage if disc_start >= 0 and step > disc_start]
    if before and after:
        step, lowest = min(after, key=lambda pair: pair[1])
        if lowest < COLLAPSE * before[-1]:
            return (f"the codebook collapsed after the discriminator started: the test split used {lowest:.0%} of the codes "
                    f"at step {step}, against {before[-1]:.0%} before; restart the codes the batches hardly use (--dead-code-share, "
                    f"or a higher one where a small set already has 0.25), ramp its terms in over more steps (--gan-ramp-steps), "
                    f"start it later (--disc-start) or weaken it (--disc-weight, --feature-matching-weight)")
    step, last = usage[-1]
    if last < FEW_CODES:
        return (f"the test split uses only {last:.0%} of the codes at step {step}; a smaller --codebook-size "
                f"gives the same maps with fewer idle codes")
    return None
