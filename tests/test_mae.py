"""Tests of the masked autoencoder (`models.mae`), the image dataset (`models.images`) and the reconstruction figure.

The dataset and training tests read the real 1,000-image ImageNet sample, ingested once
at 64 pixels into a temporary catalog.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import yaml
import zarr
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from data_catalog import Catalog
from data_catalog.catalog import DatasetNotFoundError, InvalidCatalogEntryError
from models.config import TrainConfig
from models.images import ImageAugmentConfig, ImageDataset, denormalise, normalise
from models.mae import (
    MAEConfig,
    MAEObjective,
    MAERunConfig,
    MaskedAutoencoder,
    expand_patch_mask,
    masked_patch_loss,
    patch_targets,
    patchify,
    random_patch_mask,
    reconstruct,
    sincos_position_embedding,
    unpatchify,
    visible_patch_count,
)
from tasks.imagenet import ingest_imagenet
from tasks.plots import plot_reconstructions

PRESET = Path(__file__).resolve().parents[1] / "models" / "presets" / "mae-demo.yaml"
SAMPLE_NAME = "imagenet-sample"
STORED_SIZE = 64
SMALL = {
    "image_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4,
    "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4,
}
TRAIN_STEPS = 40
BATCH = 32


@pytest.fixture(scope="module")
def sample_store(data_mirror, tmp_path_factory) -> tuple[Path, Path]:
    """The real ImageNet sample ingested at 64 pixels: (catalog root, Zarr store)."""
    root = tmp_path_factory.mktemp("atmorep-home")
    result = ingest_imagenet(
        data_mirror / "images" / "imagenet-sample", SAMPLE_NAME, size=STORED_SIZE, workers=2, catalog=Catalog(root)
    )
    return root, result.zarr_path


def small_run_config(**model: object) -> MAERunConfig:
    return MAERunConfig(
        model=MAEConfig(**{**SMALL, **model}),
        augment=ImageAugmentConfig(min_crop_scale=0.5),
        train=TrainConfig(dataset=SAMPLE_NAME, seed=0),
    )


# --- patches, masks and targets ------------------------------------------------------------------


def test_patchify_round_trip_and_order():
    images = torch.randn(2, 3, 12, 12)
    patches = patchify(images, 4)

    assert patches.shape == (2, 9, 48)
    assert torch.equal(unpatchify(patches, 4), images)
    # Patch 5 is row 1, column 2 of the 3 x 3 grid, with values ordered channel, row, column.
    assert torch.equal(patches[1, 5], images[1, :, 4:8, 8:12].reshape(-1))


def test_expand_patch_mask_covers_patch_pixels():
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 5] = True

    pixels = expand_patch_mask(mask, 4)

    assert pixels.shape == (1, 1, 12, 12)
    assert bool(pixels[0, 0, 4:8, 8:12].all())
    assert int(pixels.sum()) == 16


@pytest.mark.parametrize(("num_patches", "mask_ratio"), [(64, 0.75), (49, 0.75), (196, 0.6), (16, 0.5)])
def test_random_mask_visible_count(num_patches, mask_ratio):
    mask = random_patch_mask(8, num_patches, mask_ratio, torch.Generator().manual_seed(3))
    expected_visible = round(num_patches * (1 - mask_ratio))

    assert mask.dtype == torch.bool
    assert mask.shape == (8, num_patches)
    assert (~mask).sum(dim=1).tolist() == [expected_visible] * 8
    assert visible_patch_count(num_patches, mask_ratio) == expected_visible


def test_random_mask_reproducible_per_seed():
    first = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(7))
    again = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(7))
    other = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) == 4


def test_random_mask_ignores_global_rng():
    torch.manual_seed(0)
    first = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    torch.rand(10)
    second = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(7))

    assert torch.equal(first, second)


def test_norm_pix_targets_hand_computed():
    # One 2 x 2 RGB image is one patch whose 12 values, in channel-row-column order, are 0 ... 11.
    images = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)

    raw = patch_targets(images, 2, norm_pix_loss=False)
    normalised = patch_targets(images, 2, norm_pix_loss=True)

    assert raw.tolist() == [[list(map(float, range(12)))]]
    # mean 5.5, population variance (12**2 - 1) / 12 = 143 / 12
    expected = [(value - 5.5) / math.sqrt(143 / 12 + 1e-6) for value in range(12)]
    assert normalised[0, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert normalised[0, 0, 0].item() == pytest.approx(-1.593255, rel=1e-5)


def test_norm_pix_targets_constant_patch_zero():
    images = torch.full((1, 3, 4, 4), 7.0)

    assert torch.count_nonzero(patch_targets(images, 4, norm_pix_loss=True)) == 0


def test_sincos_position_embedding_values():
    embedding = sincos_position_embedding(grid_size=2, dim=4)

    # dim 4: one frequency (1) per axis, laid out [sin(row), cos(row), sin(column), cos(column)].
    assert embedding.shape == (4, 4)
    assert embedding[2].tolist() == pytest.approx([math.sin(1), math.cos(1), 0.0, 1.0])
    assert embedding[1].tolist() == pytest.approx([0.0, 1.0, math.sin(1), math.cos(1)])


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"image_size": 30}, "model.image_size 30 is not a multiple of model.patch_size 4"),
        ({"embed_dim": 66}, "model.embed_dim 66 is not divisible by model.num_heads 4"),
        ({"decoder_embed_dim": 30, "decoder_num_heads": 3}, "model.decoder_embed_dim 30 is not a multiple of 4"),
        ({"mask_ratio": 0.995}, "leaves 0 of 64 patches visible"),
        ({"mask_ratio": 0.005}, "leaves 64 of 64 patches visible"),
        ({"mask_ratio": 0.0}, "greater than 0"),
        ({"mask_ratio": 1.0}, "less than 1"),
        ({"depth": 0}, "greater than 0"),
        ({"dropout": 0.1}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_invalid_settings(settings, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        MAEConfig(**{**SMALL, **settings})


def test_config_learned_positions_any_dim():
    config = MAEConfig(**{**SMALL, "embed_dim": 66, "num_heads": 3, "position_embedding": "learned"})

    assert config.num_patches == 64
    assert config.patch_values == 48


def test_demo_preset_validates():
    config = MAERunConfig.model_validate(yaml.safe_load(PRESET.read_text()))

    assert config.model.num_patches == 64
    assert visible_patch_count(config.model.num_patches, config.model.mask_ratio) == 16
    assert config.train.dataset == SAMPLE_NAME


# --- the network -------------------------------------------------------------------------------


@pytest.mark.parametrize("position_embedding", ["sincos", "learned"])
def test_model_output_shapes(position_embedding):
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig(**SMALL, position_embedding=position_embedding))
    images = torch.randn(3, 3, 32, 32)
    mask = random_patch_mask(3, 64, 0.75, torch.Generator().manual_seed(0))

    assert model(images, mask).shape == (3, 64, 48)
    assert model.encode(images).shape == (3, 64)


def test_model_rejects_bad_inputs():
    model = MaskedAutoencoder(MAEConfig(**SMALL))
    images = torch.randn(2, 3, 32, 32)
    uneven = torch.zeros(2, 64, dtype=torch.bool)
    uneven[0, :48] = True

    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 32, 32\]"):
        model(torch.randn(2, 3, 16, 16), uneven)
    with pytest.raises(ValueError, match="same positive number of visible patches"):
        model(images, uneven)
    with pytest.raises(ValueError, match="mask must be bool"):
        model(images, uneven.float())


def test_encoder_sees_visible_patches_only():
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig(**SMALL)).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = random_patch_mask(2, 64, 0.75, torch.Generator().manual_seed(1))
    hidden_pixels = expand_patch_mask(mask, 4)
    changed = torch.where(hidden_pixels, torch.randn_like(images) * 5, images)

    with torch.no_grad():
        assert torch.allclose(model(images, mask), model(changed, mask), atol=1e-6)
        assert not torch.allclose(model.encode(images), model.encode(changed))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_visible_patches(norm_pix_loss):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    prediction = torch.randn(4, 64, 48)
    mask = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(2))
    visible_pixels = ~expand_patch_mask(mask, 4)
    changed_visible = torch.where(visible_pixels, torch.randn_like(images) * 3, images)
    changed_hidden = torch.where(visible_pixels, images, images + 1.0 + images**2)

    loss = masked_patch_loss(prediction, patch_targets(images, 4, norm_pix_loss), mask)
    loss_visible = masked_patch_loss(prediction, patch_targets(changed_visible, 4, norm_pix_loss), mask)
    loss_hidden = masked_patch_loss(prediction, patch_targets(changed_hidden, 4, norm_pix_loss), mask)

    assert loss_visible.item() == pytest.approx(loss.item(), rel=1e-6)
    assert loss_hidden.item() != pytest.approx(loss.item(), rel=1e-3)


def test_objective_loss_under_bf16_autocast():
    objective = MAEObjective(small_run_config())
    torch.manual_seed(0)
    model = objective.build_model()
    batch = (torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = objective.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()

    assert loss.dtype == torch.float32
    assert math.isfinite(loss.item())
    assert model.mask_token.grad is not None
    assert model.patch_embedding.weight.grad.abs().sum() > 0


def test_loss_hand_computed():
    prediction = torch.zeros(1, 2, 3)
    target = torch.tensor([[[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]]])
    mask = torch.tensor([[True, False]])

    # Only patch 0 counts: (1 + 4 + 9) / 3.
    assert masked_patch_loss(prediction, target, mask).item() == pytest.approx(14 / 3)


# --- the image dataset -------------------------------------------------------------------------


def test_dataset_normalises_with_stored_statistics(sample_store):
    _, store = sample_store
    group = zarr.open_group(store, mode="r")
    statistics = group.attrs["statistics"]
    dataset = ImageDataset(store)

    image, label = dataset[17]
    mean = torch.tensor(statistics["mean"])
    std = torch.tensor(statistics["std"])
    expected = (torch.from_numpy(group["images"][17].astype(np.float32)).permute(2, 0, 1) - mean[:, None, None]) / std[
        :, None, None
    ]

    assert len(dataset) == 1000
    assert image.shape == (3, STORED_SIZE, STORED_SIZE)
    assert image.dtype == torch.float32
    assert torch.allclose(image, expected, atol=1e-5)
    assert label.dtype == torch.int64
    assert int(label) == int(group["label"][17])
    assert torch.allclose(denormalise(normalise(image, mean, std), mean, std), image, atol=1e-4)


def test_dataset_lazy_reads_match_memory(sample_store):
    _, store = sample_store
    augment = ImageAugmentConfig()
    in_memory = ImageDataset(store, image_size=32, augment=augment, seed=1)
    lazy = ImageDataset(store, image_size=32, augment=augment, seed=1, max_in_memory_bytes=0)

    assert isinstance(in_memory.pixels, np.ndarray)
    assert isinstance(lazy.pixels, zarr.Array)
    for index in (0, 63, 64, 999):
        assert torch.equal(lazy[index][0], in_memory[index][0])
        assert torch.equal(lazy[index][1], in_memory[index][1])


def test_dataset_channel_moments_near_standard(sample_store):
    _, store = sample_store
    dataset = ImageDataset(store)
    images = torch.stack([dataset[index][0] for index in range(len(dataset))])

    channel_mean = images.mean(dim=(0, 2, 3))
    channel_std = images.std(dim=(0, 2, 3), unbiased=False)
    assert channel_mean.abs().max().item() < 1e-3
    assert (channel_std - 1).abs().max().item() < 1e-3


def test_dataset_augmentation_seeded_by_epoch(sample_store):
    _, store = sample_store
    dataset = ImageDataset(store, image_size=32, augment=ImageAugmentConfig(min_crop_scale=0.3), seed=5)

    first = dataset[3][0]
    again = ImageDataset(store, image_size=32, augment=ImageAugmentConfig(min_crop_scale=0.3), seed=5)[3][0]
    boxes = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        boxes.add(dataset.crop_box(3))
    dataset.set_epoch(0)

    assert first.shape == (3, 32, 32)
    assert torch.equal(first, again)
    assert torch.equal(dataset[3][0], first)
    assert len(boxes) > 1
    for top, left, side, _flip in boxes:
        assert 0.3 * STORED_SIZE**2 <= side**2 * 1.05
        assert 0 <= top <= STORED_SIZE - side
        assert 0 <= left <= STORED_SIZE - side


def test_dataset_rejects_missing_and_non_image_stores(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageDataset(tmp_path / "absent.zarr")

    group = zarr.open_group(tmp_path / "fields.zarr", mode="w")
    group.create_array("t2m", shape=(4, 3, 3), dtype="float32")
    with pytest.raises(ValueError, match=r"has no \['images', 'label'\] arrays"):
        ImageDataset(tmp_path / "fields.zarr")


def test_objective_opens_catalog_dataset(sample_store, monkeypatch):
    root, _ = sample_store
    monkeypatch.setenv("ATMOREP_HOME", str(root))

    dataset = MAEObjective(small_run_config()).open_dataset(None)
    assert len(dataset) == 1000
    assert dataset[0][0].shape == (3, 32, 32)

    missing = MAERunConfig(model=MAEConfig(**SMALL), train=TrainConfig(dataset="no-such-images"))
    with pytest.raises(DatasetNotFoundError, match="no-such-images"):
        MAEObjective(missing).open_dataset(None)


def test_objective_rejects_foreign_store(sample_store, tmp_path, monkeypatch):
    root, store = sample_store
    catalog = Catalog(root)
    entry = catalog.get(SAMPLE_NAME)
    # An entry that points at a store of another ingest run (a different recipe digest).
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    zarr.open_group(other, mode="r+").attrs["digest"] = "0" * 64
    foreign = Catalog(tmp_path / "home")
    foreign.publish(entry.model_copy(update={"zarr_path": str(other)}))
    monkeypatch.setenv("ATMOREP_HOME", str(tmp_path / "home"))

    with pytest.raises(InvalidCatalogEntryError, match="Re-ingest dataset 'imagenet-sample'"):
        MAEObjective(small_run_config()).open_dataset(None)


# --- training on the real sample and the reconstruction figure ------------------------------------


@pytest.fixture(scope="module")
def trained(sample_store):
    """A small MAE trained for 40 steps on the real sample with a plain loop: (objective, model, dataset, losses)."""
    _, store = sample_store
    objective = MAEObjective(small_run_config())
    torch.manual_seed(0)
    model = objective.build_model()
    dataset = objective.open_dataset(store)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(1)

    losses: list[float] = []
    epoch = 0
    # One thread, as the training entry point uses by default: small steps slow down many times
    # over when two threads compete with other processes for two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        while len(losses) < TRAIN_STEPS:
            dataset.set_epoch(epoch)
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch))
            for batch in DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True):
                loss, metrics = objective.loss(model, batch, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                assert metrics == {}
                if len(losses) == TRAIN_STEPS:
                    break
            epoch += 1
    finally:
        torch.set_num_threads(threads)
    return objective, model, dataset, losses


def evaluation_batch(store: Path, count: int) -> tuple[ImageDataset, torch.Tensor, torch.Tensor]:
    """The first `count` images at 32 pixels without augmentation, and a fixed mask."""
    dataset = ImageDataset(store, image_size=32)
    images = torch.stack([dataset[index][0] for index in range(count)])
    mask = random_patch_mask(count, 64, 0.75, torch.Generator().manual_seed(123))
    return dataset, images, mask


def test_training_loss_decreases(trained, sample_store):
    objective, model, _, losses = trained
    _, images, mask = evaluation_batch(sample_store[1], 64)
    target = patch_targets(images, 4, norm_pix_loss=False)
    untrained = objective.build_model()

    with torch.no_grad():
        trained_loss = masked_patch_loss(model(images, mask), target, mask).item()
        untrained_loss = masked_patch_loss(untrained(images, mask), target, mask).item()
    # Predicting 0 everywhere is predicting the dataset's mean colour.
    mean_colour_loss = masked_patch_loss(torch.zeros_like(target), target, mask).item()

    assert all(math.isfinite(value) for value in losses)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    assert trained_loss < 0.8 * untrained_loss
    assert trained_loss < 0.9 * mean_colour_loss


def test_reconstruction_figure(trained, sample_store, tmp_path):
    objective, model, _, _ = trained
    dataset, images, mask = evaluation_batch(sample_store[1], 4)

    panels = reconstruct(model, images, mask, dataset.mean, dataset.std)
    path = plot_reconstructions(panels.columns(), tmp_path / "plots" / "reconstructions.png", title="step 40")

    visible = ~expand_patch_mask(mask, 4).permute(0, 2, 3, 1).numpy()
    hidden = ~visible
    assert model.training
    assert list(panels.columns()) == ["original", "masked input", "reconstruction + visible", "reconstruction"]
    for name, panel in panels.columns().items():
        assert panel.shape == (4, 32, 32, 3), name
        assert panel.min() >= 0.0, name
        assert panel.max() <= 1.0, name
    assert np.allclose(np.where(visible, panels.pasted, 0), np.where(visible, panels.original, 0), atol=1e-5)
    assert np.allclose(np.where(hidden, panels.pasted, 0), np.where(hidden, panels.reconstruction, 0), atol=1e-5)
    assert np.all(panels.masked[np.broadcast_to(hidden, panels.masked.shape)] == 0.5)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (4 * 200, 4 * 200 + 40)
    assert list(path.parent.iterdir()) == [path]


def test_reconstruction_norm_pix_uses_patch_statistics(sample_store):
    dataset, images, mask = evaluation_batch(sample_store[1], 2)
    model = MaskedAutoencoder(MAEConfig(**SMALL, norm_pix_loss=True))
    # A model that predicts 0 for every standardised value reconstructs each patch as its own mean.
    torch.nn.init.zeros_(model.decoder_head.weight)
    torch.nn.init.zeros_(model.decoder_head.bias)

    panels = reconstruct(model, images, mask, dataset.mean, dataset.std)
    # Each patch is standardised over all three channels, so the mean is one number per patch.
    expected = unpatchify(patchify(images, 4).mean(dim=-1, keepdim=True).expand(-1, -1, 48), 4)
    expected_rgb = (denormalise(expected, dataset.mean, dataset.std) / 255).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    assert np.allclose(panels.reconstruction, expected_rgb, atol=1e-5)


def test_plot_reconstructions_rejects_mismatched_panels(tmp_path):
    with pytest.raises(ValueError, match="same positive number of images"):
        plot_reconstructions({"a": np.zeros((2, 8, 8, 3)), "b": np.zeros((3, 8, 8, 3))}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="not RGB images"):
        plot_reconstructions({"a": np.zeros((2, 8, 8))}, tmp_path / "x.png")


def test_objective_protocol_helpers():
    objective = MAEObjective(small_run_config())
    model = objective.build_model()

    assert len(objective.checkpoint_modules(model)) == SMALL["depth"] + SMALL["decoder_depth"]
    assert objective.tokens_per_sample() == 64
