"""The bundled example trainers: every method trains for a few real steps on digits, runs are
deterministic and resumable, the pieces (augmentations, kNN, probe, monitors, loaders) do what
they claim, and the script runs under torchrun with two gloo processes."""
import math
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the examples train on scikit-learn's digits")
pytest.importorskip("tqdm", reason="the examples show tqdm progress bars")

from fastssl.examples import data, evaluate, train  # noqa: E402
from fastssl.examples.augment import Augment, random_resized_crop  # noqa: E402
from fastssl.examples.methods import METHODS  # noqa: E402

TINY = ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "24"]
EPOCH_LINE = re.compile(r"epoch +(\d+)/(\d+)  loss (-?[0-9.]+)  lr ([0-9.e+-]+) +\d+ img/s  loss kernels +[0-9.]+%  "
                        r"feature std [0-9.]+ \(1/√D [0-9.]+\)  eff. rank +[0-9.]+/\d+")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_few_steps_and_reports(method, capsys):
    result = train.run(["--method", method] + TINY)
    out = capsys.readouterr().out
    lines = EPOCH_LINE.findall(out)
    assert [(int(e), int(n)) for e, n, _, _ in lines] == [(1, 2), (2, 2)]
    losses = [record["loss"] for record in result["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert [float(v) for _, _, v, _ in lines] == pytest.approx(losses, abs=1e-4)
    for record in result["history"]:
        assert 0 < record["loss_time_share"] < 1 and record["images_per_second"] > 0
        assert 0 < record["effective_rank"] <= 128 and 0 <= record["feature_std"] <= 1
    for accuracies in (result["trained"], result["random_init"]):
        assert set(accuracies) == {"knn", "linear"} and all(0.5 < v <= 1 for v in accuracies.values())
    assert re.search(r"kNN-5 [0-9.]+% trained vs [0-9.]+% at random init \([+-][0-9.]+ points\); "
                     r"linear probe [0-9.]+% trained vs [0-9.]+% at random init", out)


def test_same_seed_same_run_other_seed_other_run():
    args = ["--method", "moco"] + TINY  # momentum encoder and memory bank: the most state
    threads = torch.get_num_threads()
    first, second = train.run(args), train.run(args)
    other = train.run(args + ["--seed", "1", "--threads", str(threads + 1)])
    assert torch.get_num_threads() == threads  # runs set their own thread count, then restore the caller's

    def losses(result):
        return [record["loss"] for record in result["history"]]

    assert losses(first) == losses(second) and first["trained"] == second["trained"]
    assert losses(first) != losses(other)


def test_resume_from_a_checkpoint_replays_the_uninterrupted_run(tmp_path, monkeypatch):
    args = ["--method", "swav", "--local-crops", "2", "--queue-size", "48"] + TINY  # queues in the checkpoint
    uninterrupted = train.run(args + ["--checkpoint-dir", str(tmp_path / "full")])
    assert (tmp_path / "full" / "swav.pt").exists()

    save = train.save_checkpoint

    def save_then_crash(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(args + ["--checkpoint-dir", str(tmp_path / "crashed")])
    monkeypatch.setattr(train, "save_checkpoint", save)
    resumed = train.run(args + ["--resume", str(tmp_path / "crashed" / "swav.pt")])
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in uninterrupted["history"]]
    assert resumed["trained"] == uninterrupted["trained"]
    assert resumed["random_init"] == uninterrupted["random_init"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "byol", "--temperature", "0.1"], "--temperature is not a hyper-parameter of byol"),
    (["--method", "simclr", "--arch", "vgg"], "invalid choice: 'vgg'"),
])
def test_bad_command_lines_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.run(argv)
    assert message in capsys.readouterr().err


def test_patch_methods_need_the_vit_and_run_on_it_by_default(capsys):
    with pytest.raises(ValueError, match="dinov2 needs patch tokens: --arch vit"):
        train.run(["--method", "dinov2", "--arch", "cnn"] + TINY)
    train.run(["--method", "mae"] + TINY)
    assert "vit backbone (128 features), batch 24 × 1+0 crops" in capsys.readouterr().out


def test_dinov2_trains_with_dinov2s_sinkhorn_knopp_teacher():
    result = train.run(["--method", "dinov2", "--centering", "sinkhorn_knopp"] + TINY)
    assert all(math.isfinite(record["loss"]) for record in result["history"])


def test_dinov2_masks_follow_dinov2s_ratios_and_the_seed():
    from types import SimpleNamespace

    from fastssl.examples.methods import DINOv2
    from fastssl.examples.models import build_backbone

    backbone, features, _ = build_backbone("vit", (1, 8, 8), torch.zeros(1), torch.ones(1))
    config = SimpleNamespace(**train.hyper_parameters("dinov2"), gather=False, backend="auto", seed=0)
    method = DINOv2(backbone, features, config)
    method.start_step(3, 10, 0)
    mask = method.draw_masks(torch.zeros(20, 1, 8, 8))
    assert mask.shape == (20, 4, 4)
    # Half the images masked, 10% … 50% of their 16 patches (rounded down), the rest not at all.
    assert mask.flatten(1).sum(1).tolist() == [int(r * 16) for r in torch.linspace(0.1, 0.5, 10)] + [0] * 10
    assert torch.equal(mask, method.draw_masks(torch.zeros(20, 1, 8, 8)))
    method.start_step(4, 10, 0)
    assert not torch.equal(mask, method.draw_masks(torch.zeros(20, 1, 8, 8)))


def test_dinov2_ibot_teacher_follows_dinos_temperature_warm_up(monkeypatch):
    from types import SimpleNamespace

    from fastssl.examples.methods import DINOv2
    from fastssl.examples.models import build_backbone

    backbone, features, _ = build_backbone("vit", (1, 8, 8), torch.zeros(1), torch.ones(1))
    config = SimpleNamespace(**{**train.hyper_parameters("dinov2"), "teacher_temp": 0.07,
                                "warmup_teacher_temp_epochs": 4}, gather=False, backend="auto", seed=0)
    method = DINOv2(backbone, features, config)
    temperatures = []
    ibot_forward = type(method.ibot).forward

    def recording_forward(module, teacher_out, student_out, mask, teacher_temp=None, **kwargs):
        temperatures.append(teacher_temp)
        return ibot_forward(module, teacher_out, student_out, mask, teacher_temp, **kwargs)

    monkeypatch.setattr(type(method.ibot), "forward", recording_forward)
    views = [torch.rand(8, 1, 8, 8) for _ in range(2)] + [torch.rand(8, 1, 6, 6) for _ in range(2)]
    for epoch in (0, 2, 5):
        method.start_step(epoch, 10, epoch)
        method.loss(*method(views))
    # DINO's schedule: 0.04 → 0.07 linearly over epochs 0 … 3, then 0.07; iBOT gets the same.
    assert temperatures == pytest.approx([0.04, 0.06, 0.07])
    assert temperatures == pytest.approx([method.dino.teacher_temperature(e) for e in (0, 2, 5)])


def test_mae_decoder_puts_kept_tokens_back_at_their_patches():
    from fastssl.examples.models import MAEDecoder

    decoder = MAEDecoder(encoder_dim=3, num_patches=5, pixels=2, dim=4, depth=1, heads=2)
    captured = {}
    decoder.blocks.register_forward_hook(lambda module, inputs, output: captured.update(tokens=inputs[0]))
    tokens = torch.randn(2, 3, 3)
    keep = torch.tensor([[4, 1], [0, 2]])
    assert decoder(tokens, keep).shape == (2, 5, 2)
    placed = captured["tokens"] - decoder.position
    embedded = decoder.embed(tokens)
    for row in range(2):
        torch.testing.assert_close(placed[row, 0], embedded[row, 0])
        for slot, patch in enumerate(keep[row].tolist()):
            torch.testing.assert_close(placed[row, 1 + patch], embedded[row, 1 + slot])
        for patch in set(range(5)) - set(keep[row].tolist()):
            torch.testing.assert_close(placed[row, 1 + patch], decoder.mask_token[0, 0])


def test_bad_batch_size_and_data_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="--batch-size must give every process at least 2 rows"):
        train.run(["--batch-size", "1"])
    with pytest.raises(ValueError, match="--data must be a directory"):
        train.run(["--data", str(tmp_path / "missing")])
    (tmp_path / "only_class").mkdir()
    with pytest.raises(ValueError, match="at least two class folders"):
        train.run(["--data", str(tmp_path)])


def test_digits_protocol_split_is_stratified_70_30():
    digits = data.load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and 0 <= digits.images.min() and digits.images.max() == 1
    assert len(digits.train_index) == 1257 and len(digits.test_index) == 540
    assert len(set(digits.train_index.tolist()) | set(digits.test_index.tolist())) == 1797
    share = torch.bincount(digits.labels[digits.test_index]) / torch.bincount(digits.labels)
    assert share.min() > 0.28 and share.max() < 0.32
    tuning = data.validation_split(digits)
    assert set(tuning.test_index.tolist()) <= set(digits.train_index.tolist())
    assert set(tuning.train_index.tolist()).isdisjoint(tuning.test_index.tolist())


def test_augment_views_are_valid_random_and_seeded():
    images = data.load_digits().images[:37]
    augment = Augment(8, natural=False, global_crops=2, local_crops=3, local_size=5)
    views = augment(images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(37, 1, 8, 8)] * 2 + [(37, 1, 5, 5)] * 3
    assert all(v.min() >= 0 and v.max() <= 1 for v in views)
    assert not torch.equal(views[0], views[1])
    again = augment(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    rgb = Augment(6, natural=True)(torch.rand(5, 3, 6, 6), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in rgb] == [(5, 3, 6, 6)] * 2 and all(0 <= v.min() and v.max() <= 1 for v in rgb)


def test_random_resized_crop_of_the_whole_image_is_the_identity_or_its_mirror():
    images = torch.rand(4, 3, 7, 7, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    same = random_resized_crop(images, 7, (1.0, 1.0), (1.0, 1.0), 0.0, False, generator, "zeros")
    torch.testing.assert_close(same, images)
    flipped = random_resized_crop(images, 7, (1.0, 1.0), (1.0, 1.0), 0.0, True, generator, "zeros")
    for got, image in zip(flipped, images):
        assert torch.allclose(got, image) or torch.allclose(got, image.flip(-1))


def test_knn_accuracy_matches_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    generator = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(101, 9, generator=generator), torch.randn(53, 9, generator=generator)
    train_y, test_y = torch.randint(0, 4, (101,), generator=generator), torch.randint(0, 4, (53,), generator=generator)
    expected = KNeighborsClassifier(5, metric="cosine").fit(train_x.numpy(), train_y.numpy()).score(
        test_x.numpy(), test_y.numpy())
    assert evaluate.knn_accuracy(train_x, train_y, test_x, test_y, chunk=10) == pytest.approx(expected)


def test_linear_probe_separates_separable_classes_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    separable = torch.randn(300, 7, generator=generator) + 6 * torch.nn.functional.one_hot(labels, 7)
    assert evaluate.linear_probe_accuracy(separable[:200], labels[:200], separable[200:], labels[200:], 3) == 1.0
    noise = torch.randn(300, 7, generator=generator)
    assert evaluate.linear_probe_accuracy(noise[:200], labels[:200], noise[200:], labels[200:], 3) < 0.6


def test_collapse_monitors_tell_collapse_from_spread():
    generator = torch.Generator().manual_seed(0)
    std, rank = evaluate.collapse_monitors(torch.ones(64, 16) + 1e-4 * torch.randn(64, 16, generator=generator))
    assert std < 1e-3 and rank < 1.5
    std, rank = evaluate.collapse_monitors(torch.randn(4096, 16, generator=generator))
    assert std == pytest.approx(16 ** -0.5, rel=0.05) and rank > 15
    line = torch.randn(64, 1, generator=generator) * torch.randn(1, 16, generator=generator)
    assert evaluate.collapse_monitors(line)[1] < 1.01


def test_cifar10_batches_decode_to_images_and_keep_their_split(tmp_path):
    generator = np.random.default_rng(0)
    rows = {"data_batch_1": 6, "data_batch_2": 5, "test_batch": 4}
    raw = {}
    for name, count in rows.items():
        raw[name] = generator.integers(0, 256, (count, 3072), dtype=np.uint8)
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": raw[name], b"labels": list(generator.integers(0, 10, count))}, handle)
    cifar = data.load(str(tmp_path))
    assert cifar.images.shape == (15, 3, 32, 32) and cifar.images.dtype == torch.uint8
    assert cifar.train_index.tolist() == list(range(11)) and cifar.test_index.tolist() == list(range(11, 15))
    # CIFAR rows are channel-major: red plane, green plane, blue plane, each row by row.
    assert int(cifar.images[6, 1, 2, 3]) == int(raw["data_batch_2"][0, 1024 + 2 * 32 + 3])
    assert int(cifar.images[14, 2, 31, 0]) == int(raw["test_batch"][3, 2048 + 31 * 32])


def test_image_folder_trains_end_to_end(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image", reason="image folders are read with Pillow")
    generator = np.random.default_rng(0)
    for label, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(6):
            pixels = generator.integers(0, 256, (11 + i, 9, 3), dtype=np.uint8)
            pixels[..., label] = 255  # a class colour the probe can find
            image_module.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    folder = data.load(str(tmp_path), image_size=12)
    assert folder.images.shape == (12, 3, 12, 12) and folder.labels.tolist() == [0] * 6 + [1] * 6
    assert folder.natural and len(folder.test_index) == 4
    result = train.run(["--data", str(tmp_path), "--image-size", "12", "--epochs", "1", "--batch-size", "4"])
    assert math.isfinite(result["history"][0]["loss"])


@pytest.mark.distributed
def test_torchrun_two_gloo_processes_stay_in_sync():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastssl.examples.train", "--method", "simclr", "--device", "cpu", "--epochs", "1",
               "--steps-per-epoch", "2", "--batch-size", "32"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "simclr on digits" in run.stdout and "2 processes" in run.stdout
    assert len(EPOCH_LINE.findall(run.stdout)) == 1
    fingerprints = dict(re.findall(r"rank (\d)/2: parameter fingerprint (\S+)", run.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]


@pytest.mark.slow
@pytest.mark.parametrize("method, target", [
    ("simclr", 0.97),
    pytest.param("dinov2", 0.97, marks=pytest.mark.xfail(strict=True, reason="unmet: kNN-5 95.2% on the ViT (seeds 0-2: 95.2-96.3%)")),
    ("mae", 0.0),  # the issue asks MAE for the gain over random init only
])
def test_default_run_reaches_the_issue_target(method, target):
    result = train.run(["--method", method])
    trained, random_init = result["trained"]["knn"], result["random_init"]["knn"]
    assert trained >= target and trained >= random_init + 0.02, (trained, random_init)
