"""`pretrain/mae` and `finetune/mae`: the masked autoencoder on an ImageNet-style image dataset.

Both flows train with torchrun through the same loop, checkpoints and MLflow tracking as
AtmoRep (`flows.pretrain.train_and_register`). Their Prefect flow names are `pretrain`
and `finetune`, so their deployments sit beside `pretrain/atmorep` and `finetune/atmorep`.
The functions carry the same names because `prefect deploy --name FLOW/DEPLOYMENT`
(Prefect 3.9) matches FLOW against the function name of the entrypoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from data_catalog import Catalog, atmorep_home
from data_catalog.schema import ImageDatasetEntry
from flows.common import stage_run
from flows.evaluate import fetch_checkpoint
from flows.params import FinetuneMaeParams, PretrainMaeParams
from flows.pretrain import train_and_register, training_overrides
from models.checkpoint import load_model, save_checkpoint
from models.config import config_family, load_preset
from models.images import ImageDataset
from models.mae import MAERunConfig, masked_patch_loss, patch_targets, random_patch_mask, reconstruct
from models.mae_classifier import (
    ClassifierHeadConfig,
    ClassifierObjective,
    ClassifierRunConfig,
    classifier_from_pretrained,
    evaluate_classifier,
)
from tasks.plots import plot_reconstructions
from tasks.registry import resolve_model
from tasks.tracking import TAG_INIT_RUN, client, find_stage_run, log_metrics

RECONSTRUCTION_ARTIFACT = "plots/reconstructions.png"
# Seed of the images and masks of the reconstruction figure, fixed so that figures of
# different runs show the same images with the same hidden patches.
FIGURE_SEED = 0

# Classifier training settings that differ from the pretraining preset, per mode. Flow
# parameters (max_steps, batch_size, learning_rate, seed) override them.
CLASSIFIER_TRAIN = {
    "linear-probe": {"max_steps": 150, "lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 10},
    "full": {"max_steps": 150, "lr": 5e-4, "weight_decay": 0.05, "warmup_steps": 10},
}


def image_entry(name: str) -> ImageDatasetEntry:
    """Return the catalog entry of image dataset `name`, raising ValueError for another kind."""
    entry = Catalog().get(name)
    if not isinstance(entry, ImageDatasetEntry):
        raise ValueError(
            f"catalog dataset {name!r} has kind {entry.kind!r}, not images: give a dataset ingested with "
            "`atmorep ingest imagenet`"
        )
    return entry


@task(name="log-reconstructions")
def log_reconstructions(run_id: str, checkpoint: Path, zarr_path: Path, count: int) -> dict[str, float]:
    """Log the figure original | masked input | reconstruction + visible | reconstruction to the run.

    The figure shows `count` images drawn with FIGURE_SEED, whole and without
    augmentation, each with a random mask at the model's mask ratio. Returns the masked
    patch loss on those images as `reconstruction_loss`.
    """
    model, config = load_model(checkpoint)
    dataset = ImageDataset(zarr_path, image_size=config.model.image_size)
    count = min(count, len(dataset))
    indices = np.sort(np.random.default_rng(FIGURE_SEED).choice(len(dataset), size=count, replace=False))
    images = torch.stack([dataset[int(index)][0] for index in indices])
    generator = torch.Generator().manual_seed(FIGURE_SEED)
    mask = random_patch_mask(count, config.model.num_patches, config.model.mask_ratio, generator)

    with torch.no_grad():
        prediction = model(images, mask)
        target = patch_targets(images, config.model.patch_size, config.model.norm_pix_loss)
        loss = float(masked_patch_loss(prediction, target, mask))
    panels = reconstruct(model, images, mask, dataset.mean, dataset.std)
    title = f"masked autoencoder, {config.model.mask_ratio:.0%} of patches hidden, step {config.train.max_steps}"
    with tempfile.TemporaryDirectory() as folder:
        path = plot_reconstructions(panels.columns(), Path(folder) / Path(RECONSTRUCTION_ARTIFACT).name, title=title)
        client().log_artifact(run_id, str(path), artifact_path=str(Path(RECONSTRUCTION_ARTIFACT).parent))
    return {"reconstruction_loss": loss}


@flow(name="pretrain", flow_run_name="mae-{params.dataset}")
def pretrain(params: PretrainMaeParams = PretrainMaeParams()) -> dict:
    """Pretrain a masked autoencoder on a catalog image dataset, register it and log reconstructions.

    Returns the MLflow run id, the registered model URI, the final training loss and the
    masked patch loss of the figure's images.
    """
    entry = image_entry(params.dataset)
    config = load_preset(params.preset, {"train.dataset": params.dataset, **training_overrides(params)})
    if not isinstance(config, MAERunConfig):
        family = config_family(config.model_dump())
        raise ValueError(
            f"preset {params.preset!r} is for the {family} model family, not mae: give a preset with "
            "`family: mae`, such as mae-demo"
        )
    upstream = params.upstream_run_id or find_stage_run("ingest", entry.content_digest)

    with stage_run("pretrain", params, upstream_run_id=upstream, entry=entry) as run:
        trained = train_and_register("pretrain", config, params, run.run_id, params.register_as)
        figure = log_reconstructions(
            run.run_id, Path(trained["checkpoint"]), Catalog().resolve_zarr_path(entry), params.reconstruction_images
        )
        log_metrics(run.run_id, {"pretrain/reconstruction_loss": figure["reconstruction_loss"]})
    return {**trained, **figure, "reconstructions": RECONSTRUCTION_ARTIFACT}


def classifier_config(
    pretrained: MAERunConfig, params: FinetuneMaeParams, dataset: str, num_classes: int
) -> ClassifierRunConfig:
    """Return the classifier config: the pretrained model and augmentation, the mode's training defaults."""
    train = {**pretrained.train.model_dump(mode="json"), **CLASSIFIER_TRAIN[params.mode], "dataset": dataset}
    for dotted_key, value in training_overrides(params).items():
        train[dotted_key.removeprefix("train.")] = value
    train["warmup_steps"] = min(train["warmup_steps"], train["max_steps"] // 10)
    train["checkpoint_every"] = min(train["checkpoint_every"], train["max_steps"])
    return ClassifierRunConfig(
        model=pretrained.model,
        head=ClassifierHeadConfig(
            num_classes=num_classes,
            mode=params.mode,
            holdout_images=params.holdout_images,
            split_seed=params.split_seed,
        ),
        augment=pretrained.augment,
        train=train,
    )


@task(name="evaluate-classifier")
def score_classifier(checkpoint: Path, zarr_path: Path) -> dict[str, float]:
    """Return accuracy on the held-out and the training images, and the share of held-out images of seen classes."""
    model, config = load_model(checkpoint)
    objective = ClassifierObjective(config)
    dataset = objective.open_full_dataset(zarr_path, augment=False)
    train_indices, test_indices = objective.split(dataset)

    test = evaluate_classifier(model, dataset, test_indices)
    train = evaluate_classifier(model, dataset, train_indices)
    seen = np.isin(dataset.labels[test_indices], dataset.labels[train_indices]).mean()
    scores = {f"test/{name}": value for name, value in test.items() if not name.startswith("chance")}
    scores.update({f"train/{name}": value for name, value in train.items() if not name.startswith("chance")})
    scores.update({name: value for name, value in test.items() if name.startswith("chance")})
    scores["test/seen_class_fraction"] = float(seen)
    return scores


def classification_report(mode: str, scores: dict[str, float], classes: int) -> str:
    """Return the Markdown report of a classification run, with a warning when test classes were unseen."""
    lines = [
        f"# Masked autoencoder, {mode}",
        "",
        "| split | images | top-1 | top-5 |",
        "| --- | ---: | ---: | ---: |",
        f"| train | {scores['train/images']:.0f} | {scores['train/top1']:.3f} | {scores['train/top5']:.3f} |",
        f"| test (held out) | {scores['test/images']:.0f} | {scores['test/top1']:.3f} | {scores['test/top5']:.3f} |",
        f"| chance over {classes} classes | | {scores['chance_top1']:.3f} | {scores['chance_top5']:.3f} |",
        "",
        f"{scores['test/seen_class_fraction']:.0%} of the held-out images belong to a class that the "
        "training split contains.",
    ]
    if scores["test/seen_class_fraction"] < 0.5:
        lines += [
            "",
            "Most held-out classes never occur in training (one image per class, as in the ImageNet sample), so "
            "the classifier cannot predict them, and the test accuracy is near zero or chance whatever the "
            "encoder learnt. Only the train accuracy, which measures how well the head fits, carries information here.",
        ]
    return "\n".join(lines) + "\n"


@flow(name="finetune", flow_run_name="mae-{params.mode}")
def finetune(params: FinetuneMaeParams = FinetuneMaeParams()) -> dict:
    """Train a classifier on a pretrained masked autoencoder (linear probe or full), score and register it.

    Returns the MLflow run id, the registered model URI, the final training loss and the
    accuracies under `test/` and `train/`.
    """
    logger = get_run_logger()
    resolved = resolve_model(params.model_uri)
    checkpoint = fetch_checkpoint(resolved.run_id)
    pretrained_model, pretrained = load_model(checkpoint)
    if not isinstance(pretrained, MAERunConfig):
        raise ValueError(
            f"model {params.model_uri} is a {config_family(pretrained.model_dump())} model, not a masked "
            "autoencoder: give a model registered by `atmorep pretrain mae`, such as models:/mae/latest"
        )
    entry = image_entry(params.dataset or pretrained.train.dataset)
    zarr_path = Catalog().resolve_zarr_path(entry)
    config = classifier_config(pretrained, params, entry.name, num_classes=len(entry.classes))

    upstream = params.upstream_run_id or resolved.run_id
    with stage_run("finetune", params, upstream_run_id=upstream, entry=entry) as run:
        client().set_tag(run.run_id, TAG_INIT_RUN, resolved.run_id)
        init_checkpoint = atmorep_home() / "checkpoints" / run.run_id / "init.pt"
        initial = classifier_from_pretrained(pretrained_model, config)
        save_checkpoint(init_checkpoint, model=initial, config=config, step=0)
        trained = train_and_register(
            "finetune", config, params, run.run_id, params.registered_name, init_checkpoint=init_checkpoint
        )

        scores = score_classifier(Path(trained["checkpoint"]), zarr_path)
        log_metrics(run.run_id, {f"finetune/{name}": value for name, value in scores.items()})
        report = classification_report(params.mode, scores, len(entry.classes))
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "report.md"
            path.write_text(report)
            client().log_artifact(run.run_id, str(path))
        create_markdown_artifact(report, key=f"mae-{params.mode}", description="Classification accuracy")
        if scores["test/seen_class_fraction"] < 0.5:
            logger.warning(
                "only %.0f%% of the held-out images belong to classes seen in training: test accuracy "
                "(top-1 %.3f, chance %.3f) cannot measure the encoder", 100 * scores["test/seen_class_fraction"],
                scores["test/top1"], scores["chance_top1"],
            )
        logger.info(
            "%s: train top-1 %.3f, test top-1 %.3f, top-5 %.3f", params.mode,
            scores["train/top1"], scores["test/top1"], scores["test/top5"],
        )
    return {**trained, **scores}
