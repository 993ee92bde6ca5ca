import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from foundation.data import DataConfig, from_hf_dataset, held_in_memory, load_image_data, load_image_file
from foundation.errors import UserError
from foundation import data as data_module
from stage1_vqvae.train import TrainConfig, check_config
from tests.conftest import REPO, cpu_env, synthetic_images, write_image_folder


def test_fashion_mnist_from_idx_files_is_padded_to_32_with_labels_and_class_names(tiny_fashion):
    data = load_image_data(DataConfig())
    assert data.train.images.shape == (64, 1, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (37, 1, 32, 32)
    assert data.train.images[:, :, :2].sum() == 0  # the padding
    assert data.num_classes == 10 and data.class_names[9] == "Ankle boot"
    batch = data.train.__getitems__([3, 1])
    assert torch.equal(batch["images"], data.train.images[[3, 1]]) and batch["labels"].dtype == torch.int64


HUB_FASHION_NAMES = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def hub_copy_of(idx_dir, tmp_path):
    """An Arrow copy of the IDX files as the Hub stores Fashion-MNIST: PNG cells, its own class names."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=HUB_FASHION_NAMES)})
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = data_module.read_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = data_module.read_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz")
        rows = {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()}
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "hub_copy")
    return datasets.load_from_disk(tmp_path / "hub_copy")


@pytest.mark.parametrize("image_size", [32, 16])
def test_fashion_mnist_from_the_hub_gives_the_same_tensors_and_names_as_the_idx_files(tiny_fashion, tmp_path, monkeypatch, image_size):
    from_idx = load_image_data(DataConfig(image_size=image_size))
    hub_copy = hub_copy_of(tiny_fashion, tmp_path)
    monkeypatch.setattr(data_module, "_find_fashion_mnist", lambda: None)
    monkeypatch.setattr(data_module, "_load_hub", lambda dataset_id, fashion=False: hub_copy)
    from_hub = load_image_data(DataConfig(image_size=image_size))
    assert from_hub.source == data_module.FASHION_MNIST_HUB_ID
    assert from_hub.class_names == from_idx.class_names == data_module.FASHION_MNIST_CLASSES
    for split in ("train", "test"):
        idx_split, hub_split = getattr(from_idx, split), getattr(from_hub, split)
        assert torch.equal(hub_split.images, idx_split.images) and torch.equal(hub_split.labels, idx_split.labels)
    assert from_hub.train.images.shape[-1] == image_size


def test_folder_with_class_subfolders_gets_labels_and_a_seeded_split(tmp_path):
    write_image_folder(tmp_path / "images", per_class=10)
    config = DataConfig(dataset=str(tmp_path / "images"), image_size=16, test_fraction=0.25)
    data = load_image_data(config)
    assert len(data.train) + len(data.test) == 20 and len(data.test) == 5
    assert data.class_names == ["circles", "squares"] and data.channels == 1
    assert data.train.images.shape[1:] == (1, 16, 16)
    again = load_image_data(config)
    assert torch.equal(again.test.images, data.test.images)


def test_train_and_test_folders_with_the_images_directly_inside_are_unlabelled(tmp_path):
    """The split folders are not classes: one folder of images per split is no labelling."""
    for split, count in (("train", 6), ("test", 3)):
        (tmp_path / "images" / split).mkdir(parents=True)
        for i, array in enumerate(synthetic_images(count, 20, len(split))[0]):
            Image.fromarray(array).save(tmp_path / "images" / split / f"{i}.png")
    data = load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=16))
    assert (len(data.train), len(data.test)) == (6, 3)
    assert data.class_names is None and data.num_classes == 0 and data.train.labels is None


def test_class_folders_in_train_and_a_flat_test_folder_keep_the_train_labels(tmp_path):
    """A test split without classes is unlabelled; it no longer takes the train labels with it."""
    write_image_folder(tmp_path / "images" / "train", per_class=4)
    (tmp_path / "images" / "test").mkdir()
    for i, array in enumerate(synthetic_images(3, 20, 7)[0]):
        Image.fromarray(array).save(tmp_path / "images" / "test" / f"{i}.png")
    data = load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=8))
    assert data.class_names == ["circles", "squares"] and data.train.labels.tolist() == [0] * 4 + [1] * 4
    assert len(data.test) == 3 and data.test.labels is None


def test_a_folder_with_a_metadata_file_takes_its_columns_through_imagefolder(tmp_path):
    write_image_folder(tmp_path / "images", per_class=3)
    rows = ["file_name,style"] + [f"{kind}/{i}.png,{'bold' if i % 2 else 'plain'}" for kind in ("circles", "squares") for i in range(3)]
    (tmp_path / "images" / "metadata.csv").write_text("\n".join(rows) + "\n")
    data = load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=8, label_column="style", test_fraction=0.5))
    assert data.class_names == ["bold", "plain"] and len(data.train) + len(data.test) == 6


def test_folder_with_train_and_test_subfolders_and_rgb_images(tmp_path):
    write_image_folder(tmp_path / "images" / "train", per_class=4, mode="RGB")
    write_image_folder(tmp_path / "images" / "test", per_class=2, mode="RGB")
    data = load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=8))
    assert (len(data.train), len(data.test), data.channels) == (8, 4, 3)
    assert data.test.images.shape == (4, 3, 8, 8)


def test_hub_style_dataset_with_other_columns_and_string_labels():
    images = [Image.fromarray(np.full((12, 10), i * 20, dtype=np.uint8)) for i in range(6)]
    table = datasets.Dataset.from_dict({"img": images, "kind": ["b", "a", "b", "a", "b", "a"]})
    hub = datasets.DatasetDict({"train": table, "validation": table.select(range(2))})
    config = DataConfig(image_column="img", label_column="kind", test_split="validation", image_size=8)
    data = from_hf_dataset(hub, config, "someone/dataset")
    assert data.class_names == ["a", "b"] and data.train.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert data.train.images.shape == (6, 1, 8, 8)


def test_a_split_larger_than_the_memory_limit_is_decoded_on_the_fly(tmp_path):
    write_image_folder(tmp_path / "images", per_class=5)
    data = load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=8, max_memory_gb=0))
    item = data.train[0]
    assert isinstance(data.train, data_module.ArrowImages)
    assert item["images"].shape == (1, 8, 8) and item["images"].dtype == torch.uint8


@pytest.mark.parametrize("streaming", [False, True])
def test_a_bounded_sample_of_a_class_sorted_folder_holds_every_class(tmp_path, streaming):
    """A folder's files are read sorted by class, so its first images would be one class's:
    the judge's and the Frechet distances' samples are drawn from all over the split instead."""
    write_image_folder(tmp_path / "images" / "train", per_class=10)
    write_image_folder(tmp_path / "images" / "test", per_class=10)
    data = load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=8, max_memory_gb=0, streaming=streaming))
    sample = held_in_memory(data.train, limit=8)
    assert len(sample.labels) == 8 and set(sample.labels.tolist()) == {0, 1}
    assert torch.equal(held_in_memory(data.train, limit=8).images, sample.images)  # the same images every time
    if streaming:  # the test split is the stream's first images
        assert set(data.test.labels[:8].tolist()) == {0, 1}


# ---------------------------------------------------------------- bad input: one clear sentence each


def test_unreadable_image_names_the_file(tmp_path):
    write_image_folder(tmp_path / "images")
    (tmp_path / "images" / "squares" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png.*remove or replace"):
        load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=8, test_fraction=0.01))


def test_empty_split():
    images = [Image.new("L", (8, 8))] * 3
    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images}),
        "test": datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()})),
    })
    with pytest.raises(UserError, match="split 'test' of x/y holds no images"):
        from_hf_dataset(hub, DataConfig(image_size=8), "x/y")


def test_missing_column_lists_the_columns_there_are():
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"pixels": [1]}), "test": datasets.Dataset.from_dict({"pixels": [1]})})
    with pytest.raises(UserError, match=r"no column 'image' \(columns: pixels\); pass --image-column"):
        from_hf_dataset(hub, DataConfig(), "x/y")


def test_missing_split_lists_the_splits_there_are():
    hub = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8))]})})
    with pytest.raises(UserError, match=r"no split 'train' \(it has: validation\)"):
        from_hf_dataset(hub, DataConfig(), "x/y")


def test_folder_without_images(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="holds no images"):
        load_image_data(DataConfig(dataset=str(tmp_path / "empty")))


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image_data(DataConfig(dataset=str(tmp_path / "nowhere")))


def test_a_few_colour_files_turn_a_grayscale_set_rgb_and_channels_1_turns_it_back(tmp_path):
    write_image_folder(tmp_path / "images", per_class=3)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "images" / "squares" / "colour.png")
    config = DataConfig(dataset=str(tmp_path / "images"), image_size=8, test_fraction=0.3)
    data = load_image_data(config)
    images = torch.cat([data.train.images, data.test.images])
    assert data.channels == 3 and images.shape[1:] == (3, 8, 8)
    gray = (images[:, 0] == images[:, 1]).all(dim=(1, 2)) & (images[:, 1] == images[:, 2]).all(dim=(1, 2))
    assert gray.sum() == 6 and (~gray).sum() == 1  # the grayscale files keep their gray, the red one is red
    red = images[~gray][0]
    assert red[0].float().mean() > 200 and red[1:].float().mean() < 30
    as_gray = load_image_data(DataConfig(**{**config.__dict__, "channels": 1}))
    assert as_gray.channels == 1 and as_gray.train.images.shape[1] == 1


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1"])
def test_images_of_any_mode_are_converted(tmp_path, mode):
    write_image_folder(tmp_path / "images", per_class=3, mode="RGB")
    Image.new("RGB", (20, 20), (0, 200, 0)).convert(mode).save(tmp_path / "images" / "circles" / "odd.png")
    data = load_image_data(DataConfig(dataset=str(tmp_path / "images"), image_size=8, test_fraction=0.3))
    assert data.channels == 3 and torch.cat([data.train.images, data.test.images]).shape == (7, 3, 8, 8)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_white_whatever_colour_they_store(tmp_path, mode):
    icon = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent black, as many icons store it
    icon.paste((200, 0, 0, 255), (5, 5, 15, 15))
    icon.putpixel((0, 0), (255, 0, 255, 0))  # a transparent pixel holding stray magenta
    icon.convert(mode).save(tmp_path / "icon.png")
    channels = 3 if mode == "RGBA" else 1
    pixels = load_image_file(tmp_path / "icon.png", 20, channels)
    assert pixels[:, 0, 0].tolist() == [255] * channels and pixels[:, 19, 19].tolist() == [255] * channels
    assert pixels[:, 10, 10].tolist() == ([200, 0, 0] if mode == "RGBA" else [Image.new("RGB", (1, 1), (200, 0, 0)).convert("L").getpixel((0, 0))])


def test_channels_3_makes_fashion_mnist_rgb(tiny_fashion):
    data = load_image_data(DataConfig(channels=3))
    assert data.channels == 3 and data.train.images.shape[1:] == (3, 32, 32)
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2])


def test_a_flat_folder_is_unlabelled_with_a_seeded_held_out_split(tmp_path):
    for i, array in enumerate(synthetic_images(10, 20, 0)[0]):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    config = DataConfig(dataset=str(tmp_path), image_size=8, test_fraction=0.2)
    data = load_image_data(config)
    assert (len(data.train), len(data.test), data.class_names, data.train.labels) == (8, 2, None, None)
    assert torch.equal(load_image_data(config).test.images, data.test.images)


def test_nested_folders_take_the_class_of_the_folder_holding_each_image(tmp_path):
    for i, array in enumerate(synthetic_images(8, 20, 0)[0]):
        folder = tmp_path / ("outdoor" if i % 2 else "indoor") / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i}.png")
    data = load_image_data(DataConfig(dataset=str(tmp_path), image_size=8, test_fraction=0.25))
    assert data.class_names == ["cats", "dogs"] and len(data.train) + len(data.test) == 8


def test_a_hub_set_without_a_test_split_holds_out_a_seeded_fraction_unless_a_split_is_named():
    images = [Image.fromarray(np.full((12, 10), i * 20, dtype=np.uint8)) for i in range(10)]
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images})})
    data = from_hf_dataset(hub, DataConfig(image_size=8, test_fraction=0.3), "x/y")
    assert (len(data.train), len(data.test)) == (7, 3)
    with pytest.raises(UserError, match=r"no split 'validation' \(it has: train\)"):
        from_hf_dataset(hub, DataConfig(image_size=8, test_split="validation"), "x/y")


def test_a_label_column_typo_is_an_error_not_an_unconditional_run():
    images = [Image.new("L", (8, 8))] * 4
    table = datasets.Dataset.from_dict({"image": images, "kind": ["a", "b", "a", "b"]})
    hub = datasets.DatasetDict({"train": table, "test": table})
    with pytest.raises(UserError, match=r"--label-column knid is not a column of x/y \(columns: image, kind\)"):
        from_hf_dataset(hub, DataConfig(image_size=8, label_column="knid"), "x/y")
    assert from_hf_dataset(hub, DataConfig(image_size=8), "x/y").class_names is None  # the default 'label' may be absent


@pytest.mark.parametrize("size,downsample,message", [
    (30, 4, "cannot be divided by --downsample 4; use a multiple of 4, e.g. 32"),
    (32, 3, "is not a power of two"),
])
def test_image_size_the_downsampling_cannot_divide(size, downsample, message):
    with pytest.raises(UserError, match=message):
        check_config(TrainConfig(image_size=size, downsample=downsample))


def test_no_local_fashion_mnist_and_no_hub_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("VQ_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "none"))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'zalando-datasets/fashion_mnist' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist.*VQ_DATA_DIR"):
        load_image_data(DataConfig())


def test_corrupt_idx_file(tmp_path, monkeypatch):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    monkeypatch.setenv("VQ_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="is not a readable IDX file"):
        load_image_data(DataConfig())


def test_the_command_line_prints_one_sentence_and_no_traceback(tmp_path):
    command = [sys.executable, str(REPO / "stage1_vqvae" / "train.py"), "--run-dir", str(tmp_path), "--dataset", str(tmp_path / "missing")]
    completed = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --dataset") and "does not exist" in lines[-1]
    assert "Traceback" not in completed.stderr


def test_a_streamed_folder_gives_two_processes_parts_that_hold_every_image_once_per_epoch(tmp_path):
    """split_dataset_by_node after a seeded shuffle: together the parts are the split, each
    epoch, in another order every epoch."""
    from collections import Counter

    folder = write_image_folder(tmp_path / "images", per_class=10, mode="RGB")
    data = load_image_data(DataConfig(dataset=str(folder), image_size=8, streaming=True, test_fraction=0.2, shuffle_buffer=4))
    assert type(data.train).__name__ == "StreamedImages" and data.class_names == ["circles", "squares"]
    assert data.test.images.shape == (4, 3, 8, 8) and data.test.labels is not None  # the test split: in memory
    whole = Counter(image.numpy().tobytes() for image in data.train.head(100).images)
    assert sum(whole.values()) == 16 and len(whole) == 16
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            part = data.train.for_process(rank, 2)
            part.set_epoch(epoch)
            seen += [item["images"].numpy().tobytes() for item in part]
        assert Counter(seen) == whole
        orders.append(seen)
    assert orders[0] != orders[1]
    # DataLoader workers share a part out among themselves (datasets shards it), never read it twice
    part = data.train.for_process(0, 1)
    loader = torch.utils.data.DataLoader(part, batch_size=1, collate_fn=data_module.collate_batches, num_workers=2)
    assert Counter(batch["images"][0].numpy().tobytes() for batch in loader) == whole


def test_streaming_refuses_fashion_mnist_and_plain_label_values_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="Fashion-MNIST is small enough to hold in memory, so drop the flag"):
        load_image_data(DataConfig(streaming=True))
    images = [Image.fromarray(np.full((8, 8), i * 20, dtype=np.uint8)) for i in range(4)]
    table = datasets.Dataset.from_dict({"image": images, "kind": ["b", "a", "b", "a"]})
    streams = {"train": table.to_iterable_dataset(), "test": table.to_iterable_dataset()}
    with pytest.raises(UserError, match="holds plain values, whose classes a stream cannot list"):
        data_module.from_streams(streams, DataConfig(label_column="kind", streaming=True), "someone/dataset")
    with pytest.raises(UserError, match="has no split 'test' .* a stream has no length to hold a fraction out of"):
        data_module.from_streams({"train": streams["train"]}, DataConfig(streaming=True), "someone/dataset")


@pytest.mark.parametrize("kind", ["16-bit PNG", "float TIFF in [0, 1]", "32-bit integer TIFF of 16-bit values"])
def test_deep_grayscale_images_are_scaled_to_8_bits_not_clipped(tmp_path, kind):
    """A ramp from black to white in each depth comes back as the same ramp in 8 bits."""
    ramp = np.linspace(0.0, 1.0, 16)[None].repeat(16, 0)
    if kind == "16-bit PNG":
        Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(path := tmp_path / "scan.png")
    elif kind.startswith("float"):
        Image.fromarray(ramp.astype(np.float32), mode="F").save(path := tmp_path / "scan.tiff")
    else:
        Image.fromarray((ramp * 65535).round().astype(np.int32), mode="I").save(path := tmp_path / "scan.tiff")
    pixels = load_image_file(path, 16, 1)[0].numpy().astype(int)
    assert np.abs(pixels - (ramp * 255).round()).max() <= 1, pixels[0]


def test_a_runs_first_test_images_are_decoded_alone(tmp_path, monkeypatch):
    """The page and pipelines.complete show a few test images; the rest of the folder stays unread."""
    import json

    folder = write_image_folder(tmp_path / "images", per_class=30, mode="RGB")
    config = DataConfig(dataset=str(folder), image_size=16, test_fraction=0.2)
    everything = load_image_data(config)
    run = tmp_path / "run" / "vqvae"
    run.mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps(config.__dict__))
    decoded, decode = [], data_module.to_uint8_tensor
    monkeypatch.setattr(data_module, "to_uint8_tensor", lambda *args: decoded.append(args[-1]) or decode(*args))
    images, labels = data_module.run_test_images(tmp_path / "run", 5, channels=3)
    assert len(decoded) == 5 and torch.equal(images, everything.test.images[:5]) and torch.equal(labels, everything.test.labels[:5])

