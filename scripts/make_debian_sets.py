"""Build real colour image folders from Debian packages, to measure the defaults beyond Fashion-MNIST.

    sudo apt-get install fonts-noto-color-emoji unicode-data oxygen-icon-theme gnome-icon-theme \
        mate-icon-theme tango-icon-theme papirus-icon-theme librsvg2-bin wesnoth-1.16-data
    python scripts/make_debian_sets.py /tmp/sets --size 64

writes four folders in the layout `stage1_vqvae/train.py --dataset` reads, `train/<class>/` and
`test/<class>/` (a hashed tenth of each class held out), RGB PNGs of `--size` pixels, drawn on white:

- `emoji`: every fully-qualified emoji of Noto Color Emoji (about 3,600 drawings: faces, people,
  animals, food, objects, flags), labelled by its Unicode group;
- `icons`: the desktop icons of the Oxygen, GNOME, MATE and Tango themes (about 1,800), labelled
  by their context (actions, apps, devices, mimetypes, places, status...);
- `applogos`: Papirus's application icons (about 3,600 logos), one class, so unlabelled;
- `sprites`: Battle for Wesnoth's unit sprites (about 5,600 pixel-art frames: each unit standing,
  attacking, defending), labelled by faction; a unit's frames are held out together, so that a
  test sprite is a unit the train split never showed, not another frame of one it did.

Identical pictures (themes share icons, links repeat them) are written once. Not committed data:
the packages are the source, and the same packages write the same files.
"""

import argparse
import hashlib
import io
import shutil
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
ICON_THEMES = Path("/usr/share/icons")
# theme -> the size folders to read, best first (a vector folder, else the largest bitmaps)
DESKTOP_THEMES = {"oxygen/base": ["256x256", "128x128", "64x64"], "gnome": ["256x256", "48x48"],
                  "mate": ["256x256", "48x48"], "Tango": ["scalable"]}
WESNOTH_UNITS = Path("/usr/share/games/wesnoth/1.16/data/core/images/units")
MIN_FACTION_SPRITES = 50  # smaller factions (transport, ogres) are too few to learn as a class
CONTEXTS = ("actions", "apps", "categories", "devices", "emblems", "emotes", "mimetypes", "places", "status")


def square(image: Image.Image, size: int) -> Image.Image:
    """Crop to the drawn part, pad to a square, resize to `size`, lay on white (as a viewer shows it)."""
    image = image.convert("RGBA")
    box = image.getbbox()
    if box:
        image = image.crop(box)
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    canvas = canvas.resize((size, size), Image.LANCZOS)
    return Image.alpha_composite(Image.new("RGBA", canvas.size, "white"), canvas).convert("RGB")


def read_picture(path: Path, size: int) -> Image.Image | None:
    if path.suffix == ".svg":
        done = subprocess.run(["rsvg-convert", "-w", str(4 * size), "-h", str(4 * size), "-a", str(path)],
                              capture_output=True)
        if done.returncode:
            return None
        return Image.open(io.BytesIO(done.stdout))
    try:
        return Image.open(path)
    except OSError:
        return None


def emoji_pictures(size: int):
    """(group, picture) for every fully-qualified emoji but skin-tone and hair components."""
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the one size of its bitmaps
    group = None
    for line in EMOJI_TEST.read_text().splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip().split(" ")[0].lower()
        elif "; fully-qualified" in line and group != "component":
            sequence = "".join(chr(int(code, 16)) for code in line.split(";")[0].split())
            canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((10, 10), sequence, font=font, embedded_color=True)
            if canvas.getbbox():
                yield group, square(canvas, size)


def theme_pictures(size: int):
    """(context, picture) from the desktop themes, each icon from its best size folder."""
    for theme, size_folders in DESKTOP_THEMES.items():
        seen = set()
        for folder in size_folders:
            for context in CONTEXTS:
                directory = ICON_THEMES / theme / folder / context
                for path in sorted(directory.glob("*")) if directory.is_dir() else []:
                    if path.stem in seen:
                        continue
                    picture = read_picture(path, size)
                    if picture is not None:
                        seen.add(path.stem)
                        yield context, square(picture, size)


def app_logo_pictures(size: int):
    directory = ICON_THEMES / "Papirus" / "64x64" / "apps"
    for path in sorted(directory.glob("*.svg")):
        if not path.is_symlink():
            picture = read_picture(path, size)
            if picture is not None:
                yield "logo", square(picture, size)


def sprite_pictures(size: int):
    """(faction, picture, unit) for every unit frame: `units/<faction>/<unit>-<pose>.png` or
    `units/<faction>/<unit>/<pose>.png`."""
    for faction in sorted(WESNOTH_UNITS.iterdir()):
        paths = sorted(faction.rglob("*.png")) if faction.is_dir() else []
        if len(paths) < MIN_FACTION_SPRITES:
            continue
        for path in paths:
            unit = path.parent.name if path.parent != faction else path.stem.split("-")[0]
            picture = read_picture(path, size)
            if picture is not None and picture.convert("RGBA").getbbox():
                yield faction.name, square(picture, size), f"{faction.name}/{unit}"


def write_set(root: Path, pictures, test_every: int = 10) -> dict:
    """Each distinct picture once, every `test_every`-th of its class (in a hashed order) held out;
    a picture that comes with a group (a unit's frames) is held out with its whole group."""
    shutil.rmtree(root, ignore_errors=True)
    written, counts = set(), {}
    for label, picture, *group in pictures:
        digest = hashlib.sha1(picture.tobytes()).hexdigest()
        if digest in written:
            continue
        written.add(digest)
        held_out_by = hashlib.sha1(group[0].encode()).hexdigest() if group else digest
        split = "test" if int(held_out_by[:8], 16) % test_every == 0 else "train"
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{digest[:12]}.png")
        counts[split] = counts.get(split, 0) + 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=64, help="side of the written PNGs")
    parser.add_argument("--sets", default="emoji,icons,applogos,sprites")
    args = parser.parse_args()
    makers = {"emoji": emoji_pictures, "icons": theme_pictures, "applogos": app_logo_pictures, "sprites": sprite_pictures}
    for name in args.sets.split(","):
        counts = write_set(args.out / name, makers[name](args.size))
        print(f"{args.out / name}: {counts.get('train', 0)} train, {counts.get('test', 0)} test images")


if __name__ == "__main__":
    main()
