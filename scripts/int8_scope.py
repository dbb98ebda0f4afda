"""Which encoder layers can run in int8? Speed and embedding error of each int8 scope, and the roofline.

    python scripts/int8_scope.py [--data-root ../shared/data]

The LiteMedSAM encoder is converted to OpenVINO, then quantised (NNCF static int8, calibrated on the
bundled sample case exactly as ``--precision int8`` does) with several ignored scopes. For each:
seconds per slice (OpenVINO bf16 for the layers left out; round-robin over the variants, best and
median of 6 rounds, since this machine's timings drift by 20 %) and the relative error of the
embeddings against OpenVINO fp32 on prompted slices of two hippocampus and two left-atrium cases
(when the data are there; the sample case otherwise). Also printed: the encoder's FLOPs per slice,
where its bf16 time goes (OpenVINO's per-layer counters, by layer type) and the machine's bf16 and
fp32 matrix-product peak, to tell how far the encoder is from the hardware.
"""
from __future__ import annotations

import argparse
import glob
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from SPDSegmentLib.core.models import openvino_runtime as ovr
from SPDSegmentLib.core.models.registry import load_backbone
from SPDSegmentLib.core.sample import sample_case
from SPDSegmentLib.core.volume import apply_range, get_slice, intensity_range, read



def prompted_slices(backbone, image: str, label: str, axis: int, count: int) -> list:
    volume, mask = read(image), read(label).array
    lo_hi = intensity_range(volume.array)
    with_label = [t for t in range(mask.shape[axis]) if get_slice(mask, axis, t).any()]
    picks = np.array(with_label)[np.linspace(0, len(with_label) - 1, count).astype(int)]
    return [backbone.prepare([apply_range(get_slice(volume.array, axis, int(t)), *lo_hi)]).numpy() for t in picks]


def matmul_peak(hint: str, threads: int) -> float:
    """GFLOP/s of a chain of large matrix products (the best the CPU does for this kind of work)."""
    import openvino as ov
    import openvino.opset13 as ops

    m, k = 16384, 512
    x = ops.parameter([1, m, k], np.float32)
    weight = ops.constant(np.random.default_rng(0).normal(0, 0.05, (k, k)).astype(np.float32))
    y = x
    for _ in range(8):
        y = ops.matmul(y, weight, False, True)
    request = ov.Core().compile_model(ov.Model([y], [x]), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
    }).create_infer_request()
    data = np.random.default_rng(1).random((1, m, k), np.float32)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        request.infer({0: data})
        best = min(best, time.perf_counter() - t0)
    return 8 * 2 * m * k * k / best / 1e9


def time_by_layer_type(model, x, threads: int) -> list:
    """(share of the time, milliseconds, layer type, kernel) of one bf16 inference, largest first."""
    import collections

    import openvino as ov

    request = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if ovr.cpu_supports_bf16() else "f32", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}).create_infer_request()
    for _ in range(3):
        request.infer({0: x})
    seconds = collections.Counter()
    for layer in request.profiling_info:
        seconds[(layer.node_type, layer.exec_type)] += layer.real_time.total_seconds()
    total = sum(seconds.values())
    return [(s / total, 1000 * s, kind, kernel) for (kind, kernel), s in seconds.most_common()]


def main() -> None:
    import nncf
    import openvino as ov
    from torch.utils.flop_counter import FlopCounterMode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    threads = torch.get_num_threads()
    backbone = load_backbone("litemedsam", device="cpu")
    size = backbone.input_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        backbone.image_encoder(torch.zeros(1, 3, size, size))
    encoder_gflop = counter.get_total_flops() / 1e9

    root = Path(args.data_root)
    sets = {}
    for name, axis, pattern in (("hippocampus", 1, "hippocampus/imagesTr/*.nii.gz"),
                                ("left atrium", 0, "left_atrium/imagesTr/*.nii.gz")):
        images = sorted(glob.glob(str(root / pattern)))[:2]
        if images:
            sets[name] = sum((prompted_slices(backbone, i, i.replace("imagesTr", "labelsTr"), axis, 4)
                              for i in images), [])
    if not sets:
        sets["sample"] = prompted_slices(backbone, str(sample_case().image), str(sample_case().label),
                                         sample_case().axis, 8)
    calibration = ovr._calibration_images(backbone)

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        xml = str(Path(tmp) / "encoder.xml")
        ov.save_model(ov.convert_model(backbone.image_encoder, example_input=torch.zeros(1, 3, size, size),
                                       input=[(1, 3, size, size)]), xml, compress_to_fp16=False)
        fp32 = core.read_model(xml)
        convolutions = [op for op in fp32.get_ordered_ops() if op.get_type_name() == "Convolution"]
        # MBConv's 1x1 expansions (channels x 4), fed by a batch norm
        expand = {op.get_friendly_name() for op in convolutions
                  if list(op.input(1).get_shape())[:2] == [4 * op.input(1).get_shape()[1], op.input(1).get_shape()[1]]}
        not_neck = [op.get_friendly_name() for op in convolutions if "neck" not in op.get_friendly_name()]
        scopes = {  # name -> NNCF ignored scope (None: nothing quantised)
            "bf16 (no int8)": None,
            "all layers": nncf.IgnoredScope(),
            "all fully connected": nncf.IgnoredScope(types=["Convolution", "GroupConvolution"]),
            "fully connected but fc2": nncf.IgnoredScope(types=["Convolution", "GroupConvolution"],
                                                         patterns=[r".*mlp\.fc2.*"], validate=False),
            "qkv + fc1": nncf.IgnoredScope(types=["Convolution", "GroupConvolution"],
                                           patterns=ovr.INT8_SKIPPED_PATTERNS, validate=False),
            f"qkv + fc1 + neck (shipped: {ovr.INT8_SCOPE})": ovr._int8_ignored_scope(fp32),
            "qkv + fc1 + neck + MBConv 1x1": nncf.IgnoredScope(
                names=[c for c in not_neck if c not in expand], types=["GroupConvolution"],
                patterns=ovr.INT8_SKIPPED_PATTERNS, validate=False),
        }
        requests, errors = {}, {}
        for name, scope in scopes.items():
            model = core.read_model(xml) if scope is None else nncf.quantize(
                core.read_model(xml), nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(calibration), ignored_scope=scope)
            requests[name] = core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": "bf16" if ovr.cpu_supports_bf16() else "f32",
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}).create_infer_request()
        reference = core.compile_model(fp32, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": threads}).create_infer_request()
        for name, request in requests.items():
            errors[name] = {}
            for set_name, slices in sets.items():
                rel = [np.linalg.norm(request.infer({0: s})[0] - ref) / np.linalg.norm(ref)
                       for s in slices for ref in [reference.infer({0: s})[0].copy()]]
                errors[name][set_name] = float(np.mean(rel))
        x = next(iter(sets.values()))[0]
        times = {name: [] for name in requests}
        for request in requests.values():
            request.infer({0: x})
        for _ in range(6):
            for name, request in requests.items():
                t0 = time.perf_counter()
                for _ in range(4):
                    request.infer({0: x})
                times[name].append((time.perf_counter() - t0) / 4)

    print(f"LiteMedSAM encoder: {encoder_gflop:.1f} GFLOP per slice ("
          + ", ".join(f"{op} {n / 1e9:.1f}" for op, n in counter.get_flop_counts()["Global"].items())
          + f"); {threads} threads; OpenVINO {ov.__version__.split('-')[0]}, NNCF {nncf.__version__}")
    print("where the bf16 encoder's time goes (one slice):")
    for share, ms, kind, kernel in time_by_layer_type(fp32, x, threads):
        if share >= 0.01:
            print(f"  {100 * share:5.1f} %  {ms:6.1f} ms  {kind} ({kernel})")
    peaks = {hint: matmul_peak(hint, threads) for hint in ("f32", "bf16")}
    print(f"matrix-product peak of this CPU: fp32 {peaks['f32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"(the encoder at the bf16 peak: {encoder_gflop / peaks['bf16']:.3f} s per slice)")
    print(f"{'int8 scope':48} {'best s':>7} {'median s':>8} {'GFLOP/s':>8} "
          + " ".join(f"{'err ' + s:>14}" for s in sets))
    for name in requests:
        best = min(times[name])
        print(f"{name:48} {best:7.3f} {np.median(times[name]):8.3f} {encoder_gflop / best:8.0f} "
              + " ".join(f"{errors[name][s]:14.3f}" for s in sets))


if __name__ == "__main__":
    main()
