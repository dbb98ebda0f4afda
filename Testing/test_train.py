"""Training on a tiny MSD folder with the tiny random SAM: it learns, it is deterministic, it resumes,
it refuses bad data, and it runs under torchrun (DDP, gloo)."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SPDSegmentLib.core import spd_model
from SPDSegmentLib.core.cache import EmbeddingCache
from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.core.progress import Progress
from SPDSegmentLib.core.sample import SAMPLE_DIR
from SPDSegmentLib.research import train as T
from SPDSegmentLib.research.losses import dice_focal_loss

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # 2-core machines: no oversubscription


def ellipsoid_case(shape=(20, 32, 24), spacing=(1.0, 1.0, 1.5), seed=0):
    """An ellipsoid brighter than its noisy surroundings: (image, label) arrays (k, j, i)."""
    grid = np.indices(shape, dtype=float)
    centre = [s / 2 for s in shape]
    semi = (6.0, 11.0, 5.0)
    label = (sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi)) <= 1.0).astype(np.uint8)
    rng = np.random.default_rng(seed)
    image = (100 + 80 * label + rng.normal(0, 10, shape)).astype(np.float32)
    return image, label


def write(array, path, spacing=(1.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def make_msd(root: Path, synthetic: bool = True, sample: bool = True) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    if sample:
        shutil.copy(SAMPLE_DIR / "hippocampus_001_image.nii.gz", root / "imagesTr" / "hippocampus_001.nii.gz")
        shutil.copy(SAMPLE_DIR / "hippocampus_001_label.nii.gz", root / "labelsTr" / "hippocampus_001.nii.gz")
    if synthetic:
        image, label = ellipsoid_case()
        write(image, root / "imagesTr" / "ellipsoid_001_0000.nii.gz")  # nnU-Net channel suffix
        write(label, root / "labelsTr" / "ellipsoid_001.nii.gz")
    return root


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    return make_msd(tmp_path_factory.mktemp("msd") / "Task99_Test")


def config(data, out, **changes) -> T.TrainConfig:
    settings = dict(data=str(data), out=str(out), backbone="tiny_sam_test", device="cpu", stage1_epochs=8, stage1_lr=1e-2,
                    stage2_steps=3, prompt_seeds=1, noise_levels=("moderate",), batch_size=2, head_hidden=8,
                    head_blocks=1, axes=(1,), cache_dir=str(Path(out).parent / "features"))
    settings.update(changes)
    return T.TrainConfig(**settings)


def tensors(model):
    return {**{f"head.{k}": v for k, v in model.head.state_dict().items()},
            **{f"decoder.{k}": v for k, v in model.backbone.mask_decoder.state_dict().items()}}


# ---------------------------------------------------------------- learning

def evaluation_loss(backbone, head, items) -> float:
    """Dice + focal of the head on every training slice of every case."""
    batch = [(i, t) for i, item in enumerate(items) for t in item.slices]
    with torch.no_grad():
        logits = T._upsample(T.head_batch(head, items, batch), backbone.input_size)
        target = torch.stack([items[i].targets[t] for i, t in batch])[:, None].float()
        return float(dice_focal_loss(logits, target))


def test_stage1_lowers_the_loss(msd, tiny_backbone, tmp_path):
    cfg = config(msd, tmp_path / "unused.spd.safetensors", stage1_epochs=12, stage1_lr=5e-3, noise_levels=())
    T.seed_everything(cfg.seed)
    head = T._make_head(cfg, tiny_backbone)
    items = T.prepare(cfg, tiny_backbone, Progress(), head)
    assert [item.name for item in items] == ["ellipsoid_001", "hippocampus_001"]
    for item in items:
        assert item.slices and set(item.embeddings) == set(item.slices) == set(item.targets) == set(item.pixels)
        assert all(item.targets[t].shape == (tiny_backbone.input_size,) * 2 for t in item.slices)
    head.eval()
    before = evaluation_loss(tiny_backbone, head, items)
    last_batch = T.train_stage1(cfg, tiny_backbone, head, items, Progress(), "cpu")
    after = evaluation_loss(tiny_backbone, head, items)
    assert math.isfinite(last_batch) and not head.training
    print(f"stage-1 loss on the training slices: {before:.4f} -> {after:.4f}")
    assert after < before - 0.05, (before, after)
    # the backbone is not trained in frozen mode
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_training_slices_views_and_prompts(msd, tiny_backbone, tmp_path):
    cfg = config(msd, tmp_path / "unused.spd.safetensors", noise_levels=("mild", "severe"), prompt_seeds=2,
                 axes=(0, 1, 2), cases=["ellipsoid_001"])
    items = T.prepare(cfg, tiny_backbone, Progress(), T._make_head(cfg, tiny_backbone))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(msd / "labelsTr" / "ellipsoid_001.nii.gz")))
    assert [item.axis for item in items] == [0, 1, 2]
    assert {item.view for item in items} == {"axial", "coronal", "sagittal"}  # identity direction
    for item in items:
        other = tuple(a for a in range(3) if a != item.axis)
        present = np.nonzero(label.any(axis=other))[0]
        margin = 3  # the feature store's margin: CPD borrows from n = 2 neighbours, a 2.5D head reads one more
        assert item.slices == list(range(max(0, present[0] - margin), min(label.shape[item.axis],
                                                                          present[-1] + margin + 1)))
        assert item.shape_hw == tuple(label.shape[a] for a in other)
        assert len(item.prompts) == 2 * 2  # levels x seeds
        for prompts in item.prompts:
            assert set(prompts) <= set(present.tolist())
            for rc, labels in prompts.values():
                assert rc.shape[1] == 2 and len(rc) == len(labels)


def test_model_frame_mask_lies_where_the_image_does(tiny_backbone):
    """Training targets are resized into the model frame exactly where ``Backbone.prepare`` puts the image."""
    mask = np.zeros((20, 31), np.float32)
    mask[:, :] = 1.0
    transform = tiny_backbone.transform(*mask.shape)
    target = T.model_frame_mask(mask, transform).numpy() > 0
    image = tiny_backbone.prepare([mask])[0, 0].cpu().numpy() > 0
    assert np.array_equal(target, image)


def test_training_and_inference_share_one_forward_path(msd, tiny_backbone, tmp_path, monkeypatch):
    """The saliency maps and decoder prompts stage 2 trains on are exactly those ``pipeline.segment`` builds
    for the same clicks (a test that fails if the two paths drift apart again)."""
    from SPDSegmentLib.core import pipeline
    from SPDSegmentLib.core import volume as vol
    from SPDSegmentLib.research.simulate import simulate

    cfg = config(msd, tmp_path / "m.spd.safetensors", cases=["hippocampus_001"], stage1_epochs=1)
    head = T._make_head(cfg, tiny_backbone)
    (item,) = T.prepare(cfg, tiny_backbone, Progress(), head)
    # the header settings training records (the decoder prompt decides which jobs inference builds)
    model = spd_model.SPDModel(tiny_backbone, head.eval(), {"decoder_prompt": cfg.decoder_prompt})
    T.compute_saliency(model, [item])

    volume = vol.read(msd / "imagesTr" / "hippocampus_001.nii.gz")
    label = vol.read_label(msd / "labelsTr" / "hippocampus_001.nii.gz", like=volume)
    clicks = simulate(label, 1, "moderate", seed=3).voxel_prompts(volume)
    decoded = []
    real_decode = pipeline._decode
    monkeypatch.setattr(pipeline, "_decode", lambda backbone, embeddings, jobs, *a, **k: (
        decoded.extend(jobs), real_decode(backbone, embeddings, jobs, *a, **k))[1])
    cache = EmbeddingCache()
    for t, emb in item.embeddings.items():  # the stored (int8) embeddings, as the benchmark does
        cache.put(pipeline.plan(volume, clicks, model, pipeline.SegmentOptions()).key, t, emb)
    result = pipeline.segment(volume, clicks, model, pipeline.SegmentOptions(return_saliency=True), cache=cache)
    inference_jobs = {job[0]: job for job in decoded}
    assert inference_jobs, "segment decoded nothing"
    for t in result.slices:  # the same saliency maps
        np.testing.assert_allclose(vol.get_slice(result.saliency, 1, t), item.saliency[t], atol=1e-6)
    by_slice = clicks.by_slice()
    checked = 0
    for t in sorted(inference_jobs)[:-1]:
        if t + 1 not in inference_jobs:
            continue
        training_jobs = T._jobs_for(cfg, item, by_slice, [t, t + 1])
        for job in training_jobs:
            expected = inference_jobs[job[0]]
            for got, want in zip(job[1:], expected[1:]):
                np.testing.assert_array_equal(got, want)
            checked += 1
    assert checked >= 4


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained(msd, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "model.spd.safetensors"
    path = T.train(config(msd, out, work_dir=str(out.parent / "work"), keep_work=True))
    return path


def test_train_end_to_end_writes_a_loadable_model(trained, sample_paths):
    assert trained.exists() and trained.name == "model.spd.safetensors"
    assert (trained.parent / "work" / "stage1.pt").exists()  # keep_work
    assert not list(trained.parent.rglob("*.partial"))
    model = spd_model.load(trained)
    header = model.header
    assert header["backbone"] == "tiny_sam_test" and header["decoder_tuned"] is True
    assert header["lora_rank"] == 0 and header["tau"] == 0.5 and header["neighbours"] == 2
    assert header["training"]["cases"] == ["ellipsoid_001", "hippocampus_001"]
    assert header["training"]["stage2_steps"] == 3 and header["training"]["mode"] == "frozen"
    assert header["axes"] == [1] and header["views"] == ["coronal"]
    assert header["head"] == {"type": "context", "hidden": 8, "blocks": 1, "context": 1, "image": True, "upsample": 1}
    assert math.isfinite(header["losses"]["stage1"]) and math.isfinite(header["losses"]["stage2"])
    # the model segments
    from SPDSegmentLib.core import prompts as P
    from SPDSegmentLib.core import volume as vol
    from SPDSegmentLib.core.pipeline import segment

    volume = vol.read(sample_paths["image"])
    result = segment(volume, P.to_voxels(P.read(sample_paths["points"]), volume, axis=1), model,
                     cache=EmbeddingCache())
    assert result.mode == "spd" and result.mask.shape == volume.shape


def test_work_folder_is_removed_after_success(msd, tmp_path):
    out = T.train(config(msd, tmp_path / "m.spd.safetensors", stage2_steps=0))
    assert out.exists() and not (tmp_path / "m.spd.safetensors.work").exists()


def test_same_seed_gives_identical_weights(msd, trained, tmp_path):
    again = T.train(config(msd, tmp_path / "again.spd.safetensors"))
    a, b = tensors(spd_model.load(trained)), tensors(spd_model.load(again))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    other = tensors(spd_model.load(T.train(config(msd, tmp_path / "seed1.spd.safetensors", seed=1))))
    assert any(not torch.equal(a[k], other[k]) for k in a if k.startswith("head."))


def test_resume_continues_only_the_same_run(msd, trained, tmp_path, monkeypatch):
    work = str(trained.parent / "work")
    real_stage1 = T.train_stage1

    def no_stage1(*args, **kwargs):
        raise AssertionError("stage 1 ran again although stage1.pt exists")

    monkeypatch.setattr(T, "train_stage1", no_stage1)
    said = []
    resumed = T.train(config(msd, tmp_path / "resumed.spd.safetensors", work_dir=work, resume=True, keep_work=True),
                      log=said.append)
    assert any("Resuming" in line for line in said)
    a, b = tensors(spd_model.load(trained)), tensors(spd_model.load(resumed))
    for key in a:  # the head comes from stage1.pt, and stage 2 repeats exactly
        assert torch.equal(a[key], b[key]), key
    assert spd_model.read_header(resumed)["losses"]["stage1"] == spd_model.read_header(trained)["losses"]["stage1"]
    stage1_seconds = torch.load(Path(work) / "stage1.pt", weights_only=True)["seconds"]
    assert spd_model.read_header(resumed)["training"]["seconds"] >= round(stage1_seconds, 1)  # the stopped run counts
    # without resume, or with other settings or cases, stage 1 runs again and says why
    for changes, reason in (({}, "use resume"), ({"resume": True, "stage1_epochs": 3}, "other settings"),
                            ({"resume": True, "cases": ["hippocampus_001"]}, "other settings")):
        said.clear()
        with pytest.raises(AssertionError, match="stage 1 ran again"):
            T.train(config(msd, tmp_path / "fresh.spd.safetensors", work_dir=work, keep_work=True, **changes),
                    log=said.append)
        assert any(reason in line for line in said), said
    monkeypatch.setattr(T, "train_stage1", real_stage1)


def test_stage2_raw_prompt_mode_and_no_stage2(msd, tmp_path):
    raw = spd_model.load(T.train(config(msd, tmp_path / "raw.spd.safetensors", prompt_mode="raw", stage2_steps=2)))
    assert raw.header["prompt_mode"] == "raw" and raw.header["decoder_tuned"]
    head_only = spd_model.load(T.train(config(msd, tmp_path / "head.spd.safetensors", stage2_steps=0)))
    assert head_only.header["decoder_tuned"] is False and head_only.header["losses"]["stage2"] is None


def test_first_design_head_still_trains_and_loads(msd, tmp_path):
    model = spd_model.load(T.train(config(msd, tmp_path / "conv2.spd.safetensors", head="conv2", stage2_steps=1)))
    assert model.header["head"] == {"type": "conv2", "hidden": 8} and model.head.context == 0


def test_stage2_without_any_consensus_prompt_fails_instead_of_hanging(msd, tmp_path):
    with pytest.raises(InputError, match="tau"):
        T.train(config(msd, tmp_path / "m.spd.safetensors", tau=0.9999, stage1_epochs=0))
    assert not (tmp_path / "m.spd.safetensors").exists()


# ---------------------------------------------------------------- bad input

def test_empty_label_is_an_input_error(tmp_path):
    data = make_msd(tmp_path / "data", sample=False)
    image, label = ellipsoid_case()
    write(image, data / "imagesTr" / "blank_001.nii.gz")
    write(np.zeros_like(label), data / "labelsTr" / "blank_001.nii.gz")
    with pytest.raises(InputError, match="blank_001.*empty"):
        T.train(config(data, tmp_path / "m.spd.safetensors"))
    assert not (tmp_path / "m.spd.safetensors").exists()


@pytest.mark.parametrize("change", ["shape", "spacing", "origin"])
def test_image_label_geometry_mismatch_is_an_input_error(tmp_path, change):
    data = make_msd(tmp_path / "data", synthetic=False, sample=False)
    image, label = ellipsoid_case()
    write(image, data / "imagesTr" / "case_001.nii.gz")
    if change == "shape":
        write(label[:, :-2], data / "labelsTr" / "case_001.nii.gz")
    elif change == "spacing":
        write(label, data / "labelsTr" / "case_001.nii.gz", spacing=(1.0, 1.0, 3.0))
    else:
        write(label, data / "labelsTr" / "case_001.nii.gz", origin=(5.0, 0.0, 0.0))
    with pytest.raises(InputError, match="does not match its image"):
        T.train(config(data, tmp_path / "m.spd.safetensors"))


def test_folder_without_images_tr_is_an_input_error(tmp_path):
    (tmp_path / "data" / "labelsTr").mkdir(parents=True)
    with pytest.raises(InputError, match="imagesTr"):
        T.train(config(tmp_path / "data", tmp_path / "m.spd.safetensors"))
    with pytest.raises(InputError, match="imagesTr"):
        T.train(config(tmp_path / "missing", tmp_path / "m.spd.safetensors"))


def test_no_cases_is_an_input_error(tmp_path):
    data = make_msd(tmp_path / "data", synthetic=False, sample=False)
    (data / "imagesTr" / "notes.txt").write_text("not an image")
    write(ellipsoid_case()[0], data / "imagesTr" / "unlabelled_001.nii.gz")  # an image without a label
    with pytest.raises(InputError, match="No cases found"):
        T.train(config(data, tmp_path / "m.spd.safetensors"))


def test_unknown_case_names_and_mode_are_input_errors(msd, tmp_path):
    with pytest.raises(InputError, match="not_a_case"):
        T.train(config(msd, tmp_path / "m.spd.safetensors", cases=["not_a_case"]))
    with pytest.raises(InputError, match="frozen"):
        T.train(config(msd, tmp_path / "m.spd.safetensors", mode="everything"))


@pytest.mark.parametrize("change, words", [({"tau": 1.5}, "tau"), ({"neighbours": -1}, "neighbour slices n is -1"),
                                           ({"batch_size": 0}, "batch_size"), ({"axes": (3,)}, "axes"),
                                           ({"head": "huge"}, "head"), ({"fusion": 1.5}, "fusion"),
                                           ({"components": "biggest"}, "components"),
                                           ({"decoder_prompt": "points"}, "decoder prompt")])
def test_bad_settings_are_refused_before_any_work(msd, tmp_path, change, words):
    with pytest.raises(InputError, match=words):
        T.train(config(msd, tmp_path / "m.spd.safetensors", **change))
    assert not (tmp_path / "features").exists()  # nothing encoded


# ---------------------------------------------------------------- DDP

DDP_SCRIPT = """
import sys
sys.path.insert(0, {lib!r})
import torch
torch.set_num_threads(1)
from SPDSegmentLib.research import train as T

config = T.TrainConfig(data=sys.argv[1], out=sys.argv[2], backbone="tiny_sam_test", device="cpu",
                       stage1_epochs=1, stage2_steps=2, prompt_seeds=1, noise_levels=("moderate",),
                       batch_size=2, head_hidden=8, head_blocks=1, axes=(1,),
                       cache_dir=sys.argv[2] + ".features")
out = T.train(config)
assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
# one marker file per rank (the ranks' stdout interleaves)
open(f"rank{{torch.distributed.get_rank()}}.done", "w").write(str(out))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_training_with_torchrun(msd, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(lib=str(ROOT / "SPDSegment"))))
    out = tmp_path / "ddp" / "model.spd.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(msd), str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    assert [(tmp_path / f"rank{r}.done").read_text() for r in (0, 1)] == [str(out)] * 2
    assert out.exists()
    model = spd_model.load(out)
    assert model.header["decoder_tuned"] and model.header["training"]["stage2_steps"] == 2
