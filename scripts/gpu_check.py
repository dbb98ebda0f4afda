"""Issue 5's GPU goals in one run: encoder and decoder throughput, an SPD run, timed training.

    python3 scripts/gpu_check.py [--bundle .gpu] [--out DIR] [--device cuda] [--quick]

Made for a lent GPU machine (no network, PyTorch only): ``python scripts/gpu_bundle.py`` first packs
the packages, weights and data it needs into ``.gpu/``. Prints, and writes to ``DIR/gpu_check.json``:
  1. the LiteMedSAM encoder (slices/s) and decoder (prompts/s) at several batch sizes, fp32 and bf16
     autocast (goals: 2,000 slices/s, 20,000 prompts/s);
  2. the pipeline's encoding of a synthetic 512 x 512 x 256 CT-like volume (host-side preparation,
     copies and cache included), at the GPU batch size the pipeline uses and at 64;
  3. an SPD run with the bundled model on the sample case: first run and a moved click;
  4. SPD training, stage 1 and 2 in LoRA mode, on the hippocampus training split (goal: 5 minutes).
``--quick`` shrinks every part: a plumbing check (6 minutes on the 2-core build machine, most of it LoRA
training through the encoder on the CPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(function, items: int, device, repeats: int) -> float:
    """Items per second of ``function()``, after two warm-up calls."""
    for _ in range(2):
        function()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return items * repeats / (time.perf_counter() - t0)


def throughput(backbone, batches, prompt_batches, repeats: int) -> list:
    import torch

    device = backbone.device
    size = backbone.input_size
    rows = []
    for precision in ("fp32", "bf16"):
        backbone.set_runtime("torch", precision)
        for batch in batches:
            images = torch.rand(batch, 3, size, size, device=device)
            with torch.inference_mode():
                value = rate(lambda: backbone.encode(images), batch, device, repeats)
            rows.append({"part": "encoder", "precision": precision, "batch": batch, "per_s": round(value, 1)})
            print(f"encoder {precision} batch {batch}: {value:.0f} slices/s", flush=True)
        with torch.inference_mode():
            embedding = backbone.encode(torch.rand(1, 3, size, size, device=device))
        for batch in prompt_batches:
            emb = embedding.expand(batch, -1, -1, -1).contiguous()
            points = torch.rand(batch, 2, 2, device=device) * size
            labels = torch.ones(batch, 2, device=device)
            boxes = torch.tensor([[40.0, 40.0, 200.0, 200.0]], device=device).expand(batch, 4)
            with torch.inference_mode():
                value = rate(lambda: backbone.decode(emb, points, labels, boxes), batch, device, repeats)
            rows.append({"part": "decoder", "precision": precision, "batch": batch, "per_s": round(value, 1)})
            print(f"decoder {precision} batch {batch}: {value:.0f} prompts/s", flush=True)
        del embedding
    backbone.set_runtime("torch", "fp32")
    return rows


def pipeline_encoding(backbone, slices: int, batches) -> list:
    """Slices/s of ``pipeline.encode_slices`` over a synthetic volume: what a full-volume run sees."""
    import numpy as np

    from SPDSegmentLib.core.cache import EmbeddingCache
    from SPDSegmentLib.core.pipeline import encode_slices
    from SPDSegmentLib.core.volume import Volume

    array = np.random.default_rng(0).integers(-1000, 1000, (slices, 512, 512), dtype=np.int16)
    volume = Volume(array, np.eye(4), name="synthetic")
    rows = []
    for batch in batches:
        encode_slices(backbone, volume, 0, list(range(min(batch, slices))), (-160.0, 240.0),
                      cache=EmbeddingCache(max_bytes=1 << 20))  # warm-up
        synchronize(backbone.device)
        t0 = time.perf_counter()
        encode_slices(backbone, volume, 0, list(range(slices)), (-160.0, 240.0), batch_size=batch,
                      cache=EmbeddingCache(max_bytes=8 << 30), key=f"synthetic-{batch}")
        synchronize(backbone.device)
        value = slices / (time.perf_counter() - t0)
        rows.append({"part": "pipeline encode_slices", "precision": backbone.precision, "batch": batch,
                     "per_s": round(value, 1)})
        print(f"pipeline encode_slices, {slices} slices of 512 x 512, batch {batch}: {value:.0f} slices/s", flush=True)
    return rows


def load_npz(path: Path):
    import numpy as np

    from SPDSegmentLib.core.volume import Volume

    data = np.load(path)
    return Volume(data["image"], data["ijk_to_lps"], name=path.stem), data["label"]


class NpzCase:
    """A training case read from the bundle (``data.Case``'s interface, without SimpleITK)."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.stem

    def load(self):
        return load_npz(self.path)


def spd_run(bundle: Path, device: str) -> dict:
    from SPDSegmentLib.core.cache import EmbeddingCache
    from SPDSegmentLib.core.pipeline import SegmentOptions, load_model, segment
    from SPDSegmentLib.research.speed import _case, _one_click_moved

    model = load_model("spd-hippocampus", device=device)
    volume, label = load_npz(bundle / "sample.npz")
    clicks = _case(volume, label, 1)
    segment(volume, clicks, model, SegmentOptions(), cache=EmbeddingCache())  # warm-up (kernels, allocator)
    cache = EmbeddingCache()
    synchronize(model.backbone.device)
    t0 = time.perf_counter()
    first = segment(volume, clicks, model, SegmentOptions(), cache=cache)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    segment(volume, _one_click_moved(clicks), model, SegmentOptions(), cache=cache)
    moved_s = time.perf_counter() - t0
    print(f"SPD run on the sample ({len(first.slices)} slices): first {first_s:.2f} s "
          f"({', '.join(f'{k} {v:.2f}' for k, v in first.timings.items())}), 1 click moved {moved_s:.3f} s",
          flush=True)
    return {"slices": len(first.slices), "first_s": round(first_s, 3), "moved_s": round(moved_s, 3),
            "timings": {k: round(v, 3) for k, v in first.timings.items()}}


def training(bundle: Path, device: str, quick: bool, out_dir: Path) -> dict:
    from SPDSegmentLib.research import train as training

    cases = [NpzCase(p) for p in sorted((bundle / "hippocampus").glob("*.npz"))]
    if quick:
        cases = cases[:1]
    training.find_cases = lambda data_dir, names=None: cases  # the bundle's arrays instead of NIfTI files
    config = training.TrainConfig(data=str(bundle / "hippocampus"), out=str(out_dir / "gpu_lora.spd.safetensors"),
                           dataset="hippocampus", axis=1, mode="lora", device=device,
                           work_dir=str(out_dir / "train_work"))
    if quick:
        config.stage1_epochs, config.stage2_steps, config.noise_levels, config.prompt_seeds = 1, 2, ("mild",), 1
    t0 = time.perf_counter()
    training.train(config)
    seconds = time.perf_counter() - t0
    print(f"training, LoRA mode, stage 1 ({config.stage1_epochs} epochs) + stage 2 ({config.stage2_steps} steps), "
          f"{len(cases)} cases: {seconds:.1f} s", flush=True)
    return {"mode": "lora", "cases": len(cases), "stage1_epochs": config.stage1_epochs,
            "stage2_steps": config.stage2_steps, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(ROOT / ".gpu"))
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "run", "train"],
                        help="parts to leave out (to rerun what a first call did not reach)")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    sys.path[:0] = [str(bundle / "site"), str(ROOT / "SPDSegment")]
    import torch

    from SPDSegmentLib.core.models.registry import load_backbone

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"command": "python3 scripts/gpu_check.py " + " ".join(sys.argv[1:]), "date": date.today().isoformat(),
              "device": name, "torch": torch.__version__}
    print(json.dumps(report), flush=True)
    if "throughput" not in args.skip:
        backbone = load_backbone("litemedsam", device=args.device)
        batches = [1, 4] if args.quick else [1, 16, 64, 256]
        prompt_batches = [4] if args.quick else [16, 256, 1024]
        report["throughput"] = throughput(backbone, batches, prompt_batches, repeats=1 if args.quick else 5)
        report["throughput"] += pipeline_encoding(backbone, 8 if args.quick else 256, [4] if args.quick else [16, 64])
        del backbone
    if "run" not in args.skip:
        report["spd_run"] = spd_run(bundle, args.device)
    if "train" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            report["training"] = training(bundle, args.device, args.quick, Path(tmp))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
